"""Classifier-free guidance as a wrapper around the model function.

:func:`guided` turns a class-conditional ``model_fn(x, t, *extra, y)`` into a plain ``fn(x, t,
*extra)`` that a sampler can call, so samplers never see labels or guidance::

    fn = guided(lambda x, t, y: model(x, t, y), y=labels, null_y=num_classes, scale=4.0)
    x0 = heun(fn, noise, steps=50)

The guided output is ``uncond + scale * (cond - uncond)``: scale 1 is the conditional model,
scale 0 the unconditional one. Both halves come from ONE forward on the doubled batch
``cat([x, x])`` with labels ``cat([y, null_y])`` (what DiT/SiT do). Guidance applies to the
first ``channels`` output channels (None = all) and the rest is the conditional output; DiT and
SiT's released code guide only the first 3 channels of 4-channel latents, reproduced by
``channels=3``. For DiT's learned variance (output [eps, v] with 2C channels) use
``channels=C``: eps is guided and the variance comes from the conditional half.

Guidance interval (Kynkaenniemi et al. 2024): guidance applies where ``lo <= t <= hi`` for the
per-sample t that ``fn`` receives (this package's t: 0 data, 1 noise; for DDPM models t is the
step index k, see :func:`dispersive.generate.generate`). Outside, the output is the conditional
prediction, and samples outside the interval are not doubled: a batch entirely outside costs
one plain forward, a mixed batch a forward on the batch plus its inside part. Finding which
samples are inside reads t back (a host sync per call on an accelerator); ``interval=None``
guides at every t without that test, which :func:`dispersive.generate.generate` passes when the
interval covers every t its sampler can produce (the default (0, 1)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["guided", "guide", "cfg"]


def guide(cond: Tensor, uncond: Tensor, scale: float, channels: int | None = None) -> Tensor:
    """``uncond + scale * (cond - uncond)`` on the first ``channels`` channels, cond elsewhere.

    Args:
        cond: (B, C, ...) conditional output.
        uncond: (B, C, ...) unconditional output.
        scale: guidance scale w.
        channels: number of leading channels (dim 1) to guide; None = all.

    Returns:
        (B, C, ...) guided output.
    """
    if channels is None or channels >= cond.shape[1]:
        return uncond + scale * (cond - uncond)
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


def _as_labels(y: Tensor | int, batch: int, device: torch.device, name: str) -> Tensor:
    y = torch.as_tensor(y, device=device)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels; got dtype {y.dtype}")
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match x; got {tuple(y.shape)}")
    return y


def _double(a: Any, rows: Tensor | None, batch: int) -> Any:
    """A per-sample argument (a (B, ...) tensor) followed by its ``rows``; others unchanged."""
    if isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == batch:
        return torch.cat([a, a if rows is None else a[rows]])
    return a


def guided(
    model_fn: Callable[..., Tensor],
    *,
    y: Tensor,
    null_y: Tensor | int,
    scale: float,
    interval: Sequence[float] | None = (0.0, 1.0),
    channels: int | None = None,
) -> Callable[..., Tensor]:
    """Wrap a conditional model function with classifier-free guidance.

    Args:
        model_fn: ``model_fn(x (B, ...), t (B,), *extra, y (B,)) -> (B, C_out, ...)``; extra
            positional arguments (MeanFlow's h) that are (B, ...) tensors are doubled and
            sliced like x, anything else is passed through.
        y: (B,) long class labels of the batch the sampler will integrate.
        null_y: the null ("dropped") label, an int (``num_classes``) or a (B,) tensor.
        scale: guidance scale w; 1.0 returns the plain conditional function (no doubling).
        interval: (lo, hi), the closed range of t where guidance applies; None: every t,
            without testing t (nothing read back from the device).
        channels: guide the first ``channels`` output channels only; None = all.

    Returns:
        ``fn(x, t, *extra) -> (B, C_out, ...)``, the guided prediction.
    """
    if y is None:
        raise ValueError(
            "guided() needs the class labels y; an unconditional model has no guidance"
        )
    every_t = interval is None
    lo, hi = (-math.inf, math.inf) if every_t else (float(v) for v in interval)
    if not lo <= hi:
        raise ValueError(f"guidance interval must satisfy lo <= hi; got {tuple(interval)}")
    if channels is not None and channels < 1:
        raise ValueError(f"channels must be a positive int or None; got {channels}")
    scale = float(scale)

    def conditional(x: Tensor, t: Tensor, *extra: Any) -> Tensor:
        return model_fn(x, t, *extra, _as_labels(y, x.shape[0], x.device, "y"))

    if scale == 1.0:
        return conditional  # guidance with w = 1 is the conditional model: skip the doubling

    def guided(x: Tensor, t: Tensor, *extra: Any) -> Tensor:
        b = x.shape[0]
        labels = _as_labels(y, b, x.device, "y")
        null = _as_labels(null_y, b, x.device, "null_y")
        tt = t.expand(b) if t.ndim == 0 else t
        rows = None  # every row inside
        if not every_t:
            inside = (tt >= lo) & (tt <= hi)
            if not bool(inside.any()):
                return model_fn(x, t, *extra, labels)
            rows = None if bool(inside.all()) else inside.nonzero().squeeze(1)
        # One forward: the conditional batch, then the unconditional copies of the inside rows.
        out = model_fn(
            _double(x, rows, b),
            _double(tt, rows, b),
            *(_double(a, rows, b) for a in extra),
            torch.cat([labels, null if rows is None else null[rows]]),
        )
        cond, uncond = out[:b], out[b:]
        if rows is None:
            return guide(cond, uncond, scale, channels)
        result = cond.clone()
        result[rows] = guide(cond[rows], uncond, scale, channels)
        return result

    return guided


#: Old name of :func:`guided` (``cfg`` also names the run config everywhere in the system).
cfg = guided
