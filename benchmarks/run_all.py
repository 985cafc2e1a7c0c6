"""Run every benchmark and gather the results in ``docs/benchmarks.md`` (``make bench``).

Each benchmark is its own script that writes its own section of the report; this runs them in
turn in fresh processes (so one's memory or thread settings cannot affect the next), then times
the main job (the demo grid, ``configs/experiments/fmnist-demo.toml``, in a temporary folder)
and writes that as the section "demo".

Usage::

    python benchmarks/run_all.py                  # everything, including the demo (7 min measured)
    python benchmarks/run_all.py --skip-demo      # the benchmark scripts only
    python benchmarks/run_all.py --only loss sampling --threads 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script and as benchmarks.x
from common import DEFAULT_REPORT, REPO, machine_info, write_markdown_section

BENCHMARKS = ("loss", "train_step", "sampling", "train_throughput", "eval_speed", "cpu_models")
DEMO_GRID = REPO / "configs" / "experiments" / "fmnist-demo.toml"


def _demo(threads: int, output: Path) -> None:
    """Time the demo grid end to end (training, sampling, proxy FID, report) from scratch."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "dispersive", "experiment", str(DEMO_GRID), "--outdir", tmp,
               "--jobs", "2", "--status-every", "120"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"demo failed:\n{proc.stdout}\n{proc.stderr}")
        report = next(Path(tmp).glob("*/report.md")).read_text()
    table = [line for line in report.splitlines() if line.startswith("|")]
    results = "\n".join(table[: table.index(next(t for t in table if "| run |" in t))])
    body = "\n".join([
        "## The main job: `make demo` (baseline vs Dispersive Loss on Fashion-MNIST)",
        "",
        f"`benchmarks/run_all.py` running `dispersive experiment {DEMO_GRID.relative_to(REPO)} "
        f"--jobs 2`; {machine_info(threads)}. The environment setup and the dataset install "
        "that `make demo` does first on a fresh machine are not included (about 2-3 minutes "
        "when the packages come from a local mirror).",
        "",
        f"- wall time of the experiment: **{wall / 60:.1f} min** (target: the whole demo under "
        "20 min)",
        "",
        "Its results table from this run:",
        "",
        results,
    ])  # fmt: skip
    write_markdown_section(output, "demo", body)
    print(body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=[*BENCHMARKS, "demo"], default=None)
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="threads per benchmark (0 = default)")
    p.add_argument("--output", type=Path, default=DEFAULT_REPORT)
    args = p.parse_args(argv)
    chosen = args.only or [*BENCHMARKS, *([] if args.skip_demo else ["demo"])]
    failed = []
    for name in chosen:
        print(f"== {name}", flush=True)
        if name == "demo":
            _demo(args.threads or 2, args.output)
            continue
        cmd = [
            sys.executable,
            str(REPO / "benchmarks" / f"{name}.py"),
            "--output",
            str(args.output),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
