"""Sampler overhead: time per image of each sampler beside its model evaluations timed alone.

For Euler, Heun and Euler-Maruyama on a small SiT (SiT-XS/4 at 28x28x1, 10 classes), the
sampler run is timed against a loop of exactly ``nfe(method, steps)`` plain model calls on the
inputs the sampler gave the model (recorded from one run: the same forwards on the same data,
with nothing else), the two alternating.
The overhead is the ratio of the two within a round, minus one: its median over rounds and a
distribution-free ~95% interval of that median (``common.median_ci``). Target: below 3 %;
the verdict is "met" / "not met" only when the whole interval lies on one side of it, "within
noise" otherwise. One thread by default: a sampler's bookkeeping is serial, and on a shared
machine a second thread mostly adds noise. With ``--cfg`` the comparison is the guided sampler
against its forwards on the doubled batch.

Usage::

    python benchmarks/sampling.py          # full run; writes the "sampling" section of
                                           # docs/benchmarks.md
    python benchmarks/sampling.py --quick  # small batch, few steps, prints only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
import common

common.ensure_importable()

import torch  # noqa: E402

from dispersive.guidance import guided  # noqa: E402
from dispersive.models import build  # noqa: E402
from dispersive.paths import get_path  # noqa: E402
from dispersive.samplers import euler, euler_maruyama, heun, nfe  # noqa: E402

METHODS = ("euler", "heun", "euler_maruyama")
TARGET = 0.03


def run(*, model_name: str, batch: int, steps: int, repeats: int, cfg_scale: float) -> list[dict]:
    torch.manual_seed(0)
    model = build(model_name, input_size=28, in_channels=1, num_classes=10).eval()
    path = get_path("linear")
    noise = torch.randn(batch, 1, 28, 28)
    y = torch.arange(batch) % 10

    def make_fn(m):
        if cfg_scale == 1.0:
            return lambda x, t: m(x, t, y)
        return guided(m, y=y, null_y=10, scale=cfg_scale)

    def make_samplers(fn, gen):
        return {
            "euler": lambda: euler(fn, noise, steps=steps),
            "heun": lambda: heun(fn, noise, steps=steps),
            "euler_maruyama": lambda: euler_maruyama(
                fn, noise, steps=steps, path=path, generator=gen
            ),
        }

    samplers = make_samplers(make_fn(model), torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        for method in METHODS:
            n = nfe(method, steps)
            # The model-only loop replays the very inputs of one sampler run (recorded once):
            # the model's speed can depend on its inputs (t, the state along the path), and a
            # fixed input measured Heun 3.5% "faster" than its own forwards (2026-12-07).
            calls: list[tuple] = []

            def recording(x, t, y_, calls: list[tuple] = calls):
                calls.append((x.clone(), t.clone(), y_.clone()))
                return model(x, t, y_)

            make_samplers(make_fn(recording), torch.Generator().manual_seed(0))[method]()
            if len(calls) != n:
                raise RuntimeError(f"{method} made {len(calls)} model calls, nfe() says {n}")

            def model_only(calls: list[tuple] = calls) -> None:
                for args in calls:
                    model(*args)

            sec = common.interleaved_times(
                {"sampler": samplers[method], "model": model_only}, repeats=repeats
            )
            rows.append(
                {
                    "method": method,
                    "nfe": n,
                    "sampler_ms_per_image": common.median_ci(
                        [1e3 * v / batch for v in sec["sampler"]]
                    ),
                    "model_ms_per_image": common.median_ci([1e3 * v / batch for v in sec["model"]]),
                    "overhead": common.median_ci(
                        [a / b - 1.0 for a, b in zip(sec["sampler"], sec["model"])]
                    ),
                }
            )
    return rows


def _below_zero_note(rows: list[dict]) -> str:
    """A sampler cannot be faster than its own forwards: an interval wholly below 0 measures a
    bias of the machine (load that differed between the two loops), not a saving."""
    low = [r["method"] for r in rows if r["overhead"][2] < 0]
    if not low:
        return ""
    return (
        f"\n\n{', '.join(low)}: the whole interval is below 0, which no sampler can do (it runs "
        "the same forwards and more); the load differed between the two loops there, so "
        "these figures carry a bias of that size. Rerun on a quiet machine."
    )


def report(rows: list[dict], *, args: argparse.Namespace, threads: int) -> str:
    table = common.markdown_table(
        ["sampler", "NFE", "sampler ms/image", "model-only ms/image", "overhead", "< 3 %"],
        [
            [
                r["method"],
                r["nfe"],
                common.fmt_ci(*r["sampler_ms_per_image"], "{:.2f}"),
                common.fmt_ci(*r["model_ms_per_image"], "{:.2f}"),
                common.fmt_ci(*(100 * v for v in r["overhead"]), "{:+.2f}", " %"),
                common.verdict(r["overhead"][1], r["overhead"][2], TARGET, below=True),
            ]
            for r in rows
        ],
    )
    guidance = f", CFG scale {args.cfg} (doubled batch)" if args.cfg != 1.0 else ""
    return (
        "## Sampling overhead\n\n"
        f"{args.model} at 28x28x1, batch {args.batch}, {args.steps} steps{guidance}; "
        f"{args.repeats} rounds, each running the sampler and the model-only loop in turn. "
        f"`benchmarks/sampling.py{' --quick' if args.quick else ''}`; "
        f"{common.machine_info(threads)}.\n"
        "Model-only = the model calls of one sampler run replayed on their recorded inputs, "
        "nothing else; "
        "overhead = sampler / model-only - 1 within a round. Figures: median over rounds "
        "(a distribution-free ~95% interval of the median); the verdict on the target (< 3 %) "
        'is "met" / "not met" only when the whole interval is on one side of it, '
        '"within noise" otherwise.\n\n' + table + _below_zero_note(rows)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small batch and few steps (smoke run)")
    p.add_argument("--model", default="SiT-XS/4")
    p.add_argument("--batch", type=int, default=None, help="images per batch")
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per sampler")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1 = none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    common.add_output_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.batch = args.batch or (8 if args.quick else 64)
    # 20 steps: the overhead is per step, so the ratio does not depend on the count, and the
    # time saved buys rounds (15: the median's interval is the 4th to the 12th value).
    args.steps = args.steps or (4 if args.quick else 20)
    args.repeats = args.repeats or (3 if args.quick else 15)
    rows = run(
        model_name=args.model,
        batch=args.batch,
        steps=args.steps,
        repeats=args.repeats,
        cfg_scale=args.cfg,
    )
    text = report(rows, args=args, threads=args.threads)
    common.publish(text, "sampling", args.output, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
