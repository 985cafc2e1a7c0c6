"""Checkpoints: one file per saved step, written atomically, loadable with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values (no pickled classes)::

    {
        "format": 1,
        "step": int,                     # optimizer steps done
        "model": state_dict,             # the raw module (no DDP "module." / compile prefixes)
        "ema": {"shadow": state_dict, "decay": float, "warmup": bool, "num_updates": int},
        "optimizer": state_dict,
        "rng": {"torch": ByteTensor, "cuda": [ByteTensor], "numpy": {...}, "python": [...],
                "generators": {name: ByteTensor}},
        "data_state": dict,              # BatchStream.state_dict()
        "config": dict,                  # the resolved run config as a plain dict
        "model_config": dict,            # keyword arguments of dispersive.models.build
    }

Files live in ``RUN_DIR/checkpoints/ckpt-{step:07d}.pt``; the latest is the one with the largest
step (no marker file that could disagree with the directory after a crash). A write goes to a
temporary file in the same directory, is fsync'ed, then renamed over the final name, so a reader
(or a run killed with SIGKILL) never sees a half-written ``ckpt-*.pt``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dispersive.atomic import atomic_write, remove_temporaries
from dispersive.errors import UserError
from dispersive.train.rundir import CKPT_DIRNAME

__all__ = [
    "CKPT_DIRNAME",
    "FORMAT_VERSION",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "remove_stale_temporaries",
    "capture_rng_state",
    "restore_rng_state",
    "load_model",
]

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{7,})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/ckpt-{step:07d}.pt``."""
    return Path(run_dir) / CKPT_DIRNAME / f"ckpt-{step:07d}.pt"


def _ckpt_dir(path: str | Path) -> Path:
    """Accept a run dir or its checkpoints/ dir."""
    path = Path(path)
    return path if path.name == CKPT_DIRNAME else path / CKPT_DIRNAME


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, sorted by step: ``[(step, path), ...]``.

    Temporary files of an interrupted write are never listed.
    """
    d = _ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the largest step, or None when the run has none."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path_or_run_dir: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory.

    Raises:
        FileNotFoundError: the path does not exist or the run has no checkpoint yet.
    """
    p = Path(path_or_run_dir)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint or run directory {p} does not exist; give a ckpt-*.pt file or a run "
            "directory that contains checkpoints/"
        )
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(
            f"no checkpoint in {_ckpt_dir(p)}; the run has not reached its first "
            "train.ckpt_every step yet (or give a ckpt-*.pt file)"
        )
    return latest


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename).

    Args:
        state: tensors and plain Python containers/scalars only, so that the file loads with
            ``torch.load(..., weights_only=True)``.
        path: the final file name; its directory is created.

    Returns:
        The path written.
    """
    return atomic_write(path, lambda f: torch.save(dict(state), f))


def load_checkpoint(path_or_run_dir: str | Path, *, map_location: Any = "cpu") -> dict:
    """Load a checkpoint file (or the latest of a run) with ``weights_only=True``.

    Raises:
        FileNotFoundError: nothing to load.
        UserError: the file is not a readable checkpoint of this package.
    """
    path = resolve_checkpoint(path_or_run_dir)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); delete it and "
            "resume from an earlier one"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise UserError(f"{path} is not a dispersive checkpoint (no 'model'/'step' entries)")
    return ckpt


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` most recent checkpoints; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    old = [p for _, p in list_checkpoints(run_dir)[:-keep_last]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary files left by a write that was killed (call before resuming)."""
    return remove_temporaries(_ckpt_dir(run_dir))


# ----------------------------------------------------------------------------------------------
# RNG states as tensors and plain values (weights_only-loadable).


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """Global RNG states (torch, CUDA, numpy, python) plus the given generators' states."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        # python's state is (version, tuple of 625 ints, gauss_next): store as lists.
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Inverse of :func:`capture_rng_state` (generators are restored in place)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise UserError(
                f"the checkpoint has no state for the '{name}' random generator; it was written "
                "by a different version of the training loop and cannot be resumed exactly"
            )
        g.set_state(saved[name].cpu())


# ----------------------------------------------------------------------------------------------
# Models from checkpoints


def load_model(
    path_or_run_dir: str | Path, *, ema: bool = True, map_location: Any = "cpu"
) -> tuple[torch.nn.Module, dict, int]:
    """Rebuild a trained model from a checkpoint file or a run directory (its latest checkpoint).

    Args:
        path_or_run_dir: ``ckpt-*.pt`` file or ``RUN_DIR``.
        ema: load the EMA weights (what the paper samples from) instead of the raw weights.
        map_location: device for the tensors and the returned model.

    Returns:
        ``(model, config, step)``: the model in eval mode with gradients off, the run's
        resolved config as a plain dict, and the number of optimizer steps it was trained for.

    Raises:
        FileNotFoundError / UserError: nothing to load, unreadable file, or no EMA in it.
    """
    from dispersive.models import build  # L1 -> L1, imported lazily: keeps this module light

    ckpt = load_checkpoint(path_or_run_dir, map_location=map_location)
    config = ckpt.get("config") or {}
    kwargs = ckpt.get("model_config")
    if not kwargs:
        m = config.get("model", {})
        kwargs = {k: m[k] for k in ("name", "input_size", "in_channels", "num_classes") if k in m}
        kwargs.update(m.get("overrides", {}))
    model = build(**kwargs)
    if ema:
        if not ckpt.get("ema"):
            raise UserError(
                f"{resolve_checkpoint(path_or_run_dir)} has no EMA weights; pass ema=False "
                "(--no-ema) to load the raw weights"
            )
        weights = ckpt["ema"]["shadow"]
    else:
        weights = ckpt["model"]
    model.load_state_dict(weights)
    model.to(map_location).eval().requires_grad_(False)
    return model, config, int(ckpt["step"])
