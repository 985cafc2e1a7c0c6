"""Interpolation paths between data and noise. THE time convention of the package lives here.

Convention (used by every objective, sampler and model in ``dispersive``):

    x_t = alpha(t) * x0 + sigma(t) * noise,   t in [0, 1],
    t = 0 is data (alpha=1, sigma=0), t = 1 is noise (alpha=0, sigma=1),

and a velocity model predicts ``v = d x_t / d t = alpha'(t) x0 + sigma'(t) noise``.
Samplers therefore integrate from t=1 (noise) down to t=0 (data).

This is the convention of MeanFlow and REPA. SiT uses the reverse (data at t=1, noise at t=0):
``t_sit = 1 - t`` and ``v_sit = -v``. :func:`to_sit_time` and :func:`from_sit_time` do the mapping.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "AffinePath",
    "LinearPath",
    "GVPPath",
    "PATHS",
    "get_path",
    "expand_like",
    "to_sit_time",
    "from_sit_time",
]


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample ``t`` of shape (B,) to (B, 1, ..., 1) so it broadcasts against x."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(
            f"t must have shape ({x.shape[0]},) to match x {tuple(x.shape)}; got {tuple(t.shape)}"
        )
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class AffinePath:
    """x_t = alpha(t) x0 + sigma(t) noise, with data at t=0 and noise at t=1.

    Subclasses define ``alpha``, ``sigma`` and their time derivatives on tensors of t.
    """

    name = "affine"

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t for data x0 (B, ...), noise (B, ...) and t (B,)."""
        tt = expand_like(t, x0)
        return self.alpha(tt) * x0 + self.sigma(tt) * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The conditional velocity d x_t / d t, the flow-matching regression target."""
        tt = expand_like(t, x0)
        return self.d_alpha(tt) * x0 + self.d_sigma(tt) * noise

    def _inverse(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, ...]:
        # Invert the 2x2 system x_t = a x0 + s e, v = a' x0 + s' e for (x0, e): its per-sample
        # coefficients (B, 1, ...) and determinant. Each estimate below computes only its own
        # row; the other's full-size operations would be thrown away.
        tt = expand_like(t, x_t)
        a, s, da, ds = self.alpha(tt), self.sigma(tt), self.d_alpha(tt), self.d_sigma(tt)
        return a, s, da, ds, a * ds - s * da

    def velocity_to_x0(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The data estimate implied by a velocity prediction."""
        _, s, _, ds, det = self._inverse(x_t, t)
        return (ds * x_t - s * v) / det

    def velocity_to_noise(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise (epsilon) estimate implied by a velocity prediction."""
        a, _, da, _, det = self._inverse(x_t, t)
        return (a * v - da * x_t) / det

    def velocity_to_score(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """grad_x log p_t(x_t) = -E[noise | x_t] / sigma(t); undefined at t=0 (sigma=0)."""
        return -self.velocity_to_noise(v, x_t, t) / self.sigma(expand_like(t, x_t))

    def score_coefficients(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(p, q), each (B, 1, ...), with ``velocity_to_score(v, x_t, t) = p x_t + q v``.

        The score is linear in (x_t, v) on an affine path: p = alpha' / (det sigma), q = -alpha /
        (det sigma), det = alpha sigma' - sigma alpha'. A sampler can fold p and q into its own
        per-sample coefficients and update x in a couple of full-size operations instead of
        forming the score (as the Euler-Maruyama sampler does). Undefined at t=0 (sigma=0).
        """
        a, s, da, _, det = self._inverse(x_t, t)
        r = 1 / (det * s)
        return da * r, -a * r

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearPath(AffinePath):
    """alpha = 1 - t, sigma = t: the rectified-flow / SiT "Linear" interpolant."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class GVPPath(AffinePath):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2): SiT's variance-preserving "GVP" path."""

    name = "gvp"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


PATHS: dict[str, type[AffinePath]] = {"linear": LinearPath, "gvp": GVPPath}


def get_path(name: str) -> AffinePath:
    """Build a path by name ("linear" or "gvp")."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; valid paths: {sorted(PATHS)}")
    return PATHS[name]()


def to_sit_time(t: Tensor) -> Tensor:
    """Map this package's t (data at 0) to SiT's t (data at 1). Velocities change sign too."""
    return 1 - t


def from_sit_time(t_sit: Tensor) -> Tensor:
    """Map SiT's t (data at 1) to this package's t (data at 0)."""
    return 1 - t_sit
