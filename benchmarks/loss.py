"""Forward+backward time and peak extra memory of ``dispersive_loss`` vs the authors' formula.

The authors' PyTorch formulation (InfoNCE-l2 with the diagonal, tau = 1)::

    z = z.reshape(B, -1)
    d = pdist(z) ** 2 / D                       # the B(B-1)/2 upper-triangle distances
    d = cat([d, d, zeros(B)])                   # all B^2 pairs: both triangles + the diagonal
    loss = log(mean(exp(-d / tau)))

Both run on the same float32 z (B, D) over the grid B in {4, ..., 256} x D in {1K, ..., 196K}
(issue 14, item 1), at 1 and 2 threads. Each round times one sample of each implementation,
in alternating order (a sample is several calls when one call is shorter than ~2 ms); the
speed-up of a round is authors / ours of that round, and the table gives the median over the
rounds with a 95% distribution-free interval (``common.median_ci``), so machine noise hits
both alike. Verdicts ("met" / "not met" / "within noise") compare that interval with the
target. Peak extra memory is measured in a fresh process per (implementation, B, D) for the
large z (D >= 98K; below that the resident-set granularity dominates): the rise of the
resident-memory high-water mark during one forward+backward, above the memory already holding
z, in units of z's size. A first call on the same z goes before it and the freed heap is then
returned to the system (``malloc_trim``), so kernel code paged in on first use and one-time
BLAS buffers are not counted, and every byte the measured call holds is. It includes the
gradient buffer of z (1x, needed by any implementation).

Usage::

    python benchmarks/loss.py            # full grid, 1 and 2 threads; writes the "loss"
                                         # section of docs/benchmarks.md (~8 min when quiet)
    python benchmarks/loss.py --quick    # small grid, prints only (add --output to write)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
from common import (
    DEFAULT_REPORT,
    ensure_importable,
    machine_info,
    markdown_table,
    measure_peak_extra,
    median_ci,
    peak_extra_bytes_in_child,
    verdict,
    write_markdown_section,
)

ensure_importable()

import torch  # noqa: E402

from dispersive.losses import dispersive_loss  # noqa: E402

TAU = 1.0  # the authors' code's temperature
FULL_GRID = {"B": [4, 8, 16, 32, 64, 128, 256], "D": [1024, 3136, 16384, 98304, 196608]}
QUICK_GRID = {"B": [4, 16, 64], "D": [1024, 16384]}
THREADS = (1, 2)
# Targets from the issue (speed-up >= goal): everywhere 1x, and these points more.
SPEED_TARGETS = {(32, 196608): 3.0, (256, 98304): 10.0}
MEMORY_TARGET = 2.0
MEMORY_MIN_D = 98304  # memory is measured from this D on
SAMPLE_S = 2e-3  # a timed sample lasts at least this long (several calls for small z)


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
    # Warm up on z itself first: the first call of each kernel pages in its code and sets up
    # thread pools and BLAS buffers (resident memory that is not the call's). Then hand the
    # freed heap back to the system, so that the measured call needs fresh pages for every
    # byte it holds at its peak, as in the first call.
    z = _make_z(b, dim)
    _fwd_bwd(IMPLS[impl], z)
    z.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    extra = measure_peak_extra(lambda: _fwd_bwd(IMPLS[impl], z))
    print(json.dumps({"impl": impl, "B": b, "D": dim, "extra_bytes": extra}))


# "wall": elapsed time, what a user waits for (use it on a quiet machine). "cpu": CPU time of
# this process (time.process_time), which preemption by other processes does not inflate: the
# better estimate on a loaded machine at 1 thread (at 2 threads it would be total CPU work
# incl. OpenMP spin-waiting, not latency, so runs at 2 threads always use wall time).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time_point(z: torch.Tensor, budget_s: float, min_rounds: int, max_rounds: int, clock) -> dict:
    """Interleaved rounds of both implementations on z (order alternating between rounds);
    per-round speed-ups."""
    calls = {name: (lambda fn=fn: _fwd_bwd(fn, z)) for name, fn in IMPLS.items()}
    once = {}
    for name, call in calls.items():  # warm-up, then one timed call to size the samples
        call()
        t0 = time.perf_counter()
        call()
        once[name] = time.perf_counter() - t0
    inner = {name: max(1, math.ceil(SAMPLE_S / t)) for name, t in once.items()}
    per_round = sum(inner[n] * once[n] for n in calls)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / per_round)))
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = clock()
            for _ in range(inner[name]):
                calls[name]()
            times[name].append((clock() - t0) / inner[name])
    ta, to = times["authors"], times["dispersive"]
    ratio = median_ci([a / o for a, o in zip(ta, to)])
    return {
        "speedup_of_min": min(ta) / min(to),  # noise only adds time: the least-disturbed
        "rounds": rounds,
        "t_authors_ms": 1e3 * statistics.median(ta),
        "t_ours_ms": 1e3 * statistics.median(to),
        "speedup": ratio[0],
        "speedup_lo": ratio[1],
        "speedup_hi": ratio[2],
    }


def run(grid: dict, threads: list[int], budget_s: float, memory: bool, clock: str) -> list[dict]:
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for dim in grid["D"]:
            for b in grid["B"]:
                z = _make_z(b, dim)
                with torch.no_grad():
                    va, vo = float(authors_loss(z)), float(ours_loss(z))
                target = (b, dim) in SPEED_TARGETS
                row = {"B": b, "D": dim, "threads": t, "value_rel_diff": abs(va - vo) / abs(va)}
                # CPU time only at 1 thread: at 2 it would count OpenMP's spin-waiting.
                tick = CLOCKS[clock if t == 1 else "wall"]
                row |= _time_point(z, budget_s, 5 if target else 3, 61, tick)
                row["z_bytes"] = z.numel() * z.element_size()
                if memory and dim >= MEMORY_MIN_D and t == threads[0]:
                    for name in IMPLS:
                        res = peak_extra_bytes_in_child(
                            Path(__file__), ["--child", name, str(b), str(dim)], threads=t
                        )
                        row[f"mem_{name}_x"] = res["extra_bytes"] / row["z_bytes"]
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    mem = ""
    if "mem_authors_x" in row:
        mem = f"  mem authors {row['mem_authors_x']:.2f}x ours {row['mem_dispersive_x']:.2f}x"
    return (
        f"threads={row['threads']} B={row['B']:4d} D={row['D']:6d}  "
        f"authors {row['t_authors_ms']:9.3f} ms  ours {row['t_ours_ms']:8.3f} ms  "
        f"speed-up {row['speedup']:5.2f}x ({row['speedup_lo']:.2f}-{row['speedup_hi']:.2f}, "
        f"{row['rounds']} rounds){mem}  |value diff| {row['value_rel_diff']:.1e}"
    )


def _dim_label(dim: int) -> str:
    return f"{dim:,}"


def report(
    rows: list[dict],
    *,
    threads: list[int],
    budget_s: float,
    quick: bool,
    clock: str,
    machine: str,
) -> str:
    bs = sorted({r["B"] for r in rows})
    ds = sorted({r["D"] for r in rows})
    by_key = {(r["B"], r["D"], r["threads"]): r for r in rows}
    cmd = "python benchmarks/loss.py" + (" --quick" if quick else "")
    cmd += "" if clock == "wall" else f" --clock {clock}"
    what = {
        "wall": "wall-clock times",
        "cpu": "at 1 thread CPU times of the process (`--clock cpu`: the machine was shared, "
        "and CPU time is not inflated by preemption), at 2 threads wall-clock times",
    }[clock]
    lines = [
        "## Dispersive loss: forward + backward vs the authors' formulation",
        "",
        f"`{cmd}`; {machine}; float32, tau = {TAU:g}, InfoNCE-l2 with the "
        f"diagonal; {what}. Rounds alternate the two implementations; the speed-up is the "
        "median over rounds of authors / ours in the same round, with its 95% interval in "
        f"brackets (3-61 rounds per point, about {budget_s:g} s each). Verdicts compare the "
        "whole interval with the target; `~` marks a point within noise.",
        "",
    ]
    for t in threads:
        lines += [f"Speed-up at {t} thread(s) (rows B, columns D; target >= 1x everywhere):", ""]
        table = []
        for b in bs:
            cells = [b]
            for dim in ds:
                r = by_key.get((b, dim, t))
                if r is None:
                    cells.append("")
                    continue
                v = verdict(r["speedup_lo"], r["speedup_hi"], 1.0, below=False)
                mark = {"met": "", "not met": " **below**", "within noise": " ~"}[v]
                cells.append(
                    f"{r['speedup']:.2f}x ({r['speedup_lo']:.2f}-{r['speedup_hi']:.2f}){mark}"
                )
            table.append(cells)
        lines += [markdown_table(["B \\ D"] + [_dim_label(d) for d in ds], table), ""]
    verdicts = {"met": 0, "not met": 0, "within noise": 0}
    for r in rows:
        verdicts[verdict(r["speedup_lo"], r["speedup_hi"], 1.0, below=False)] += 1
    lines += [
        f">= 1x: met at {verdicts['met']} of {len(rows)} points, within noise at "
        f"{verdicts['within noise']}, not met at {verdicts['not met']}.",
        "",
        "Targets:",
        "",
    ]
    for (b, dim), goal in SPEED_TARGETS.items():
        for t in threads:
            r = by_key.get((b, dim, t))
            if r is not None:
                v = verdict(r["speedup_lo"], r["speedup_hi"], goal, below=False)
                lines.append(
                    f"- B={b}, D={dim}, {t} thread(s): {r['speedup']:.2f}x "
                    f"({r['speedup_lo']:.2f}-{r['speedup_hi']:.2f}) vs >= {goal:g}x: {v}"
                )
    mem_rows = [r for r in rows if "mem_authors_x" in r]
    if mem_rows:
        worst = max(r["mem_dispersive_x"] for r in mem_rows)
        v = "met" if worst <= MEMORY_TARGET else "not met"
        lines.append(
            f"- peak extra memory of ours (D >= {_dim_label(MEMORY_MIN_D)}): at most "
            f"{worst:.2f}x z vs <= {MEMORY_TARGET:g}x: {v}"
        )
    max_diff = max(r["value_rel_diff"] for r in rows)
    lines += ["", f"Largest relative difference between the two loss values: {max_diff:.1e}."]
    lines += [
        "",
        "Median times per call (ms), the ratio of the two fastest rounds (noise only adds "
        "time, so on a loaded machine this is the least disturbed comparison) and peak extra "
        "memory (x z):",
        "",
    ]
    headers = ["threads", "B", "D", "authors (ms)", "ours (ms)", "speed-up (95% interval)"]
    headers += ["ratio of minima"]
    headers += ["mem authors", "mem ours"]
    table = []
    for r in rows:
        table.append(
            [
                r["threads"],
                r["B"],
                _dim_label(r["D"]),
                f"{r['t_authors_ms']:.3g}",
                f"{r['t_ours_ms']:.3g}",
                f"{r['speedup']:.2f}x ({r['speedup_lo']:.2f}-{r['speedup_hi']:.2f})",
                f"{r['speedup_of_min']:.2f}x" if "speedup_of_min" in r else "",
                f"{r['mem_authors_x']:.2f}" if "mem_authors_x" in r else "",
                f"{r['mem_dispersive_x']:.2f}" if "mem_dispersive_x" in r else "",
            ]
        )
    lines += ["<details><summary>all points</summary>", "", markdown_table(headers, table)]
    lines += ["", "</details>"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, short budget (smoke run)")
    p.add_argument("--threads", type=int, nargs="+", default=list(THREADS))
    p.add_argument(
        "--budget", type=float, default=None, help="seconds of timing per point (default 2)"
    )
    p.add_argument("--B", type=int, nargs="+", default=None, help="only these batch sizes")
    p.add_argument("--D", type=int, nargs="+", default=None, help="only these dims")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="wall (default) or cpu time"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown file to update (default {DEFAULT_REPORT} unless --quick)",
    )
    p.add_argument("--json", type=Path, default=None, help="also save the measurements here")
    p.add_argument(
        "--from-json", type=Path, default=None, help="only write the report of saved measurements"
    )
    p.add_argument("--child", nargs=3, metavar=("IMPL", "B", "D"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads[0])
        impl, b, dim = args.child
        child_main(impl, int(b), int(dim))
        return 0
    if args.from_json:
        meta = json.loads(args.from_json.read_text())
    else:
        grid = dict(QUICK_GRID if args.quick else FULL_GRID)
        grid |= {k: v for k, v in (("B", args.B), ("D", args.D)) if v}
        budget = args.budget or (0.5 if args.quick else 2.0)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        machine = machine_info(args.threads[-1])
        rows = run(grid, args.threads, budget, memory=not args.no_memory, clock=args.clock)
        meta = {
            "rows": rows,
            "threads": args.threads,
            "budget": budget,
            "quick": args.quick or bool(args.B or args.D),  # a partial grid: prints only
            "clock": args.clock,
            "machine": machine,
            "note": f"Wall time of this run: {(time.perf_counter() - t0) / 60:.1f} min; "
            f"1-minute load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at "
            f"the end, on {os.cpu_count()} logical CPUs (above the thread count, other "
            "processes shared the cores: timings, above all at 2 threads, then measure the "
            "scheduler as much as the code).",
        }
        if args.json:
            args.json.write_text(json.dumps(meta, indent=1))
    rows = meta["rows"]
    text = report(
        rows,
        threads=meta["threads"],
        budget_s=meta["budget"],
        quick=meta["quick"],
        clock=meta["clock"],
        machine=meta["machine"],
    )
    text += "\n\n" + meta["note"]
    print()
    print(text)
    output = args.output or (None if meta["quick"] else DEFAULT_REPORT)
    if output is not None:
        write_markdown_section(output, "loss", text)
        print(f"\nwrote section 'loss' of {output}")
    return 0 if all(math.isfinite(r["speedup"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
