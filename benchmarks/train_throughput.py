"""Training throughput on CPU: images/s of whole training steps and the share spent on data.

Runs the real training loop (``dispersive.train.loop.train``) for a few steps per setting in a
temporary run directory and reads its ``metrics.jsonl``: ``images_per_s`` (global batch x
steps / wall time of the logging interval, everything included: data, forward, backward,
optimizer, EMA) and ``data_wait_frac`` (time fetching and moving batches / wall time; target
under 5%). The first logging interval is warm-up and is dropped; the medians of the others are
reported.

Settings:

- the Fashion-MNIST preset (``configs/fashion-mnist.toml``, SiT-XS/4 at its batch of 64) and
  its dispersive arm (``configs/fashion-mnist-disp.toml``): the overhead of the regulariser;
- SiT-S/2 (paper Table 8: 33M parameters, 256 tokens) on synthetic 32x32x4 "latents", the
  ImageNet-256 latent shape, with the dispersive term on one block.

Usage::

    python benchmarks/train_throughput.py          # writes "train_throughput" in docs/benchmarks.md
    python benchmarks/train_throughput.py --quick  # small batches, few steps, prints only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
import common

common.ensure_importable()

import torch  # noqa: E402

from dispersive.train.config import load_config  # noqa: E402
from dispersive.train.logging import read_metrics  # noqa: E402
from dispersive.train.loop import train  # noqa: E402

CONFIGS = common.REPO / "configs"
SIT_S2 = [
    *common.SIT_S2_LATENTS,
    "dispersive.weight=0.5",
    'dispersive.layers=["blocks.2"]',  # paper: block 3 of 12
]

# name -> (config file, overrides, (batch, steps, log_every) full, same quick)
SETTINGS = {
    "Fashion-MNIST preset (SiT-XS/4), baseline": (
        "fashion-mnist.toml", [], (64, 48, 8), (32, 6, 2),
    ),
    "Fashion-MNIST preset (SiT-XS/4), dispersive": (
        "fashion-mnist-disp.toml", [], (64, 48, 8), (32, 6, 2),
    ),
    "SiT-S/2, 32x32x4 synthetic latents, dispersive": (
        "tiny.toml", SIT_S2, (32, 8, 2), (4, 4, 2),
    ),
}  # fmt: skip


def measure(name: str, quick: bool, threads: int) -> dict:
    file, overrides, full, small = SETTINGS[name]
    batch, steps, log_every = small if quick else full
    sets = [
        *overrides,
        f"train.global_batch={batch}",
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        f"train.ckpt_every={10 * steps}",  # only the final checkpoint
        "eval.every=0",
        'train.device="cpu"',
    ]
    cfg = load_config(CONFIGS / file, sets)
    if cfg.data.name == "fashion-mnist":
        from dispersive.data.datasets import build_dataset
        from dispersive.errors import UserError

        try:
            build_dataset(cfg.data, model_cfg=cfg.model)
        except UserError:  # no Fashion-MNIST files here: same shapes, synthetic pixels
            cfg = load_config(CONFIGS / file, [*sets, 'data.name="synthetic"'])
            name += " (synthetic pixels)"
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, run_dir=Path(tmp) / "run", progress=False)
        records = [r for r in read_metrics(Path(tmp) / "run") if "images_per_s" in r][1:]
    return {
        "name": name,
        "batch": batch,
        "steps": steps,
        "images_per_s": statistics.median(r["images_per_s"] for r in records),
        "step_s": statistics.median(1.0 / r["steps_per_s"] for r in records),
        "data_wait": statistics.median(r["data_wait_frac"] for r in records),
    }


def report(rows: list[dict], *, threads: int, quick: bool) -> str:
    table = common.markdown_table(
        ["setting", "global batch", "step (s)", "images/s", "data wait"],
        [
            [
                r["name"],
                r["batch"],
                f"{r['step_s']:.3f}",
                f"{r['images_per_s']:.1f}",
                f"{100 * r['data_wait']:.2f}%",
            ]
            for r in rows
        ],
    )
    worst = max(r["data_wait"] for r in rows)
    verdict = "meets" if worst < 0.05 else "MISSES"
    return (
        "## Training throughput (CPU)\n\n"
        f"`benchmarks/train_throughput.py{' --quick' if quick else ''}`; "
        f"{common.machine_info(threads)}; "
        "float32, one process. Whole training steps (data, forward, backward, AdamW, EMA) from "
        "the loop's own `metrics.jsonl`, medians over logging intervals after the first. "
        f"Data wait is the share of wall time spent fetching batches; the largest is "
        f"{100 * worst:.2f}%, which {verdict} the 5% target.\n\n" + table
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small batches and few steps (smoke run)")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    common.add_output_argument(p)
    args = p.parse_args(argv)
    rows = []
    for name in SETTINGS:
        rows.append(measure(name, args.quick, args.threads))
        r = rows[-1]
        print(
            f"{r['name']}: {r['images_per_s']:.1f} images/s, {r['step_s']:.3f} s/step, "
            f"data wait {100 * r['data_wait']:.2f}%",
            flush=True,
        )
    text = report(rows, threads=args.threads, quick=args.quick)
    common.publish(text, "train_throughput", args.output, quick=args.quick)
    return 0 if all(r["data_wait"] < 0.05 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
