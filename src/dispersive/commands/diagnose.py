"""`dispersive diagnose`: representation norm of every block (paper Fig. 3).

    dispersive diagnose --ckpt runs/fmnist --t 0.1 0.5 0.9 --num 64 --outdir out/

For each t, a batch of ``--num`` images is noised to t and the mean per-sample l2 norm of every
block's output is recorded (:func:`dispersive.eval.diagnostics.block_norms`). Prints a markdown
table (blocks x t; ``*`` marks the blocks the dispersive loss was applied to) and writes
``block_norms.png`` and ``block_norms.json`` to ``--outdir``.

Which images: ``--source auto`` (default) uses real images from the run's training dataset (a
random subset drawn with ``--seed``), the distribution the representations were trained on;
if that data is not available on this machine it falls back to the model's own samples
(``--source samples``: generated with the run's sampler settings), and says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a checkpoint file or a run directory")
    p.add_argument("--t", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="noise levels")
    p.add_argument("--num", type=int, default=64, help="images in the batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", choices=("auto", "data", "samples"), default="auto")
    p.add_argument("--outdir", default=".", help="where to write block_norms.{png,json}")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of EMA")


def _real_batch(config_dict: dict, num: int, seed: int):
    import torch

    from dispersive.data.datasets import build_dataset
    from dispersive.train.config import config_from_dict

    config = config_from_dict(config_dict)
    ds = build_dataset(config.data, model_cfg=config.model, train=True, seed=config.train.seed)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=gen)[: min(num, len(ds))]
    x, y = ds.get_batch(idx)
    return x, y, f"{config.data.name} training data ({len(idx)} images)"


def _sample_batch(model, config: dict, num: int, seed: int):
    import torch

    from dispersive.generate import generate

    sc = config.get("sample", {})
    ncls = int(getattr(model, "num_classes", 0) or 0)
    y = torch.arange(num) % ncls if ncls > 0 else None
    x, spec = generate(
        model,
        num=num,
        sampler=sc.get("sampler", "heun"),
        steps=int(sc.get("steps", 25)),
        cfg_scale=float(sc.get("cfg_scale", 1.0)),
        cfg_interval=tuple(sc.get("cfg_interval", (0.0, 1.0))),
        cfg_channels=int(sc.get("cfg_channels", 0)) or None,
        options=dict(sc.get("options", {})),
        labels=y,
        path=config.get("objective", {}).get("path", "linear"),
        generator=torch.Generator().manual_seed(seed),
        # The samples are fed back as model inputs: latents stay unclamped.
        space="latent" if config.get("data", {}).get("name") == "latents" else "pixel",
    )
    return x, y, f"the model's own samples ({spec.get('method')}, {spec.get('steps')} steps)"


def run(args: argparse.Namespace) -> int:
    import torch

    from dispersive.errors import UserError
    from dispersive.eval.diagnostics import block_norms, norms_table, plot_norms
    from dispersive.train.checkpoint import load_model

    if args.num < 1:
        raise UserError("--num must be >= 1")
    model, config, step = load_model(args.ckpt, ema=not args.no_ema)
    source = None
    if args.source in ("auto", "data"):
        try:
            x0, y, source = _real_batch(config, args.num, args.seed)
        except (UserError, FileNotFoundError, KeyError, ValueError) as e:
            if args.source == "data":
                raise
            print(f"note: run data unavailable ({' '.join(str(e).split())}); using samples")
    if source is None:
        x0, y, source = _sample_batch(model, config, args.num, args.seed)

    norms = block_norms(
        model,
        x0,
        y,
        ts=args.t,
        generator=torch.Generator().manual_seed(args.seed + 1),
        path=config.get("objective", {}).get("path", "linear"),
    )
    disp = config.get("dispersive", {})
    highlight = list(disp.get("layers", [])) if float(disp.get("weight", 0) or 0) > 0 else []
    model_name = config.get("model", {}).get("name", type(model).__name__)
    title = f"{model_name}, step {step}, lambda={disp.get('weight', 0)}"
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    plot_norms(norms, outdir / "block_norms.png", title=title)
    result = {
        "checkpoint_step": step,
        "model": model_name,
        "ema": not args.no_ema,
        "source": source,
        "dispersive_layers": highlight,
        "norms": {str(t): v for t, v in norms.items()},
    }
    (outdir / "block_norms.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"Block output l2 norm (mean over {x0.shape[0]} images; {source}); {title}\n")
    print(norms_table(norms, highlight=highlight))
    print(f"\nwrote {outdir / 'block_norms.png'} and {outdir / 'block_norms.json'}")
    return 0
