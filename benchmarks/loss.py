"""Forward+backward time and peak extra memory of ``dispersive_loss`` vs the authors' formula.

The authors' PyTorch formulation (InfoNCE-l2 with the diagonal, tau = 1)::

    z = z.reshape(B, -1)
    d = pdist(z) ** 2 / D                       # the B(B-1)/2 upper-triangle distances
    d = cat([d, d, zeros(B)])                   # all B^2 pairs: both triangles + the diagonal
    loss = log(mean(exp(-d / tau)))

Both are run on the same float32 z (B, D), interleaved, medians over ``--repeats`` runs; the
speed-up is the ratio of the two medians of the same run. Peak extra memory is measured in a
fresh process per (implementation, B, D): the rise of the resident-memory high-water mark during
one forward+backward, above the memory already holding z. It includes the gradient buffer of
z (one size of z, needed by any implementation).

Usage::

    python benchmarks/loss.py          # full grid; writes the "loss" section of docs/benchmarks.md
    python benchmarks/loss.py --quick  # tiny grid, prints only (add --output to write)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import (  # type: ignore[no-redef]
        DEFAULT_REPORT,
        ensure_importable,
        interleaved_medians,
        machine_info,
        markdown_table,
        measure_peak_extra,
        peak_extra_bytes_in_child,
        write_markdown_section,
    )
else:
    from .common import (
        DEFAULT_REPORT,
        ensure_importable,
        interleaved_medians,
        machine_info,
        markdown_table,
        measure_peak_extra,
        peak_extra_bytes_in_child,
        write_markdown_section,
    )

ensure_importable()

import torch  # noqa: E402

from dispersive.losses import dispersive_loss  # noqa: E402

TAU = 1.0  # the authors' code's temperature
FULL_GRID = {"B": [32, 64, 128, 256], "D": [98304, 196608]}
QUICK_GRID = {"B": [16, 64], "D": [16384]}
# Targets from the issue (measured, not asserted): speed-up at (B, D), memory relative to z.
SPEED_TARGETS = {(32, 196608): 3.0, (256, 98304): 8.0}
MEMORY_TARGET = 2.0


def authors_loss(z: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """The authors' PyTorch formulation (see the module docstring)."""
    b = z.shape[0]
    z = z.reshape(b, -1)
    d = torch.nn.functional.pdist(z, p=2).pow(2) / z.shape[1]
    d = torch.cat([d, d, torch.zeros(b, dtype=d.dtype, device=d.device)])
    return torch.log(torch.mean(torch.exp(-d / tau)))


