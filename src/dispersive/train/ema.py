"""Exponential moving average of model weights (paper Table 8: decay 0.9999), used for sampling."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from dispersive.taps import unwrap

__all__ = ["EMA", "unwrap_model"]


#: Old name of :func:`dispersive.taps.unwrap`.
unwrap_model = unwrap


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    The EMA model is a deep copy of the model (eval mode, no gradients) and is what sampling
    and evaluation use. Buffers are copied, not averaged.

    Args:
        model: the model being trained (DDP / compiled wrappers are unwrapped).
        decay: the EMA decay in [0, 1].
        warmup: use ``min(decay, (1 + n) / (10 + n))`` with n the number of updates so far, so
            that short runs are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self, step: int | None = None) -> float:
        """The decay used by the next update (``step`` defaults to the number of updates)."""
        n = self.num_updates if step is None else step
        if self.warmup:
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None, mask: Tensor | None = None) -> None:
        """Move the EMA weights towards ``model``'s current weights.

        Args:
            model: the trained model (wrappers are unwrapped).
            step: optimizer steps done before this update (for the warm-up schedule); defaults
                to the number of updates so far.
            mask: a 0-dim bool tensor on the model's device; where False the update changes
                nothing (weight 0), without reading the value back (train/guard.py). Buffers
                are copied either way (the model's are unchanged by a skipped step).
        """
        weight: float | Tensor = 1.0 - self.current_decay(step)
        if mask is not None:
            weight = mask.to(torch.float32) * weight
        src = unwrap(model)
        ema_params = dict(self.model.named_parameters())
        for name, p in src.named_parameters():
            # lerp_: ema + w * (p - ema), one fused op per tensor.
            e = ema_params[name]
            w = weight.to(e.dtype) if isinstance(weight, Tensor) else weight
            e.lerp_(p.detach().to(e.dtype), w)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in src.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (``weights_only``-loadable)."""
        return {
            "shadow": self.model.state_dict(),
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the EMA weights and counters; the decay settings of ``self`` are kept."""
        self.model.load_state_dict(state["shadow"])
        self.num_updates = int(state["num_updates"])
