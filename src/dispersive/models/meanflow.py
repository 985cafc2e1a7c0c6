"""MeanFlow: the SiT backbone with a second time input, predicting the average velocity.

``model(x, t, h, y) -> u`` (B, C, H, W): the average velocity over [r, t] with h = t - r >= 0
(Geng et al., 2025). Two timestep embedders, one for t and one for h (both embedded as
1000 * value), are summed with the class embedding into the adaLN conditioning vector.

MeanFlow training differentiates the network along time with ``torch.func.jvp``; build the model
with ``attn="math"`` for that (the fused sdpa CPU kernels have no forward-mode AD), or switch
an existing model with ``dispersive.models.set_attn_backend(model, "math")``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from dispersive.models.layers import FLOW_TIME_SCALE, check_time
from dispersive.models.transformer import DiffusionTransformer

__all__ = ["MeanFlowTransformer"]


class MeanFlowTransformer(DiffusionTransformer):
    """MeanFlow average-velocity model ("MF-B/4", ...).

    ``model(x, t, h, y)`` with x (B, C, H, W), t (B,) in [0, 1] (data at 0), h = t - r (B,)
    in [0, t], y (B,) long or None; returns u (B, C, H, W). One-step sampling from noise e:
    x0 = e - model(e, 1, 1, y).
    """

    kind = "meanflow"

    def __init__(self, *, input_size: int, in_channels: int, num_classes: int, **arch: Any):
        super().__init__(
            input_size=input_size,
            in_channels=in_channels,
            out_channels=in_channels,
            num_classes=num_classes,
            num_times=2,
            time_scale=FLOW_TIME_SCALE,
            **arch,
        )

    def forward(self, x: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        B = x.shape[0]
        return self._forward(x, [check_time(t, B, "t", x), check_time(h, B, "h", x)], y)
