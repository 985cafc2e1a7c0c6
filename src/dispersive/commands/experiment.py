"""``dispersive experiment``: run a grid of training runs and write its tables, figures and report.

    dispersive experiment configs/experiments/fmnist-variants.toml --jobs 2
    dispersive experiment A.toml B.toml C.toml --jobs 2  # one queue; shared runs trained once
    dispersive experiment GRID.toml --dry-run            # resolve and check every run, then stop
    dispersive experiment GRID.toml --report-only        # rebuild the report from what is there
    dispersive experiment GRID.toml --arms 'weight=0.25*' --seeds 0   # some runs first
    dispersive experiment GRID.toml --set train.steps=200 --outdir /tmp/try   # a quick variant

Finished runs are skipped and interrupted ones resumed, so the same command continues a grid
across sessions (a larger ``train.steps`` extends finished runs). The report is
``EXP_DIR/report.md`` (``EXP_DIR = outdir / name``), written as soon as that grid's runs are
done; the path of the last grid's report is the last line printed.
"""

from __future__ import annotations

import argparse
import sys

from dispersive.commands import add_set_argument

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "grids", nargs="+", metavar="GRID", help="grid TOML file(s) (configs/experiments/)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (default: CPUs // jobs)"
    )
    p.add_argument("--outdir", default=None, help="parent folder (replaces [experiment] outdir)")
    add_set_argument(
        p,
        "override a config key in every run, after the grid's own values (TOML literal)",
    )
    p.add_argument("--nproc", type=int, default=None, help="processes per run (torchrun)")
    p.add_argument(
        "--dry-run", action="store_true", help="resolve and check every run's config, then stop"
    )
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument(
        "--reverse",
        action="store_true",
        help="take the runs in reverse order: a second process on the same grids (other cores, "
        "another machine on a shared disk) then meets the first in the middle",
    )
    p.add_argument(
        "--arms",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="run only the arms whose name matches one of these shell patterns (quoted), e.g. "
        "'weight=0.25*'; the others are left as they are (the report shows what is on disk)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[], metavar="N", help="run only these seeds"
    )
    p.add_argument(
        "--status-every", type=float, default=60.0, help="seconds between progress lines"
    )
    p.add_argument("--final-eval-ref", default=None, help="replaces [final_eval] ref")
    p.add_argument(
        "--final-eval-inception-weights",
        default=None,
        help="replaces [final_eval] inception_weights",
    )


def _load(path: str, args: argparse.Namespace):
    import dataclasses

    from dispersive.experiments.grid import load_grid

    grid = load_grid(path, outdir=args.outdir, overrides=args.overrides)
    if args.nproc is not None:
        grid = dataclasses.replace(grid, nproc=args.nproc)
    if args.final_eval_ref or args.final_eval_inception_weights:
        evals = tuple(
            dataclasses.replace(
                fe,
                ref=args.final_eval_ref or fe.ref,
                inception_weights=args.final_eval_inception_weights or fe.inception_weights,
            )
            for fe in grid.final_evals
        )
        grid = dataclasses.replace(grid, final_evals=evals)
    return grid


def _dry_run(grid, configs, keep) -> None:
    from dispersive.experiments.runner import run_status

    print(f"experiment {grid.name}: {len(grid.runs)} runs in {grid.exp_dir}")
    for r in grid.runs:
        config = configs[r.name]
        st = run_status(grid, r, config.train.steps)
        state = st.state if keep(r) or st.state == "done" else f"{st.state} (not selected)"
        d = config.dispersive
        disp = (
            "off"
            if d.weight == 0
            else f"{d.variant} weight {d.weight} tau {d.tau} {list(d.layers)}"
        )
        print(
            f"  {r.arm.name} (seed {r.seed}): {state}, {config.model.name}, "
            f"{config.train.steps} steps, batch {config.train.global_batch}; dispersive {disp}; "
            f"folder {r.run_dir}"
        )


def run(args: argparse.Namespace) -> int:
    from dispersive.experiments.report import write_report
    from dispersive.experiments.runner import check_grid, run_grids, select_runs

    grids = [_load(p, args) for p in args.grids]
    configs = {g.path: check_grid(g) for g in grids}
    keep = select_runs(grids, arms=args.arms, seeds=args.seeds)
    if args.dry_run:
        for g in grids:
            _dry_run(g, configs[g.path], keep)
        print("# dry run: every config resolved and checked; nothing was run", file=sys.stderr)
        return 0

    argv = sys.argv[1:]
    command = ["dispersive", *argv] if argv[:1] == ["experiment"] else None
    reports = {}

    def report(grid) -> None:
        reports[grid.path] = write_report(grid, configs[grid.path], command=command)
        print(f"report of {grid.name}: {reports[grid.path]}", flush=True)

    failures = []
    if not args.report_only:
        failures = run_grids(
            grids, jobs=args.jobs, threads=args.threads, status_every=args.status_every,
            on_grid_done=report, reverse=args.reverse, keep=keep, configs=configs,
        )  # fmt: skip
    for g in grids:  # every report, also of grids with failed runs (those show as missing)
        if g.path not in reports or failures:
            report(g)
    if failures:
        print(f"{len(failures)} run(s) failed:", file=sys.stderr)
        for r, err in failures:
            print(f"  {r.arm.name} (seed {r.seed}): {err} (log: {r.run_dir / 'log.txt'})",
                  file=sys.stderr)  # fmt: skip
    print(f"report: {reports[grids[-1].path]}")
    return 1 if failures else 0
