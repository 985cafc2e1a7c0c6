"""Sub-command modules of the ``dispersive`` CLI (layer L3): each has add_arguments and run."""

from __future__ import annotations

import argparse


def add_set_argument(parser: argparse.ArgumentParser, help_: str) -> None:
    """``--set KEY=VALUE ...`` (config overrides, TOML literals) into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=help_,
    )
