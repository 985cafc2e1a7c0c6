"""``dispersive train``: train from a TOML config, or continue a run with ``--resume``.

    dispersive train CONFIG [--set key=value ...] [--outdir DIR] [--dry-run]
    dispersive train --resume RUN_DIR [--set key=value ...]

Also ``python -m dispersive train ...`` and ``torchrun --nproc_per_node=N -m dispersive train ...``
(one process per device; the global batch is divided across them). A ``--set`` value is a TOML
literal: ``--set train.steps=2000 'data.path="/data/fm"' 'dispersive.layers=["blocks.2"]'``.

The run directory is ``train.outdir / train.run_name`` (the run name defaults to the config
file's name). The resolved config is printed and saved as ``RUN_DIR/config.toml`` before step 0;
``--dry-run`` prints it, checks the model against it (on the meta device: no memory, no
weights) and stops without writing anything. With ``--resume`` the run's saved config is used
and ``--set`` overrides it (e.g. a larger ``train.steps``).

If a rank fails it prints ``[rank r] training failed: ...`` and exits non-zero; torchrun then
stops the other ranks. Without torchrun's agent the other ranks fail their next collective
within ``train.dist_timeout_s`` seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from dispersive.commands import add_set_argument
from dispersive.errors import UserError

__all__ = ["add_arguments", "run", "resolve_run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dispersive train``."""
    parser.add_argument(
        "config", nargs="?", metavar="CONFIG", help="TOML config file (presets in configs/)"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint, with its saved config",
    )
    add_set_argument(
        parser,
        "override config keys; VALUE is a TOML literal (train.steps=6, data.path='\"/x\"')",
    )
    parser.add_argument("--outdir", metavar="DIR", help="parent folder of the run (train.outdir)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config, check it, and stop"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def resolve_run(args: argparse.Namespace):
    """``(config, run_dir, resume)`` from the parsed arguments; every user mistake is a UserError.

    The config passes the one preflight here (for this process's world size), before anything
    is printed or written; ``run`` then tells the loop not to repeat it.
    """
    from dispersive.train.checkpoint import latest_checkpoint
    from dispersive.train.config import config_source, preflight, read_config
    from dispersive.train.distributed import env_world_size
    from dispersive.train.rundir import CONFIG_FILE, DONE_FILE

    if args.resume and args.config:
        raise UserError(
            f"give either CONFIG or --resume RUN_DIR, not both (got {args.config} and "
            f"--resume {args.resume}); --resume uses the run's saved config.toml"
        )
    if args.resume:
        if args.outdir:
            raise UserError("--outdir does not apply to --resume: the run stays in its RUN_DIR")
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise UserError(
                f"--resume {run_dir}: no such run directory; give the RUN_DIR of an earlier "
                "`dispersive train` run (it holds config.toml and checkpoints/)"
            )
        config_file = run_dir / CONFIG_FILE
        if not config_file.is_file():
            raise UserError(
                f"--resume {run_dir}: {config_file.name} is missing, so this is not a run "
                "directory written by `dispersive train`; start a new run with "
                "`dispersive train CONFIG`"
            )
        config = read_config(config_file, args.overrides)
        preflight(config, world_size=env_world_size(), source=config_source(config_file))
        return config, run_dir, True
    stray = [o for o in args.overrides if "=" not in o]
    if stray:
        raise UserError(
            f"--set takes key=value items, got {stray[0]!r}; put CONFIG before --set: "
            "dispersive train CONFIG --set train.steps=6"
        )
    if not args.config:
        raise UserError(
            "dispersive train needs a CONFIG file (e.g. configs/tiny.toml) or --resume RUN_DIR"
        )
    config = read_config(args.config, args.overrides)
    preflight(config, world_size=env_world_size(), source=config_source(args.config))
    if args.outdir:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, outdir=args.outdir)
        )
    run_dir = Path(config.train.outdir) / (config.train.run_name or Path(args.config).stem)
    if not args.dry_run and (
        latest_checkpoint(run_dir) is not None or (run_dir / DONE_FILE).exists()
    ):
        raise UserError(
            f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}, "
            "or start another with --set train.run_name='\"NAME\"' or --outdir DIR"
        )
    return config, run_dir, False


def run(args: argparse.Namespace) -> int:
    """Run ``dispersive train``; returns the exit status."""
    from dispersive.train.config import dump_toml, per_device_batch
    from dispersive.train.distributed import env_world_size

    config, run_dir, resume = resolve_run(args)  # preflight done: --dry-run and train() rely on it
    world = env_world_size()
    is_main = os.environ.get("RANK", "0") == "0"
    local_batch = per_device_batch(config, world)
    if is_main:
        print(f"# run directory: {run_dir}{' (resume)' if resume else ''}")
        print(f"# world size {world}, per-device batch {local_batch}")
        print(dump_toml(config), end="", flush=True)
    if args.dry_run:
        if is_main:
            print("# dry run: stopping before step 0 (nothing written)", file=sys.stderr)
        return 0

    from dispersive.train.loop import train

    summary = train(
        config, run_dir=run_dir, resume=resume, progress=not args.no_progress, preflighted=True
    )
    if is_main:
        final = summary.get("final", {})
        losses = ", ".join(
            f"{k} {final[k]:.4f}" for k in ("loss_diff", "loss_disp", "floor_gap") if k in final
        )
        print(
            f"done: {summary['steps']} steps in {summary['wall_time_s']:.1f} s"
            + (f"; {losses}" if losses else "")
            + f"; run directory {run_dir}",
            file=sys.stderr,
        )
    return 0
