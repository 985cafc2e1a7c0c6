"""Small shared helpers for the benchmarks: timing, peak memory, and the markdown report.

- :func:`interleaved_medians`: wall-clock medians of several functions run in interleaved
  order, so that machine noise (other processes, thermal state) hits all of them alike and the
  ratios computed from one run are meaningful.
- :func:`peak_extra_bytes_in_child`: peak resident memory added by one call, measured in a
  fresh Python process (CPU-friendly: no CUDA allocator statistics needed). The child resets the
  kernel's high-water mark (``/proc/self/clear_refs``) after its setup and reads ``VmHWM``.
- :func:`write_markdown_section`: replace (or append) the text between
  ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in a shared markdown file, so several
  benchmarks can write their own section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REPORT = REPO / "docs" / "benchmarks.md"


def ensure_importable() -> None:
    """Make ``import dispersive`` work from a source checkout that is not pip-installed."""
    try:
        import dispersive  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time in seconds of each function, runs interleaved (A B A B ..., the order
    reversed every other round so neither always runs first)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux >= 4.0); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def measure_peak_extra(fn: Callable[[], object]) -> int:
    """Peak resident bytes above the current level while ``fn`` runs (call in a fresh process:
    memory that the allocator kept from earlier work would hide new allocations)."""
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs is not writable)")
    base = current_rss_bytes()
    fn()
    return peak_rss_bytes() - base


def peak_extra_bytes_in_child(script: Path, args: Sequence[str], *, threads: int) -> dict:
    """Run ``python script *args`` in a fresh process and return the JSON it prints last."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed ({' '.join(args)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine_info(threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"torch {torch.__version__}, {cpu}, {threads} thread(s), "
        f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` between the ``name`` markers of ``path`` (created or appended if missing)."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name must be [A-Za-z0-9_.-]+; got {name!r}")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
