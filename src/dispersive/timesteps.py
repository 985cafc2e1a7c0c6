"""Sampling of noise levels: t for flow matching, (t, r) pairs for MeanFlow, integer steps for DDPM.

Time convention (see :mod:`dispersive.paths`): t in [0, 1], t = 0 is data, t = 1 is noise.
DDPM steps k in {0, ..., num_steps - 1} are noisier with larger k (k / num_steps ~ t).

All randomness comes from the ``generator`` argument (or the global RNG when it is None); a
generator must live on the same device as the tensors it draws (``device``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["T_DISTS", "TWO_VIEW_MODES", "sample_t", "sample_t_r", "sample_steps", "two_view_t"]

#: Valid names of the t distribution.
T_DISTS = ("uniform", "logit_normal")
#: Valid ``mode`` values of :func:`two_view_t`.
TWO_VIEW_MODES = ("independent", "restricted")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int (the batch size); got {n!r}")


def sample_t(
    n: int,
    *,
    dist: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw n noise levels t in [0, 1].

    Args:
        n: number of samples.
        dist: "uniform" (U[0, 1], SiT) or "logit_normal" (sigmoid(N(mean, std^2)), SD3/MeanFlow).
        mean: mean of the normal before the sigmoid (logit_normal only).
        std: standard deviation of the normal before the sigmoid (logit_normal only).
        generator: source of randomness (on ``device``).
        device: device of the result.
        dtype: floating dtype of the result.

    Returns:
        t: (n,) in [0, 1] (logit_normal lies in the open interval (0, 1) up to rounding).
    """
    _check_n(n)
    if dist == "uniform":
        return torch.rand(n, generator=generator, device=device, dtype=dtype)
    if dist == "logit_normal":
        if not std > 0:
            raise ValueError(f"std of the logit-normal must be > 0; got {std}")
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(mean + std * z)
    raise ValueError(f"unknown t distribution {dist!r}; valid choices: {list(T_DISTS)}")


def sample_t_r(
    n: int,
    *,
    ratio_r_neq_t: float = 0.25,
    dist: str = "logit_normal",
    mean: float = -0.4,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Draw MeanFlow time pairs (t, r) with 0 <= r <= t <= 1.

    Two independent draws from ``dist`` are sorted so that r <= t; then a share
    ``1 - ratio_r_neq_t`` of the samples gets r = t (plain flow matching on those samples).
    The share is exact: ``round(n * (1 - ratio_r_neq_t))`` samples, at random positions (a
    random permutation, so the choice is independent of how the batch is ordered).

    Defaults are MeanFlow's ImageNet setting (Geng et al. 2025, Table "configurations"):
    logit-normal(-0.4, 1.0) for both draws, 25% of pairs with r != t.

    Args:
        n: number of pairs.
        ratio_r_neq_t: fraction of pairs with r != t, in [0, 1].
        dist, mean, std: the distribution of each draw, as in :func:`sample_t`.
        generator: source of randomness (on ``device``).
        device: device of the results.
        dtype: floating dtype of the results.

    Returns:
        (t, r): two (n,) tensors with r <= t elementwise.
    """
    _check_n(n)
    if not 0.0 <= ratio_r_neq_t <= 1.0:
        raise ValueError(f"ratio_r_neq_t must be in [0, 1]; got {ratio_r_neq_t}")
    a = sample_t(n, dist=dist, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    b = sample_t(n, dist=dist, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    num_equal = round(n * (1.0 - ratio_r_neq_t))
    idx = torch.randperm(n, generator=generator, device=device)[:num_equal]
    r = r.clone()
    r[idx] = t[idx]
    return t, r


def sample_steps(
    n: int,
    *,
    num_steps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n DDPM steps uniformly from {0, ..., num_steps - 1} (larger k = noisier).

    Returns:
        k: (n,) long.
    """
    _check_n(n)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
    return torch.randint(0, num_steps, (n,), generator=generator, device=device)


def two_view_t(
    t: Tensor,
    *,
    mode: str,
    max_gap: float = 0.005,
    generator: torch.Generator | None = None,
    dist: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Noise level of the second view for the contrastive comparison (paper Table 2).

    * "independent": t2 is a fresh draw from the same distribution as t (``dist``, ``mean``,
      ``std`` as in :func:`dispersive.timesteps.sample_t`; pass the ones t was drawn with).
    * "restricted": t2 is uniform on ``[t - max_gap, t + max_gap]`` intersected with [0, 1], so
      ``|t2 - t| <= max_gap`` and t2 stays in [0, 1] without piling up at the ends.

    The second view's noise is always drawn independently by the caller; the regression loss
    uses the first view only.

    Args:
        t: (B,) noise levels of the first view, in [0, 1].
        mode: "independent" or "restricted".
        max_gap: half-width of the restricted window (paper: 0.005).
        generator: source of randomness (on t's device).
        dist, mean, std: the t distribution for "independent".

    Returns:
        t2: (B,) like t.
    """
    if not isinstance(t, Tensor) or t.ndim != 1 or not t.dtype.is_floating_point:
        raise ValueError(f"t must be a float tensor of shape (B,); got {getattr(t, 'shape', t)}")
    if mode == "independent":
        return sample_t(
            t.shape[0],
            dist=dist,
            mean=mean,
            std=std,
            generator=generator,
            device=t.device,
            dtype=t.dtype,
        )
    if mode == "restricted":
        if not max_gap >= 0 or math.isinf(max_gap):
            raise ValueError(f"max_gap must be a finite number >= 0; got {max_gap}")
        lo = (t - max_gap).clamp(min=0.0)
        hi = (t + max_gap).clamp(max=1.0)
        u = torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        return lo + u * (hi - lo)
    raise ValueError(f"unknown two-view mode {mode!r}; valid modes: {list(TWO_VIEW_MODES)}")
