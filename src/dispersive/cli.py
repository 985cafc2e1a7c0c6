"""The ``dispersive`` command line: the only module that reads ``sys.argv``.

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen command's module is imported, so ``dispersive --help``
stays fast and commands that need optional extras fail only when they are used.

Errors the user can fix (``UserError``, ``ValueError``, ``FileNotFoundError``) are printed as
one line, ``error: ...``, with exit status 2; set ``DISPERSIVE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from dispersive.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "dispersive.commands.train",
        "train a model from a TOML config (or --resume RUN_DIR)",
    ),
    "sample": (
        "dispersive.commands.sample",
        "draw samples from a checkpoint (PNG grid, .npz, spec)",
    ),
    "eval": ("dispersive.commands.eval", "FID / IS / KID / precision-recall of a sample file"),
    "diagnose": ("dispersive.commands.diagnose", "representation norm of every block (Fig. 3)"),
    "train-classifier": (
        "dispersive.commands.train_classifier",
        "train the Fashion-MNIST domain feature network",
    ),
    "extract-latents": ("dispersive.commands.extract_latents", "encode an image folder with a VAE"),
    "experiment": (
        "dispersive.commands.experiment",
        "run a grid of runs (resumable) and write its tables, figures and report",
    ),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dispersive",
        description="Dispersive Loss: training, sampling and evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<18}{help_}" for name, (_, help_) in COMMANDS.items()),
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _install_signal_handlers() -> dict:
    """Ctrl-C and SIGTERM stop a command cleanly (checkpoints are atomic; runs resume).

    A shell starts background jobs with SIGINT ignored, and SIGTERM would otherwise end the
    process without unwinding: both become KeyboardInterrupt, so that `dispersive experiment`
    can stop its child runs and every command exits with status 130. Returns the previous
    handlers, which :func:`main` puts back: a caller of ``main()`` keeps its own.
    """
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if previous[signal.SIGINT] is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    return previous


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from dispersive import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        _top_parser().error(f"unknown command {name!r}; valid commands: {', '.join(COMMANDS)}")
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dispersive {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    previous = _install_signal_handlers()
    try:
        return int(module.run(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        if os.environ.get("DISPERSIVE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()
        print(f"error: {' '.join(m.strip() for m in msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
