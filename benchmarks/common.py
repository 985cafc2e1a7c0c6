"""Small shared helpers for the benchmarks: timing, peak memory, and the markdown report.

- :func:`interleaved_medians`: wall-clock medians of several functions run in interleaved
  order, so that machine noise (other processes, thermal state) hits all of them alike and the
  ratios computed from one run are meaningful. :func:`interleaved_times` returns every sample.
- :func:`median_ci` and :func:`verdict`: a distribution-free confidence interval of a median
  (e.g. of per-round ratios), and a target verdict that is only "met" / "not met" when that
  whole interval lies on one side of the target ("within noise" otherwise).
- :func:`peak_extra_bytes_in_child`: peak resident memory added by one call, measured in a
  fresh Python process (CPU-friendly: no CUDA allocator statistics needed). The child resets the
  kernel's high-water mark (``/proc/self/clear_refs``) after its setup and reads ``VmHWM``.
- :func:`write_markdown_section`: replace (or append) the text between
  ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in a shared markdown file, so several
  benchmarks can write their own section of ``docs/benchmarks.md``; :func:`add_output_argument`
  and :func:`publish`: every benchmark's ``--output`` option and where its section goes.
"""

from __future__ import annotations

import argparse
import json
import math
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
# `--set` overrides: SiT-S/2 (paper Table 8, 33M parameters, 256 tokens) on synthetic
# 32x32x4 "latents", the ImageNet-256 latent shape
SIT_S2_LATENTS = [
    'model.name="SiT-S/2"',
    "model.input_size=32",
    "model.in_channels=4",
    "model.num_classes=1000",
    'data.name="synthetic"',
    "data.synthetic_size=256",
]


