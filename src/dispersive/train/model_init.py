"""The run's model: built from ``[model]``, optionally starting from ``model.init``'s weights.

``model.init`` names the weights a run starts from (fine-tuning), at step 0 only:

- an official DiT / SiT checkpoint (the released ``DiT-XL-2-256x256.pt`` /
  ``SiT-XL-2-256x256.pt``, or a training dict with "model"/"ema"/"opt"/"args"): loaded by
  :func:`dispersive.models.load_official`, which also sets the official network's conventions
  (positional-embedding order; for SiT the time map and the 2C output);
- a checkpoint file or run directory of this package: its ``model_config`` supplies the same
  conventions when it has them.

``model.init_weights`` picks "ema" (default: the weights the papers sample) or "model" where a
file has both; the model and its EMA both start from them. ``model.init_sha256`` verifies the
file first. The config's name and sizes must agree with the file (one-line error otherwise);
its overrides (e.g. ``attn``) are kept.

On resume the run's own checkpoint wins: the model is rebuilt from that checkpoint's
``model_config`` (which records the conventions), so the init file is not read again and need
not exist any more. Runs without ``model.init`` build exactly as before.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from dispersive.errors import UserError

__all__ = ["check_init", "build_run_model"]

_PROJECT_KEYS = ("name", "input_size", "in_channels", "num_classes")


def check_init(model_cfg: Any) -> None:
    """Config-time checks of ``model.init`` (no file is read, and the file need not exist: a
    resumed run does not read it again; a fresh run reports a missing file at its start)."""
    if model_cfg.init_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", model_cfg.init_sha256):
        raise UserError(
            f"model.init_sha256 = '{model_cfg.init_sha256}' is not a sha256 (64 hex digits); "
            "use `sha256sum FILE` or leave it empty"
        )
    if model_cfg.init_sha256 and Path(model_cfg.init).is_dir():
        raise UserError("model.init_sha256 verifies a file; give model.init as a ckpt-*.pt file")


def _merge(kwargs: dict, saved: dict, where: str) -> dict:
    # The file decides the conventions; the config's own overrides win otherwise.
    for k in _PROJECT_KEYS:
        if k in saved and saved[k] != kwargs[k]:
            raise UserError(
                f"{where} holds a model with {k} = {saved[k]!r} but model.{k} = {kwargs[k]!r}; "
                f"set model.{k} = {saved[k]!r}"
            )
    overrides = {**(saved.get("overrides") or {}), **kwargs["overrides"]}
    return {**kwargs, "overrides": overrides}


def _saved_model_config(ckpt: dict) -> dict:
    saved = ckpt.get("model_config")
    if saved:
        return dict(saved)
    m = (ckpt.get("config") or {}).get("model", {})  # an older checkpoint: the run's config
    return {**{k: m[k] for k in _PROJECT_KEYS if k in m}, "overrides": m.get("overrides", {})}


def _is_project_checkpoint(obj: Any) -> bool:
    ema = obj.get("ema") if isinstance(obj, dict) else None
    return isinstance(obj, dict) and (
        "model_config" in obj or (isinstance(ema, dict) and "shadow" in ema)
    )


def build_run_model(model_cfg: Any, *, resume_from: str | Path | None = None) -> nn.Module:
    """Build the model of a run (on the CPU), with ``model.init``'s weights when set.

    Args:
        model_cfg: the run's ``ModelConfig``.
        resume_from: the checkpoint the run resumes from (None at step 0). With ``model.init``
            set, the architecture comes from its ``model_config``; weights are left to the
            caller's resume.

    Returns:
        The model; ``model.config`` holds everything that rebuilds it (saved in checkpoints).

    Raises:
        UserError: one line naming the problem (missing / corrupt / foreign file, another
            size, checksum mismatch) and the fix.
    """
    from dispersive.models import build, load_official
    from dispersive.models.official import read_checkpoint
    from dispersive.train.config import model_kwargs

    kwargs = model_kwargs(model_cfg)
    if not model_cfg.init:
        return build(**kwargs)
    try:
        if resume_from is not None:
            ckpt = read_checkpoint(resume_from)  # memory-mapped: only the pickled dicts are read
            return build(**_merge(kwargs, _saved_model_config(ckpt), str(resume_from)))

        from dispersive.train.checkpoint import resolve_checkpoint

        if not Path(model_cfg.init).exists():
            raise UserError(
                f"model.init = '{model_cfg.init}' does not exist; give the path of an official "
                "DiT / SiT .pt file, or a checkpoint / run directory of this package"
            )
        path = resolve_checkpoint(model_cfg.init)  # a run directory means its latest checkpoint
        obj = read_checkpoint(path, sha256=model_cfg.init_sha256 or None)
        if not _is_project_checkpoint(obj):
            return load_official(
                kwargs["name"],
                obj,
                weights=model_cfg.init_weights,
                input_size=kwargs["input_size"],
                in_channels=kwargs["in_channels"],
                num_classes=kwargs["num_classes"],
                overrides=kwargs["overrides"],
            ).train()
        model = build(**_merge(kwargs, _saved_model_config(obj), str(path)))
        if model_cfg.init_weights == "ema":
            if not obj.get("ema"):
                raise UserError(f"{path} has no EMA weights; set model.init_weights = 'model'")
            weights = obj["ema"]["shadow"]
        else:
            weights = obj["model"]
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise UserError(
                f"model.init: {path} does not fit the model of the config "
                f"({str(e).splitlines()[0]}); model.* must describe the same architecture"
            ) from None
        return model
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"model.init: {' '.join(str(e).split())}") from None
