"""Forward+backward time of ``DispersiveLoss`` on grouped activations (the fused group paths).

Times ``DispersiveLoss(variant=..., group_size=g)(z).backward()`` on float32 z at the sizes of
docs/benchmarks.md's "The covariance variant, fused" table: the study's ``blocks.0`` of
SiT-XS/4 and SiT-T/4 (64 x 49 x 64 / 128 in groups of 16), 256 x 1,024 in groups of 16, and
two single large groups; at 1 and 2 threads. Each figure is the median of a fixed number of
calls after 3 warm-up calls, with its distribution-free 95% interval (``common.median_ci``).
To compare two versions of the loss, run the same command in both checkouts.

Usage::

    python benchmarks/grouped_loss.py                       # covariance (the table's variant)
    python benchmarks/grouped_loss.py --variant infonce_l2  # any variant
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
from common import ensure_importable, machine_info, markdown_table, median_ci  # noqa: E402

ensure_importable()

import torch  # noqa: E402

from dispersive.losses import VARIANTS, DispersiveLoss  # noqa: E402

# (shape of z, group size (0: one group), calls): fewer calls where one call is long.
CASES = (
    ((64, 49, 64), 16, 300),
    ((64, 49, 128), 16, 200),
    ((256, 1024), 16, 50),
    ((32, 196608), 0, 15),
    ((64, 98304), 0, 10),
)


def time_case(variant: str, shape: tuple[int, ...], group: int, calls: int) -> list[float]:
    """Seconds per fwd+bwd call of the loss on z = N(2, 1) of ``shape``."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(*shape, generator=gen) + 2).requires_grad_()
    loss = DispersiveLoss(variant=variant, group_size=group)

    def call() -> None:
        z.grad = None
        loss(z).backward()

    for _ in range(3):
        call()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=VARIANTS, default="covariance")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape, group, calls in CASES:
            mid, lo, hi = median_ci(time_case(args.variant, shape, group, calls))
            size = " x ".join(f"{n:,}" for n in shape)
            groups = f"{shape[0] // group} x {group}" if group else "one group"
            rows.append(
                [threads, size, groups, calls, f"{1e3 * mid:.3f} ({1e3 * lo:.3f}-{1e3 * hi:.3f})"]
            )
    command = f"`python benchmarks/grouped_loss.py --variant {args.variant}`"
    print(f"{command}; {machine_info(max(args.threads))}")
    print()
    print(markdown_table(["threads", "z", "groups", "calls", "fwd+bwd ms (95% CI)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
