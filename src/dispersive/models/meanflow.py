"""MeanFlow: the SiT backbone with a second time input, predicting the average velocity.

``model(x, t, h, y) -> u`` (B, C, H, W): the average velocity over [r, t] with h = t - r >= 0
(Geng et al., 2025). Two timestep embedders, one for t and one for h, are summed with the class
embedding into the adaLN conditioning vector. Both embed ``time_scale * value`` with
``time_scale = 1`` by default: the raw t and h, as the official MeanFlow networks (JAX DiT and
PyTorch UNet) do.

The time scale is part of the weights: the persistent buffer ``time_scale`` is saved in every
state dict, and ``load_state_dict`` sets the model's scale from it. State dicts written before
it existed have no such entry; those models embedded ``1000 * t`` and ``1000 * h``, and load
with that scale (``LEGACY_TIME_SCALE``), which is then also written into ``model.config``. The
MeanFlow target differentiates the model's input t (``torch.func.jvp``), so the scale inside
enters du/dt through the chain rule: the same function u(z, t, h) gives the same target at
any scale; the scale changes which functions the network starts near (sinusoid frequencies
1000 times higher per unit of t at 1000).

MeanFlow training differentiates the network along time with ``torch.func.jvp``; build the model
with ``attn="math"`` for that (the fused sdpa CPU kernels have no forward-mode AD), or switch
an existing model with ``dispersive.models.set_attn_backend(model, "math")``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dispersive.models.layers import FLOW_TIME_SCALE, check_time
from dispersive.models.transformer import DiffusionTransformer

__all__ = ["MeanFlowTransformer", "LEGACY_TIME_SCALE"]

# What MeanFlow models embedded before the time scale was saved with their weights.
LEGACY_TIME_SCALE = FLOW_TIME_SCALE


def _check_time_scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"time_scale must be a positive number; got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"time_scale must be a positive finite number; got {value!r}")
    return float(value)


class MeanFlowTransformer(DiffusionTransformer):
    """MeanFlow average-velocity model ("MF-B/4", ...).

    ``model(x, t, h, y)`` with x (B, C, H, W), t (B,) in [0, 1] (data at 0), h = t - r (B,)
    in [0, t], y (B,) long or None; returns u (B, C, H, W). One-step sampling from noise e:
    x0 = e - model(e, 1, 1, y).

    Args (beyond the backbone's, see :class:`DiffusionTransformer`):
        time_scale: the embedders see ``time_scale * t`` and ``time_scale * h``. Default 1 (the
            official MeanFlow networks); 1000 is what this package used before (and what a
            state dict without a ``time_scale`` entry loads as).
    """

    kind = "meanflow"

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        time_scale: float = 1.0,
        **arch: Any,
    ):
        time_scale = _check_time_scale(time_scale)
        super().__init__(
            input_size=input_size,
            in_channels=in_channels,
            out_channels=in_channels,
            num_classes=num_classes,
            num_times=2,
            time_scale=time_scale,
            **arch,
        )
        # The record that travels with the weights. The embedders compute with the Python float,
        # so casting the model (bf16, ...) rounds only this record, never the embedding.
        self.register_buffer("time_scale", torch.tensor(time_scale, dtype=torch.float32))

    @property
    def time_scale_value(self) -> float:
        """The scale the embedders apply (a Python float)."""
        return self.t_embedders[0].scale

    def _set_time_scale(self, value: float) -> None:
        value = _check_time_scale(value)
        for emb in self.t_embedders:
            emb.scale = value
        config = getattr(self, "config", None)
        if isinstance(config, dict):
            overrides = config.setdefault("overrides", {})
            if value != 1.0 or "time_scale" in overrides:
                overrides["time_scale"] = value  # so build(**model.config) rebuilds this model

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "time_scale"
        if key not in state_dict:
            # Written before the scale was saved: those models embedded 1000 t and 1000 h.
            # (load_state_dict hands each module its own copy of the dict: no caller sees this.)
            state_dict[key] = torch.tensor(LEGACY_TIME_SCALE, dtype=torch.float32)
        saved = state_dict[key]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if isinstance(saved, Tensor) and not saved.is_meta and saved.numel() == 1:
            self._set_time_scale(float(saved))

    def reset_buffers(self) -> None:
        """Recompute the fixed buffers in place (see :meth:`DiffusionTransformer.reset_buffers`)."""
        super().reset_buffers()
        self.time_scale = torch.tensor(
            self.time_scale_value, dtype=torch.float32, device=self.x_embedder.proj.weight.device
        )

    def forward(self, x: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        return self._forward(x, [check_time(t, B, "t", x), check_time(h, B, "h", x)], y)
