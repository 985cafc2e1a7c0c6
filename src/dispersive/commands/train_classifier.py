"""`dispersive train-classifier`: train the Fashion-MNIST domain feature network.

Writes three files to ``--outdir`` (default: the package's ``assets/`` folder, which ships them):
the weights (``fmnist_classifier.pt``, a plain state_dict), their metadata
(``fmnist_classifier.json``: sha256, test accuracy, the command, seed, epochs) and the reference
statistics of the training set under the trained network (``fmnist_train_stats.npz``: float64
mu (F,), sigma (F, F)). Refuses to write when test accuracy is below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dispersive.atomic import atomic_write
from dispersive.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="",
        help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--outdir", default="", help="output folder (default: the package assets/)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-features", type=int, default=128)
    p.add_argument("--min-accuracy", type=float, default=0.90)
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")


def load_split(path: str | None, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images uint8 (N, 28, 28) and labels int64 (N,) (via the training data
    module, which reads the IDX files and explains how to get them when missing)."""
    from dispersive.data.datasets import load_fashion_mnist

    return load_fashion_mnist(path or None, train=train)


def _to_input(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1] (same mapping as eval.io)."""
    return torch.from_numpy(np.array(x, dtype=np.uint8)).float().div(127.5).sub(1.0).unsqueeze(1)


@torch.no_grad()
def _predict(net, x: np.ndarray, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for i in range(0, len(x), batch):
        f, lg = net(_to_input(x[i : i + batch]))
        feats.append(f.double())
        logits.append(lg)
    return torch.cat(feats), torch.cat(logits)


def run(args: argparse.Namespace) -> int:
    from dispersive.eval.features import (
        ASSETS_DIR,
        CLASSIFIER_FILE,
        CLASSIFIER_META,
        REF_STATS_FILE,
        DomainClassifier,
        sha256_file,
    )
    from dispersive.eval.metrics import feature_statistics, save_statistics

    if args.epochs < 1 or args.batch_size < 2:
        raise UserError("--epochs must be >= 1 and --batch-size >= 2")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    outdir = Path(args.outdir) if args.outdir else ASSETS_DIR
    x_train, y_train = load_split(args.data, train=True)
    x_test, y_test = load_split(args.data, train=False)
    if args.limit > 0:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = DomainClassifier(num_features=args.num_features)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    x_all, y_all = _to_input(x_train), torch.from_numpy(y_train)
    t0, cpu0 = time.time(), time.process_time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_all), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb, yb = x_all[idx], y_all[idx]
            # Random horizontal flips: garments are left-right symmetric; helps generalise.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(net(xb)[1], yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        net.eval()
        acc = float((_predict(net, x_test)[1].argmax(1).numpy() == y_test).mean())
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {total / max(n, 1):.4f}  "
            f"test acc {acc:.4f}  ({time.time() - t0:.0f}s)",
            flush=True,
        )

    net.eval()
    if acc < args.min_accuracy:
        raise UserError(
            f"test accuracy {acc:.4f} is below --min-accuracy {args.min_accuracy}; "
            "train longer (--epochs) instead of shipping a weak feature network"
        )
    feats, _ = _predict(net, x_train)
    outdir.mkdir(parents=True, exist_ok=True)
    weights = outdir / CLASSIFIER_FILE
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    atomic_write(weights, lambda f: torch.save(state, f))
    sha = sha256_file(weights)
    features_id = f"fashion-mnist:{sha[:16]}"
    save_statistics(outdir / REF_STATS_FILE, feature_statistics(feats, features_id=features_id))
    meta = {
        "file": CLASSIFIER_FILE,
        "sha256": sha,
        "bytes": weights.stat().st_size,
        "architecture": "DomainClassifier (dispersive.eval.features)",
        "num_features": args.num_features,
        "num_classes": 10,
        "input": "(N, 1, 28, 28) float in [-1, 1] = uint8 / 127.5 - 1",
        "features": "pre-activation output of the penultimate linear layer",
        "test_accuracy": round(acc, 4),
        "train_images": len(x_train),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(time.time() - t0, 1),  # wall time (inflated on a busy machine)
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),
        "torch": torch.__version__,
        # Float results (and so the sha256) depend on the thread count and the CPU's kernels.
        "threads": torch.get_num_threads(),
        "command": "dispersive train-classifier " + shlex.join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "train-classifier"
        else "dispersive train-classifier",
        "reference_statistics": {
            "file": REF_STATS_FILE,
            "images": "Fashion-MNIST training set",
            "num": len(x_train),
            "features": features_id,
        },
    }
    meta_path = outdir / CLASSIFIER_META
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps({"test_accuracy": acc, "sha256": sha, "outdir": str(outdir)}))
    return 0