def ours_loss(z: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    return dispersive_loss(z, tau=tau)


IMPLS = {"authors": authors_loss, "dispersive": ours_loss}


def _fwd_bwd(fn, z: torch.Tensor) -> None:
    z.grad = None
    fn(z).backward()


def _make_z(b: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, dim, generator=g).requires_grad_(True)


def child_main(impl: str, b: int, dim: int) -> None:
    """Fresh-process memory measurement of one forward+backward; prints one JSON line."""
    # Warm up on a tiny batch first: the first call loads kernels and thread pools, memory that
    # is not the implementation's.
    _fwd_bwd(IMPLS[impl], _make_z(4, 64))
    z = _make_z(b, dim)
    extra = measure_peak_extra(lambda: _fwd_bwd(IMPLS[impl], z))
    print(json.dumps({"impl": impl, "B": b, "D": dim, "extra_bytes": extra}))


def run(grid: dict, repeats: int, threads: int, memory: bool) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for dim in grid["D"]:
        for b in grid["B"]:
            z = _make_z(b, dim)
            with torch.no_grad():
                va, vo = float(authors_loss(z)), float(ours_loss(z))
            times = interleaved_medians(
                {name: (lambda fn=fn, z=z: _fwd_bwd(fn, z)) for name, fn in IMPLS.items()},
                repeats=repeats,
            )
            row = {
                "B": b,
                "D": dim,
                "t_authors_ms": 1e3 * times["authors"],
                "t_ours_ms": 1e3 * times["dispersive"],
                "speedup": times["authors"] / times["dispersive"],
                "value_rel_diff": abs(va - vo) / abs(va),
                "z_bytes": z.numel() * z.element_size(),
            }
            if memory:
                for name in IMPLS:
                    res = peak_extra_bytes_in_child(
                        Path(__file__), ["--child", name, str(b), str(dim)], threads=threads
                    )
                    row[f"mem_{name}_x"] = res["extra_bytes"] / row["z_bytes"]
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    mem = ""
    if "mem_authors_x" in row:
        mem = f"  mem authors {row['mem_authors_x']:.2f}x  ours {row['mem_dispersive_x']:.2f}x"
    return (
        f"B={row['B']:4d} D={row['D']:6d}  authors {row['t_authors_ms']:9.2f} ms  "
        f"ours {row['t_ours_ms']:8.2f} ms  speed-up {row['speedup']:5.2f}x{mem}  "
        f"|value diff| {row['value_rel_diff']:.1e}"
    )


def report(rows: list[dict], *, repeats: int, threads: int, quick: bool) -> str:
    has_mem = "mem_authors_x" in rows[0]
    headers = ["B", "D", "authors (ms)", "dispersive_loss (ms)", "speed-up"]
    if has_mem:
        headers += ["peak extra mem authors (x z)", "peak extra mem ours (x z)"]
    table_rows = []
    for r in rows:
        cells = [
            r["B"],
            r["D"],
            f"{r['t_authors_ms']:.1f}",
            f"{r['t_ours_ms']:.1f}",
            f"{r['speedup']:.2f}x",
        ]
        if has_mem:
            cells += [f"{r['mem_authors_x']:.2f}", f"{r['mem_dispersive_x']:.2f}"]
        table_rows.append(cells)
    targets = []
    by_key = {(r["B"], r["D"]): r for r in rows}
    for (b, dim), goal in SPEED_TARGETS.items():
        if (b, dim) in by_key:
            got = by_key[(b, dim)]["speedup"]
            targets.append(f"B={b}, D={dim}: speed-up {got:.2f}x (target >= {goal:g}x)")
    if has_mem:
        worst = max(r["mem_dispersive_x"] for r in rows)
        targets.append(f"peak extra memory of ours: at most {worst:.2f}x z (target <= 2x)")
    max_diff = max(r["value_rel_diff"] for r in rows)
    lines = [
        "## Dispersive loss: forward + backward vs the authors' formulation",
        "",
        f"`benchmarks/loss.py{' --quick' if quick else ''}`; {machine_info(threads)}; float32, "
        f"tau = {TAU:g}, InfoNCE-l2 with the diagonal; median of {repeats} interleaved runs; "
        "speed-up = authors / ours from the same run. Peak extra memory: rise of the resident "
        "high-water mark during one forward+backward in a fresh process, in units of the size "
        "of z, including z's gradient buffer (1x).",
        "",
        markdown_table(headers, table_rows),
        "",
        f"Largest relative difference between the two loss values: {max_diff:.1e}.",
    ]
    if targets:
        lines += ["", "Targets (measured, not asserted):", ""] + [f"- {t}" for t in targets]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid and few repeats (smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown file to update (default {DEFAULT_REPORT} unless --quick)",
    )
    p.add_argument("--child", nargs=3, metavar=("IMPL", "B", "D"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        impl, b, dim = args.child
        child_main(impl, int(b), int(dim))
        return 0
    grid = QUICK_GRID if args.quick else FULL_GRID
    repeats = args.repeats or (3 if args.quick else 5)
    rows = run(grid, repeats, args.threads, memory=not args.no_memory)
    text = report(rows, repeats=repeats, threads=args.threads, quick=args.quick)
    print()
    print(text)
    output = args.output or (None if args.quick else DEFAULT_REPORT)
    if output is not None:
        write_markdown_section(output, "loss", text)
        print(f"\nwrote section 'loss' of {output}")
    return 0 if all(math.isfinite(r["speedup"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
