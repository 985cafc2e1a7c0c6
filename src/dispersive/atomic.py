"""One atomic file write for every file the package leaves on disk (stdlib only, any layer).

A write goes to a temporary file beside the final one (``.NAME.PID.tmp``: hidden, unique per
process), is flushed and fsync'ed, then renamed over the final name, and the directory entry is
fsync'ed. A reader, or a process killed with SIGKILL mid-write, therefore sees either the old
file or the new one, never half of one; a killed write leaves only a temporary, which
:func:`remove_temporaries` deletes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "fsync_dir", "remove_temporaries", "temporary_name", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"


def temporary_name(path: str | Path) -> Path:
    """The temporary file :func:`atomic_write` uses for ``path`` in this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def fsync_dir(d: str | Path) -> None:
    """fsync a directory, so that a rename in it is durable (POSIX); best effort."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` atomically (temporary file, fsync, rename); its folder is created.

    Args:
        path: the final file name.
        data: the content (``str`` is written as UTF-8), or a function that writes it into the
            open binary file it is given (``lambda f: torch.save(state, f)``,
            ``lambda f: np.savez(f, **arrays)``).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows within one file system
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries of writes that were killed in ``folder``; returns their paths."""
    d = Path(folder)
    if not d.is_dir():
        return []
    stale = [p for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
