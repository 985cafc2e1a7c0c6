"""Generative models, keyed by the paper's names.

    model = dispersive.models.build("SiT-B/2", input_size=32, in_channels=4, num_classes=1000)

Families (see ``docs/architecture.md``, "Models"):

- ``SiT-{size}/{patch}``: flow matching, ``model(x, t, y) -> v`` (B, C, H, W); kind "flow".
- ``DiT-{size}/{patch}``: DDPM, ``model(x, k, y) -> (B, 2C, H, W)`` (epsilon, variance values);
  kind "ddpm".
- ``MF-{size}/{patch}``: MeanFlow, ``model(x, t, h, y) -> u`` (B, C, H, W); kind "meanflow".
- ``UNet-CIFAR`` (flow-matching CIFAR-10 UNet, ~55.7M) and ``UNet-T`` (small, CPU): kind "flow".

Sizes S, B, L, XL (paper Table 8) with patches 2, 4, 8; CPU sizes T (hidden 128, depth 6,
heads 4) and XS (hidden 64, depth 4, heads 4) with patches 2, 4, 7. Any patch size that divides
``input_size`` can be set with the ``patch_size`` override.

Official DiT / SiT checkpoints: ``load_official("SiT-XL/2", "SiT-XL-2-256x256.pt")`` returns
this package's model with the official network's outputs in this package's conventions
(``dispersive.models.official``).

Every model has ``block_names`` (FeatureTap names of its blocks, in forward order), ``depth``,
``in_channels``, ``out_channels``, ``input_size``, ``num_classes``, ``kind`` and ``config``
(``build(**model.config)`` rebuilds the same architecture; checkpoints store it).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dispersive.models.layers import ATTN_BACKENDS, check_attn_backend
from dispersive.models.meanflow import MeanFlowTransformer
from dispersive.models.official import load_official
from dispersive.models.transformer import PATCHES, SIZES, DiT, SiT
from dispersive.models.unet import UNET_SIZES, UNet

__all__ = [
    "MODELS",
    "ModelEntry",
    "build",
    "load_official",
    "set_attn_backend",
    "SiT",
    "DiT",
    "MeanFlowTransformer",
    "UNet",
    "ATTN_BACKENDS",
]

_TRANSFORMER_OVERRIDES = (
    "depth",
    "hidden_size",
    "num_heads",
    "patch_size",
    "mlp_ratio",
    "attn",
    "pos_embed",
)
_UNET_OVERRIDES = (
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "dropout",
    "num_heads",
    "attn",
)


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry: the class, its size arguments and the override names it accepts."""

    cls: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()

    def __call__(self, *, input_size: int, in_channels: int, num_classes: int, **overrides: Any):
        return self.cls(
            input_size=input_size,
            in_channels=in_channels,
            num_classes=num_classes,
            **{**self.defaults, **overrides},
        )


def _registry() -> dict[str, ModelEntry]:
    reg: dict[str, ModelEntry] = {}
    families = [
        ("SiT", SiT, (*_TRANSFORMER_OVERRIDES, "learn_sigma", "time_scale", "time_origin")),
        ("DiT", DiT, (*_TRANSFORMER_OVERRIDES, "learn_sigma")),
        ("MF", MeanFlowTransformer, (*_TRANSFORMER_OVERRIDES, "time_scale")),
    ]
    for prefix, cls, allowed in families:
        for size, arch in SIZES.items():
            for p in PATCHES[size]:
                reg[f"{prefix}-{size}/{p}"] = ModelEntry(cls, {**arch, "patch_size": p}, allowed)
    for size, arch in UNET_SIZES.items():
        reg[f"UNet-{size}"] = ModelEntry(UNet, dict(arch), _UNET_OVERRIDES)
    return reg


MODELS: dict[str, ModelEntry] = _registry()


def _plain(value: Any) -> Any:
    # Tuples become lists so the stored config is plain TOML / JSON data.
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def build(
    name: str,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int,
    overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: registry name, e.g. "SiT-B/2", "DiT-XL/2", "MF-B/4", "UNet-CIFAR", "SiT-T/4".
        input_size: H = W of the model input (the latent size for latent data).
        in_channels: C of the model input.
        num_classes: number of classes (label ``num_classes`` is the null label);
            0 = unconditional.
        overrides: architecture overrides as a dict (what ``model.config`` stores), merged
            with ``**kwargs`` (keywords win). Transformers: depth, hidden_size, num_heads,
            patch_size, mlp_ratio, attn ("sdpa" | "math"), pos_embed ("hw" | "wh"), and
            learn_sigma for DiT; learn_sigma, time_scale and time_origin for SiT (the official
            SiT's conventions, see :func:`load_official`); time_scale for MeanFlow (default 1,
            the official networks'; see ``dispersive.models.meanflow``). UNet:
            model_channels, channel_mult, num_res_blocks, attention_resolutions, dropout,
            num_heads, attn.

    Returns:
        The model, with ``model.config = {"name", "input_size", "in_channels", "num_classes",
        "overrides"}`` so that ``build(**model.config)`` rebuilds it.

    Raises:
        ValueError: unknown name (with close matches) or override (with the valid ones),
            or an invalid architecture (e.g. a patch size that does not divide input_size).
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid models: {', '.join(MODELS)}")
    entry = MODELS[name]
    merged = {**(overrides or {}), **kwargs}
    unknown = sorted(set(merged) - set(entry.allowed))
    if unknown:
        raise ValueError(
            f"unknown override(s) {unknown} for {name!r}; valid overrides: {list(entry.allowed)}"
        )
    model = entry(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **merged)
    model.config = {
        "name": name,
        "input_size": input_size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "overrides": {k: _plain(v) for k, v in merged.items()},
    }
    return model


def set_attn_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every attention module of ``model`` to ``backend`` ("sdpa" or "math") in place.

    The weights do not change; "math" is needed for forward-mode AD (``torch.func.jvp``), "sdpa"
    is faster. ``model.config`` is updated so a rebuild uses the same backend. Returns model.
    """
    check_attn_backend(backend)
    for m in model.modules():
        if hasattr(m, "backend") and hasattr(m, "qkv"):
            m.backend = backend
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        config["overrides"] = {**config.get("overrides", {}), "attn": backend}
    return model
