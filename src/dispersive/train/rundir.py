"""The run directory: the names of its files, its single writer, its small JSON files.

    RUN_DIR/
      config.toml        the resolved config, written before step 0 (``--resume`` reads it)
      metrics.jsonl      one JSON object per logged step (train/logging.py)
      tb/                TensorBoard event files
      checkpoints/       ckpt-{step:07d}.pt (train/checkpoint.py)
      done.json          the summary of a finished run (absent while it trains)
      train.lock         held by the one process that trains into RUN_DIR (see RunLock)
      log.txt, samples/, final_eval/    written by the experiment runner around the run

Every file is written with :func:`dispersive.atomic.atomic_write`, except metrics.jsonl, which
is appended line by line (a torn last line is skipped by its reader).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from dispersive.atomic import atomic_write
from dispersive.errors import UserError

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "TB_DIR",
    "CKPT_DIRNAME",
    "DONE_FILE",
    "LOCK_FILE",
    "LOG_FILE",
    "SAMPLES_DIR",
    "FINAL_EVAL_DIR",
    "RunLock",
    "read_json",
    "write_json",
]

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
CKPT_DIRNAME = "checkpoints"
DONE_FILE = "done.json"
# Not the runner's ".lock" (held by `dispersive experiment` around the whole train-sample-eval
# pipeline of a run, while its child `dispersive train` takes this one).
LOCK_FILE = "train.lock"
LOG_FILE = "log.txt"
SAMPLES_DIR = "samples"
FINAL_EVAL_DIR = "final_eval"


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


class RunLock:
    """The one writer of a run directory: an exclusive ``flock`` on ``RUN_DIR/train.lock``.

    A second process that tries to train into the same directory (a second ``--resume`` while
    the first still runs) gets a one-line :class:`UserError` naming the holder (pid, host,
    start time, read from the file). The kernel releases a flock when its process dies, however
    it dies, so a lock file left by a killed run never blocks a resume; the file itself stays
    (removing it would let a third process lock a different inode than a waiting second one).

    Use as a context manager; :meth:`acquire` / :meth:`release` for explicit control.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl  # POSIX only, like torchrun; imported here so the module imports anywhere

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(
                f"run directory {self.path.parent} is being trained by another process "
                f"({self.holder()}); wait for it to finish or stop it, then --resume"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """``pid 123 on host h since 2026-01-01 10:00:00 UTC``, as far as the lock file says."""
        info = read_json(self.path) or {}
        since = info.get("since")
        when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else ""
        return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{when}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
