"""`dispersive eval`: FID / IS / KID / precision-recall of a sample file against a reference.

    dispersive eval --samples out/samples.npz                      # Fashion-MNIST, shipped stats
    dispersive eval --samples out/samples.npz --ref ref.npz --features inception \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth

Human-readable lines first; the last line on stdout is one JSON object with the metrics.
"""

from __future__ import annotations

import argparse
import json

from dispersive.eval.features import FEATURES
from dispersive.eval.metrics import EVAL_KEYS, METRICS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--samples", required=True, help="an .npz (arr_0 uint8 NHWC) or a folder of images"
    )
    p.add_argument(
        "--ref",
        default=None,
        help="reference: .npz of images, image folder, or statistics .npz (mu, sigma); "
        "default with --features fashion-mnist: the shipped training-set statistics",
    )
    p.add_argument("--features", choices=FEATURES, default="fashion-mnist")
    p.add_argument(
        "--inception-weights",
        default=None,
        help="local pt_inception-2015-12-05-6726825d.pth (verified by sha256; never downloaded)",
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        default=list(METRICS),
        choices=list(METRICS),
        help="which metrics to compute (pr = precision/recall)",
    )
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifolds (paper: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the IS splits / KID subsets")
    p.add_argument("--save-stats", default=None, help="also write the samples' statistics .npz")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")


def run(args: argparse.Namespace) -> int:
    import torch

    from dispersive.eval.metrics import evaluate

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    res = evaluate(
        args.samples,
        args.ref,
        features=args.features,
        inception_weights=args.inception_weights,
        metrics=tuple(args.metrics),
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        pr_k=args.pr_k,
        seed=args.seed,
        save_stats=args.save_stats,
    )
    for key in EVAL_KEYS:
        if key in res:
            extra = f" ± {res[key + '_std']:.4g}" if key + "_std" in res else ""
            print(f"{key:>10}: {res[key]:.6g}{extra}")
    if "skipped" in res:
        print(f"   skipped: {res['skipped']}")
    print(f"  features: {res['features']}  ({res['num_samples']} samples, {res['num_ref']} ref)")
    print(json.dumps(res, sort_keys=True))
    return 0
