"""The official DiT and SiT checkpoints as models of this package.

    model = dispersive.models.load_official("SiT-XL/2", "SiT-XL-2-256x256.pt")
    v = model(x, t, y)        # this package's t (data at 0) and velocity d x_t / d t

Accepted layouts (``src`` is a path or an already loaded dict):

- a plain state dict, as released for DiT-XL/2 and SiT-XL/2 (``DiT-XL-2-256x256.pt``,
  ``SiT-XL-2-256x256.pt``);
- a training checkpoint ``{"model", "ema", "opt", "args"}`` written by the ``train.py`` of
  DiT, SiT or the authors' Dispersive Loss code. ``weights="ema"`` (the default) takes the EMA
  weights, which is what the papers sample and evaluate; ``weights="model"`` the raw ones.

Keys are the official ones (``x_embedder.proj.*``, ``t_embedder.mlp.{0,2}.*``,
``y_embedder.embedding_table.weight``, ``pos_embed``, ``blocks.N.{norm1,attn,norm2,mlp,
adaLN_modulation}.*``, ``final_layer.*``); a DDP ``module.`` or compile ``_orig_mod.`` prefix
is removed. The conversion:

- ``t_embedder.*`` becomes ``t_embedders.0.*``; every other tensor keeps its name and value.
- ``pos_embed`` (saved there, recomputed here) must equal the 2-D sin-cos embedding in MAE's
  channel order (first half: column); it is checked and dropped.
- The architecture (width, depth, patch, channels, grid, classes, learned sigma) is read from
  the tensors' shapes and checked against ``name``; ``num_heads`` comes from ``name``.
- The official conventions go into ``model.config["overrides"]``, so every checkpoint this
  package writes rebuilds the same model: ``pos_embed="wh"`` (both), and for SiT
  ``time_scale=1``, ``time_origin="noise"`` (the network sees SiT's ``1 - t`` unscaled and
  ``forward`` returns minus its velocity) and ``learn_sigma`` as in the file (the released
  SiT-XL/2 has it: 2C output channels, the second half unused).

DiT needs no time mapping: its integer steps k and its (epsilon, variance) output are already
this package's DDPM convention. Files load with ``torch.load(weights_only=True, mmap=True)``
(only the chosen weights are read); ``sha256`` verifies the file first.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dispersive.models.layers import sincos_pos_embed_2d

__all__ = [
    "OFFICIAL_FAMILIES",
    "WEIGHTS",
    "official_conventions",
    "read_checkpoint",
    "official_state_dict",
    "convert_official",
    "load_official",
    "sha256_file",
]

OFFICIAL_FAMILIES = ("DiT", "SiT")
WEIGHTS = ("ema", "model")  # which weights of a training checkpoint (the EMA: what papers sample)
_PREFIXES = ("module.", "_orig_mod.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Keys every official DiT / SiT state dict has; their absence means another layout.
_REQUIRED = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")


def official_conventions(name: str, learn_sigma: bool = True) -> dict[str, Any]:
    """The ``build`` overrides that make this package's model the official network.

    Args:
        name: a registry name of family DiT or SiT ("SiT-XL/2", ...).
        learn_sigma: whether the official final layer outputs 2C channels (both released
            files do; DiT reads the second half, SiT ignores it).

    Returns:
        ``{"pos_embed": "wh", "learn_sigma": ...}`` for DiT; plus ``time_scale=1.0`` and
        ``time_origin="noise"`` for SiT.
    """
    family = name.split("-", 1)[0]
    if family not in OFFICIAL_FAMILIES:
        raise ValueError(
            f"official checkpoints exist for the DiT and SiT families; got {name!r} "
            "(give a name such as 'SiT-XL/2' or 'DiT-XL/2')"
        )
    conv: dict[str, Any] = {"pos_embed": "wh", "learn_sigma": bool(learn_sigma)}
    if family == "SiT":
        conv.update(time_scale=1.0, time_origin="noise")
    return conv


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (an XL checkpoint is 2.7 GB, a training one 10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _allow_namespace():
    # The official train.py saves its argparse.Namespace under "args"; weights_only=True
    # refuses unknown classes, so this one (a plain attribute bag) is allowed explicitly.
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:  # torch < 2.5: no scoped allowlist; such files then fail with a clear error
        yield
        return
    with safe([argparse.Namespace]):
        yield


def read_checkpoint(
    path: str | os.PathLike, *, sha256: str | None = None, map_location: Any = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped when the format allows it.

    Args:
        path: the file.
        sha256: expected hex digest (64 characters, case-insensitive); verified before loading.
        map_location: where the tensors go (with mmap they are read only when used).

    Raises:
        FileNotFoundError: no such file.
        ValueError: checksum mismatch, or the file is not a readable PyTorch checkpoint
            (truncated, corrupt, or holding objects ``weights_only`` refuses); one line each.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (or is not a file); give the path of a "
            "downloaded .pt file"
        )
    if sha256:
        want = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", want):
            raise ValueError(f"sha256 must be 64 hex digits; got {sha256!r}")
        got = sha256_file(path)
        if got != want:
            raise ValueError(
                f"{path} has sha256 {got}, expected {want}: the file is corrupt, truncated or "
                "another file; download it again"
            )
    errors = []
    with _allow_namespace():
        for mmap in (True, False):  # mmap needs the zip format of torch >= 1.6
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except Exception as e:  # noqa: BLE001 - every failure becomes the same one-line error
                errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
    raise ValueError(
        f"{path} is not a readable PyTorch checkpoint ({errors[-1]}); the file may be truncated "
        "or corrupt: download it again (pass its sha256 to verify it)"
    )


def _strip(sd: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while isinstance(k, str) and k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def official_state_dict(obj: Any, *, weights: str = "ema") -> tuple[dict[str, Tensor], str]:
    """The official-layout state dict inside a loaded checkpoint.

    Args:
        obj: what ``torch.load`` returned: a plain state dict, or a training checkpoint dict
            with "model" and/or "ema" state dicts (plus "opt", "args", ... which are ignored).
        weights: "ema" (default; what the papers sample) or "model", for training checkpoints;
            a plain state dict is used as it is (the released files hold the EMA weights).

    Returns:
        ``(state_dict, description)``, prefixes removed; description names what was taken,
        e.g. "plain state dict" or "'ema' of a training checkpoint".

    Raises:
        ValueError: an unknown layout (not a state dict of official DiT / SiT key names),
            a project checkpoint, or the requested weights are missing.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}; got {weights!r}")
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"unknown checkpoint layout: a {type(obj).__name__}, not a dict; expected an "
            "official DiT / SiT state dict or a training checkpoint with 'model'/'ema'"
        )
    if "model_config" in obj or (
        "ema" in obj and isinstance(obj["ema"], Mapping) and "shadow" in obj["ema"]
    ):
        raise ValueError(
            "this is a checkpoint of this package (it has 'model_config' / 'ema.shadow'), not "
            "an official one; load it with dispersive.checkpoint.load_model (or `--ckpt`)"
        )
    if _is_state_dict(obj):
        sd, what = _strip(obj), "plain state dict"
    elif any(_is_state_dict(obj.get(k)) for k in WEIGHTS):
        if not _is_state_dict(obj.get(weights)):
            other = next(k for k in WEIGHTS if k != weights)
            raise ValueError(
                f"the training checkpoint has no {weights!r} weights (keys {sorted(obj)[:8]}); "
                f"pass weights={other!r}"
            )
        sd, what = _strip(obj[weights]), f"{weights!r} of a training checkpoint"
    else:
        keys = sorted(str(k) for k in obj)[:8]
        raise ValueError(
            f"unknown checkpoint layout (top-level keys {keys}); expected an official DiT / SiT "
            "state dict (x_embedder.*, t_embedder.*, blocks.N.*, final_layer.*) or a training "
            "checkpoint with 'model'/'ema' state dicts"
        )
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        hint = (
            " (it has t_embedders.0.*: a state dict of this package, load it with "
            "model.load_state_dict)"
            if "t_embedders.0.mlp.0.weight" in sd
            else ""
        )
        raise ValueError(
            f"unknown checkpoint layout: the {what} lacks {missing}{hint}; expected the key "
            "names of the official DiT / SiT models.py"
        )
    return sd, what