def ensure_importable() -> None:
    """Make ``import dispersive`` work from a source checkout that is not pip-installed."""
    try:
        import dispersive  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleaved_times(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times in seconds of each function over ``repeats`` rounds, runs interleaved (A B A B
    ..., the order reversed every other round so neither always runs first). Element r of every
    list comes from round r, so per-round ratios pair runs that were close in time."""
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
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time in seconds of each function (see :func:`interleaved_times`)."""
    times = interleaved_times(fns, repeats=repeats, warmup=warmup)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------
# Noise: the spread of a median, and verdicts that stand outside it
# --------------------------------------------------------------------------------------------


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(median, lo, hi): the median of ``values`` and a distribution-free confidence interval.

    The interval is [x_(k), x_(n+1-k)] of the sorted values, with the largest k whose coverage
    1 - 2 P(Binomial(n, 1/2) < k) is still >= ``level`` (no assumption about the noise's shape,
    which on a shared machine is skewed). With fewer than 6 values even the full range covers
    less than 95%; the range is returned then (coverage 1 - 2^(1-n)).
    """
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    k = 1
    while k < n // 2 and 1 - 2 * _binom_cdf(k + 1, n) >= level:  # coverage of k + 1
        k += 1
    return statistics.median(xs), xs[k - 1], xs[n - k]


def _binom_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k - 1) (the probability that fewer than k values lie below the
    median)."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


def verdict(lo: float, hi: float, target: float, *, below: bool) -> str:
    """ "met", "not met" or "within noise" for the target ``x < target`` (``below=True``) or
    ``x >= target`` (``below=False``), given the interval [lo, hi] of x."""
    good_lo, good_hi = (hi < target, lo >= target) if below else (lo >= target, hi < target)
    if good_lo:
        return "met"
    if good_hi:
        return "not met"
    return "within noise"


def fmt_ci(mid: float, lo: float, hi: float, fmt: str = "{:.1f}", unit: str = "") -> str:
    """ "mid (lo to hi)unit", e.g. "72.4 (70.1 to 75.0)%"."""
    return f"{fmt.format(mid)}{unit} ({fmt.format(lo)} to {fmt.format(hi)}{unit})"


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
    # The load says how busy the machine was (a shared machine's timings are noisy).
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    return (
        f"torch {torch.__version__}, {cpu}, {threads} thread(s), "
        f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"{load}"
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


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """``--output FILE``: the markdown file whose section the benchmark rewrites."""
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown file to update (default {DEFAULT_REPORT} unless --quick)",
    )


def publish(text: str, section: str, output: Path | None, *, quick: bool) -> None:
    """Print ``text`` and write it as section ``section`` of ``output``; without ``output``, of
    the default report, except for a quick (smoke) run, which only prints."""
    print(f"\n{text}", flush=True)
    output = output or (None if quick else DEFAULT_REPORT)
    if output is not None:
        write_markdown_section(output, section, text)
        print(f"\nwrote section '{section}' of {output}")


# --------------------------------------------------------------------------------------------
# The CPU's fp32 FMA peak: a ceiling no kernel can pass
# --------------------------------------------------------------------------------------------

# A chain of dependent register-register adds (x += x) retires one add per cycle on every x86-64
# core, so adds / s is the core's clock while it runs (turbo included, which the nominal "cpu
# MHz" of a VM is not). Not add-immediate: Intel's Golden Cove cores (Sapphire Rapids) fold
# chained immediate adds at rename, several per cycle (measured here: 19.5 "GHz" on a 2.6 GHz
# Xeon whose register chain gives 4.0).
# Many short runs (~3 ms each) and the best of them: a run that was descheduled only looks
# slower, and on a busy machine only short runs fit between two preemptions.
_CLOCK_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    unsigned long x = 1;
    double best = 0;
    for (int r = 0; r < %d; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (unsigned long i = 0; i < %dUL; i++)
            __asm__ volatile("add %%0, %%0\n\tadd %%0, %%0\n\tadd %%0, %%0\n\tadd %%0, %%0\n\t"
                             "add %%0, %%0\n\tadd %%0, %%0\n\tadd %%0, %%0\n\tadd %%0, %%0"
                             : "+r"(x));
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
        double ghz = 8.0 * %d / s / 1e9;
        if (ghz > best) best = ghz;
    }
    printf("%%.6f %%lu\n", best, x);
    return 0;
}
"""


def _nominal_ghz() -> float:
    mhz = [
        float(line.split(":", 1)[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("cpu MHz")
    ]
    return max(mhz) / 1e3 if mhz else 0.0


def measured_clock_ghz(repeats: int = 300, iters: int = 1_000_000) -> tuple[float, str]:
    """(GHz, how): the core clock, for a ceiling (an over-estimate is safe, an under-estimate
    is not): the larger of the best of ``repeats`` dependent-add loops of ``iters`` x 8 adds
    (compiled with the system's C compiler) and the nominal "cpu MHz" of /proc/cpuinfo. Only
    the nominal clock without a C compiler or on non-x86 CPUs."""
    import shutil
    import tempfile

    nominal = _nominal_ghz()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc and platform.machine() in ("x86_64", "AMD64"):
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = Path(tmp) / "clock.c", Path(tmp) / "clock"
            src.write_text(_CLOCK_C % (repeats, iters, iters))
            built = subprocess.run([cc, "-O1", "-o", str(exe), str(src)], capture_output=True)
            if built.returncode == 0:
                out = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
                ghz = float(out.stdout.split()[0])
                how = f"measured: best of {repeats} dependent-add loops; nominal {nominal:.2f}"
                return max(ghz, nominal), how
    return nominal, "nominal (/proc/cpuinfo cpu MHz; no C compiler to measure it)"


def fp32_flops_per_cycle() -> tuple[int, str]:
    """(FLOP/cycle/core, how) of fp32 FMA from the CPU flags, assuming two FMA pipes per core
    (every x86 server core since Haswell / Zen 2; an upper bound for others, so still a
    ceiling): AVX-512F 2 x 16 lanes x 2, AVX2+FMA 2 x 8 x 2, else SSE 2 x 4 x 2 (mul + add)."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "avx512f" in flags:
        return 64, "avx512f: 2 FMA x 16 fp32 lanes x 2"
    if "avx2" in flags and "fma" in flags:
        return 32, "avx2+fma: 2 FMA x 8 fp32 lanes x 2"
    return 16, "sse: 2 x 4 fp32 lanes x 2"


def fma_peak_gflops(threads: int) -> dict:
    """The fp32 peak of ``threads`` cores (capped at the CPUs this process may use)."""
    cores = min(threads, len(os.sched_getaffinity(0)))
    fpc, fpc_how = fp32_flops_per_cycle()
    ghz, ghz_how = measured_clock_ghz()
    return {
        "gflops": cores * fpc * ghz,
        "cores": cores,
        "flops_per_cycle": fpc,
        "flops_per_cycle_how": fpc_how,
        "ghz": ghz,
        "ghz_how": ghz_how,
    }