def _arch_of(sd: Mapping[str, Tensor]) -> dict[str, int]:
    # The architecture the tensors imply; pos_embed gives the token grid when present.
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = len({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    out = int(sd["final_layer.linear.weight"].shape[0])  # p * p * C_out
    arch = dict(hidden_size=hidden, depth=depth, patch_size=patch, in_channels=in_channels)
    arch["out_channels"] = out // (patch * patch) if out % (patch * patch) == 0 else -1
    if "pos_embed" in sd:
        tokens = int(sd["pos_embed"].shape[-2])
        g = round(tokens**0.5)
        arch["input_size"] = g * patch if g * g == tokens else -1
    if "y_embedder.embedding_table.weight" in sd:
        arch["table_rows"] = int(sd["y_embedder.embedding_table.weight"].shape[0])
    return arch


def _registry_match(family: str, arch: Mapping[str, int]) -> list[str]:
    from dispersive.models import MODELS

    found = []
    for n, entry in MODELS.items():
        d = entry.defaults
        if n.startswith(f"{family}-") and (
            d.get("hidden_size"),
            d.get("depth"),
            d.get("patch_size"),
        ) == (arch["hidden_size"], arch["depth"], arch["patch_size"]):
            found.append(n)
    return found


def convert_official(
    name: str,
    sd: Mapping[str, Tensor],
    *,
    input_size: int | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Map an official DiT / SiT state dict to this package's keys and ``build`` arguments.

    Args:
        name: registry name the weights are for ("DiT-XL/2", "SiT-B/4", ...).
        sd: the official state dict (see :func:`official_state_dict`).
        input_size, in_channels, num_classes: read from the tensors when None, else checked
            against them (num_classes: the label table has num_classes + 1 rows, the last
            one the null label of classifier-free guidance).
        overrides, **kwargs: further ``build`` overrides (e.g. ``attn="math"``); the
            official conventions (:func:`official_conventions`) cannot be changed.

    Returns:
        ``(build_kwargs, state_dict)``: ``dispersive.models.build(**build_kwargs)`` makes the
        model whose ``load_state_dict(state_dict)`` gives the official network.

    Raises:
        ValueError: a checkpoint of another size or shape than ``name`` and the given sizes,
            a pos_embed that is not the official sin-cos embedding, or a forbidden override.
    """
    from dispersive.models import MODELS  # the registry imports this module

    conv = official_conventions(name)  # rejects families without official checkpoints
    family = name.split("-", 1)[0]
    if name not in MODELS:
        names = [n for n in MODELS if n.split("-", 1)[0] == family]
        raise ValueError(f"unknown model {name!r}; valid {family} models: {', '.join(names)}")
    arch = _arch_of(sd)
    entry = MODELS[name]
    want = {k: entry.defaults.get(k) for k in ("hidden_size", "depth", "patch_size")}
    user = {**(overrides or {}), **kwargs}
    want.update({k: user[k] for k in want if k in user})
    got = {k: arch[k] for k in want}
    if got != want:
        match = _registry_match(family, arch)
        hint = f"; it fits {', '.join(repr(m) for m in match)}" if match else ""
        raise ValueError(
            f"the checkpoint is of another size than {name!r}: it has hidden_size "
            f"{got['hidden_size']}, depth {got['depth']}, patch {got['patch_size']}, where "
            f"{name!r} has {want['hidden_size']}, {want['depth']}, {want['patch_size']}{hint}"
        )

    c = arch["in_channels"]
    if in_channels is not None and in_channels != c:
        raise ValueError(f"the checkpoint has in_channels={c}, not {in_channels}")
    if arch["out_channels"] not in (c, 2 * c):
        raise ValueError(
            f"final_layer.linear.weight has {sd['final_layer.linear.weight'].shape[0]} rows; "
            f"expected patch^2 * C or patch^2 * 2C with patch {arch['patch_size']}, C {c}"
        )
    learn_sigma = arch["out_channels"] == 2 * c
    size = arch.get("input_size")
    if size == -1:
        raise ValueError(
            f"pos_embed has {sd['pos_embed'].shape[-2]} tokens, not a square grid; "
            "unknown checkpoint layout"
        )
    if size is None:
        if input_size is None:
            raise ValueError("the state dict has no pos_embed; give input_size (e.g. 32)")
        size = input_size
    elif input_size is not None and input_size != size:
        raise ValueError(
            f"the checkpoint is for input_size {size} (a {size // arch['patch_size']}^2 token "
            f"grid), not {input_size}; e.g. the 512x512 DiT-XL/2 has input_size 64"
        )
    rows = arch.get("table_rows")
    if rows is None:
        ncls = 0
    else:
        ncls = rows - 1
        if num_classes is not None and num_classes != ncls:
            raise ValueError(
                f"the label table has {rows} rows: {rows - 1} classes + the null label, not "
                f"num_classes={num_classes} (a model trained without label dropout has no "
                "null label and cannot be loaded)"
            )

    conv["learn_sigma"] = learn_sigma
    bad = {k: v for k, v in user.items() if k in conv and v != conv[k]}
    if bad:
        raise ValueError(
            f"override(s) {bad} contradict the official checkpoint ({conv}); leave them out"
        )
    merged = {**user, **conv}

    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k == "pos_embed":
            continue
        if k.startswith("t_embedder."):
            k = "t_embedders.0." + k[len("t_embedder.") :]
        out[k] = v
    if "pos_embed" in sd:
        _check_pos_embed(sd["pos_embed"], arch["hidden_size"], size // arch["patch_size"])
    build_kwargs = {
        "name": name,
        "input_size": size,
        "in_channels": c,
        "num_classes": ncls,
        "overrides": merged,
    }
    return build_kwargs, out


def _check_pos_embed(pos: Tensor, hidden: int, grid: int) -> None:
    if pos.is_meta:
        return  # shapes only (a meta-device check of the key mapping)
    have = pos.detach().reshape(grid * grid, hidden).float().cpu()
    err = {
        o: (have - sincos_pos_embed_2d(hidden, grid, o)).abs().max().item() for o in "hw wh".split()
    }
    if err["wh"] > 1e-5:
        what = "in this package's 'hw' order" if err["hw"] <= 1e-5 else "not a 2-D sin-cos table"
        raise ValueError(
            f"pos_embed differs from the official (MAE 'wh') sin-cos embedding by "
            f"{err['wh']:.2g} ({what}); unknown checkpoint layout"
        )


def load_official(
    name: str,
    src: str | os.PathLike | Mapping[str, Any],
    *,
    weights: str = "ema",
    sha256: str | None = None,
    map_location: Any = "cpu",
    **build_kwargs: Any,
) -> nn.Module:
    """Build this package's model from an official DiT / SiT checkpoint.

    Args:
        name: registry name, "DiT-XL/2", "SiT-XL/2", ... (any DiT or SiT size and patch).
        src: a path to the .pt file, or what ``torch.load`` returned (plain state dict or
            training checkpoint dict).
        weights: "ema" (default; what the papers sample) or "model", for training checkpoints.
        sha256: expected hex sha256 of the file, verified before loading (paths only).
        map_location: device of the returned model.
        **build_kwargs: ``input_size``, ``in_channels``, ``num_classes`` (read from the
            checkpoint when omitted, checked when given), ``overrides`` and further build
            overrides such as ``attn="math"``.

    Returns:
        The model in eval mode. Its outputs equal the official model's in this package's
        conventions: DiT ``model(x, k, y)`` is the official ``DiT(x, k, y)``; SiT
        ``model(x, t, y)`` is ``-SiT(x, 1 - t, y)`` (first C channels), i.e. the velocity of
        this package's path and time. ``model.config`` rebuilds it (``build(**model.config)``)
        and records the conventions, so checkpoints of fine-tuned runs load again exactly.

    Raises:
        FileNotFoundError: missing file.
        ValueError: one-line errors for a checksum mismatch, a truncated / unreadable file, an
            unknown layout, or a checkpoint of another size (with the name it fits).
    """
    from dispersive.models import build

    if isinstance(src, str | os.PathLike):
        obj = read_checkpoint(src, sha256=sha256)
    elif sha256:
        raise ValueError("sha256 verifies a file; give src as a path to use it")
    else:
        obj = src  # an already loaded dict (official_state_dict checks what it is)
    sd, _ = official_state_dict(obj, weights=weights)
    kwargs, converted = convert_official(name, sd, **build_kwargs)
    # Build without initialising weights (meta), then materialise: the checkpoint overwrites
    # every parameter, and XL's random init alone takes seconds.
    with torch.device("meta"):
        model = build(**kwargs)
    model.to_empty(device=map_location)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as e:  # unexpected / missing keys or shapes: one line
        msg = " ".join(str(e).split())
        raise ValueError(f"the checkpoint does not fit {name!r}: {msg[:400]}") from None
    model.reset_buffers()
    return model.eval()
