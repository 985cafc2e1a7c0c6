"""The DDPM noise schedule used by DiT: forward process, posterior and learned-variance decoding.

Steps k in {0, ..., num_steps - 1}; k = 0 is the least noisy step and ``alphas_cumprod[k]``
decreases with k, so k / num_steps plays the role of t in the package's time convention
(:mod:`dispersive.paths`: t = 0 data, t = 1 noise). Roughly, not exactly: the DDPM marginal
``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` is a variance-preserving path with its own
``abar`` curve, and even the last step keeps a little signal (abar_999 ~ 4e-5).

Formulas follow Ho et al. 2020 and Nichol & Dhariwal 2021 (the "improved DDPM"/ADM code that DiT
uses): linear betas, the posterior q(x_{k-1} | x_k, x0), DiT's learned variance with the
``learned_range`` interpolation, and the variational-bound terms in bits per dimension.

Schedule tables are float64 tensors on the CPU (precision of ``1 - abar`` near k = 0 matters).
Coefficients are gathered where the steps k live and cast to the data's dtype and device; off the
CPU, each of the schedule's own tables is copied to a device once and kept (a copy per lookup
would be a host-to-device transfer, several per training or sampling step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DDPMSchedule",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "respaced_steps",
]

_F64 = torch.float64


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """Elementwise KL( N(mean1, exp(log_var1)) || N(mean2, exp(log_var2)) ) in nats.

    All arguments broadcast against each other; the result has the broadcast shape.
    """
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of data x in [-1, 1] quantised to 256 levels.

    The probability of the bin [x - 1/255, x + 1/255] under N(means, exp(log_scales)^2); the two
    edge bins extend to -inf / +inf. (ADM's decoder term; ADM uses a tanh approximation of the
    normal CDF, here the exact one, ``torch.special.ndtr`` / ``log_ndtr``.)

    Args:
        x: (B, ...) data in [-1, 1].
        means: broadcastable to x.
        log_scales: log standard deviations, broadcastable to x.

    Returns:
        (B, ...) log-probabilities, <= 0.
    """
    inv_std = torch.exp(-log_scales)
    centered = x - means
    plus_in = inv_std * (centered + 1.0 / 255.0)
    min_in = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # log P(X <= x + 1/255)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # log P(X >= x - 1/255)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    # Clamp as ADM does: a bin far in the tail has probability below float precision.
    log_delta = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


class DDPMSchedule:
    """A discrete DDPM schedule (default: DiT's 1000 linear betas from 1e-4 to 0.02).

    Args:
        num_steps: number of diffusion steps K.
        beta_start: beta_0.
        beta_end: beta_{K-1}.
        betas: explicit betas (K,), overriding the linear schedule (used by :meth:`respace`).
        timesteps: (K,) long, the original step index of each step (``arange(K)`` unless the
            schedule was respaced). Models are always called with these original indices.

    Attributes (float64, shape (K,)): ``betas``, ``alphas``, ``alphas_cumprod`` (abar_k),
    ``alphas_cumprod_prev`` (abar_{k-1}, 1 at k=0), ``alphas_cumprod_next`` (abar_{k+1}, 0 at the
    end), ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance``
    (beta~_k), ``posterior_log_variance_clipped`` (log beta~ with the k=0 value, which is 0,
    replaced by the k=1 value), ``posterior_mean_coef1`` / ``posterior_mean_coef2`` (the
    posterior mean is coef1 * x0 + coef2 * x_k), ``log_betas`` (the upper end of the learned
    variance range), ``posterior_log_variance_large`` (log beta_k with log beta~_1 at k = 0: the
    fixed "large" variance); and ``timesteps`` (long).
    """

    def __init__(
        self,
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        *,
        betas: Tensor | Sequence[float] | None = None,
        timesteps: Tensor | None = None,
    ) -> None:
        if betas is None:
            if not isinstance(num_steps, int) or num_steps < 1:
                raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
            if not 0 < beta_start <= beta_end < 1:
                raise ValueError(
                    f"need 0 < beta_start <= beta_end < 1; got beta_start={beta_start}, "
                    f"beta_end={beta_end}"
                )
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=_F64)
        betas = torch.as_tensor(betas, dtype=_F64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence; got shape {betas.shape}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        n = betas.numel()
        if timesteps is None:
            timesteps = torch.arange(n)
        timesteps = torch.as_tensor(timesteps, dtype=torch.long).cpu()
        if timesteps.shape != (n,):
            raise ValueError(f"timesteps must have shape ({n},); got {tuple(timesteps.shape)}")

        self.betas = betas
        self.timesteps = timesteps
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        one, zero = torch.ones(1, dtype=_F64), torch.zeros(1, dtype=_F64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], zero])
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        # q(x_{k-1} | x_k, x0) = N(coef1 x0 + coef2 x_k, beta~_k)
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # beta~_0 = 0; its log is replaced by beta~_1 (ADM). With one step there is no beta~_1:
        # fall back to log beta_0, the upper end of the learned range.
        if n > 1:
            clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
            self.posterior_log_variance_clipped = clipped.log()
        else:
            self.posterior_log_variance_clipped = betas.log()
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * self.alphas.sqrt() / (1.0 - ac)
        self.log_betas = betas.log()
        # ADM's fixed "large" variance: beta_k, with beta~_1 at k = 0 (beta_0 is tiny and would
        # make the last step's likelihood term meaningless); one step has no beta~_1.
        if n > 1:
            self.posterior_log_variance_large = torch.cat(
                [self.posterior_variance[1:2], betas[1:]]
            ).log()
        else:
            self.posterior_log_variance_large = self.log_betas.clone()
        # (id(table), device) -> (table, its copy on that device); the table is held so that
        # its id cannot be reused by another tensor while the entry lives.
        self._device_copies: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def num_steps(self) -> int:
        """K, the number of steps of this schedule (after respacing, the kept count)."""
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        n = self.num_steps
        span = f"{int(self.timesteps[0])}..{int(self.timesteps[-1])}"
        return f"DDPMSchedule(num_steps={n}, timesteps={span})"

    def gather(self, table: Tensor, k: Tensor, x: Tensor) -> Tensor:
        """Values ``table[k]`` reshaped to (B, 1, ..., 1) in x's dtype and device.

        Args:
            table: (K,) float64 schedule table (one of the attributes).
            k: (B,) integer steps in [0, K).
            x: (B, ...) the tensor the values multiply.
        """
        kc = self._check_k(k, x)
        if kc.device != table.device:  # index where k lives: k is never read back to the host
            table = self._table_on(table, kc.device)
        return table[kc].to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def _table_on(self, table: Tensor, device: torch.device) -> Tensor:
        """``table`` on ``device``: copied once per device for the schedule's own tables."""
        key = (id(table), device)
        if key in self._device_copies:  # the entry holds its table: the id is still that table's
            return self._device_copies[key][1]
        copy = table.to(device)
        # Only the schedule's attributes are kept: a caller's table may be a temporary, and
        # keeping it would grow the cache without bound.
        if any(value is table for value in vars(self).values()):
            self._device_copies[key] = (table, copy)
        return copy

    def _check_k(self, k: Tensor, x: Tensor) -> Tensor:
        if not isinstance(k, Tensor) or k.dtype.is_floating_point or k.dtype == torch.bool:
            raise TypeError(
                f"k must be an integer tensor of DDPM steps (B,); got {type(k).__name__} "
                f"{getattr(k, 'dtype', '')}. Draw steps with dispersive.timesteps.sample_steps "
                "or convert with k.long()"
            )
        if k.shape != (x.shape[0],):
            raise ValueError(f"k must have shape ({x.shape[0]},) to match x; got {tuple(k.shape)}")
        kc = k.detach()
        if kc.device.type != "cpu":
            # The range check would read k back every call (a host sync on an accelerator, many
            # per step); there an out-of-range index fails the gather's device-side assert.
            return kc
        if kc.numel() and (int(kc.min()) < 0 or int(kc.max()) >= self.num_steps):
            raise ValueError(
                f"k must lie in [0, {self.num_steps - 1}]; got values in "
                f"[{int(kc.min())}, {int(kc.max())}]"
            )
        return kc

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, k: Tensor, noise: Tensor) -> Tensor:
        """x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) noise.

        Args:
            x0: (B, ...) data.
            k: (B,) integer steps.
            noise: (B, ...) standard normal, same shape as x0.

        Returns:
            x_k: (B, ...).
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must match x0 {tuple(x0.shape)}")
        return (
            self.gather(self.sqrt_alphas_cumprod, k, x0) * x0
            + self.gather(self.sqrt_one_minus_alphas_cumprod, k, x0) * noise
        )

    def q_posterior(self, x0: Tensor, x_k: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{k-1} | x_k, x0).

        Args:
            x0: (B, ...) data (or a prediction of it).
            x_k: (B, ...) noisy sample at step k.
            k: (B,) integer steps.

        Returns:
            (mean, var, log_var), each (B, ...) like x_k (var and log_var are expanded views).
        """
        mean = (
            self.gather(self.posterior_mean_coef1, k, x_k) * x0
            + self.gather(self.posterior_mean_coef2, k, x_k) * x_k
        )
        var = self.gather(self.posterior_variance, k, x_k).expand_as(x_k)
        log_var = self.gather(self.posterior_log_variance_clipped, k, x_k).expand_as(x_k)
        return mean, var, log_var

    def predict_x0_from_eps(self, x_k: Tensor, k: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_k - sqrt(1 - abar_k) eps) / sqrt(abar_k)."""
        return (
            self.gather(self.sqrt_recip_alphas_cumprod, k, x_k) * x_k
            - self.gather(self.sqrt_recipm1_alphas_cumprod, k, x_k) * eps
        )

    def predict_eps_from_x0(self, x_k: Tensor, k: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_k - sqrt(abar_k) x0) / sqrt(1 - abar_k)."""
        return (self.gather(self.sqrt_recip_alphas_cumprod, k, x_k) * x_k - x0) / self.gather(
            self.sqrt_recipm1_alphas_cumprod, k, x_k
        )

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model_out: Tensor,
        x_k: Tensor,
        k: Tensor,
        learn_sigma: bool = True,
        clip_x0: bool = False,
        fixed_var: str = "large",
    ) -> dict[str, Tensor]:
        """Decode a model output into the reverse step p(x_{k-1} | x_k).

        With ``learn_sigma`` the output is DiT's (B, 2C, ...) = [eps, v] and
        ``log_var = f log(beta_k) + (1 - f) posterior_log_variance_clipped_k``, f = (v + 1) / 2
        (ADM's "learned_range"). Without it the output is eps (B, C, ...) and the variance is
        fixed: "large" = beta_k (with beta~_1 at k = 0; ADM's default when the variance is not
        learned) or "small" = beta~_k (clipped).

        Args:
            model_out: (B, 2C, ...) if learn_sigma else (B, C, ...).
            x_k: (B, C, ...) noisy sample.
            k: (B,) integer steps.
            learn_sigma: whether model_out carries the variance channels.
            clip_x0: clamp the x0 prediction to [-1, 1] (pixel data; DiT on latents: False).
            fixed_var: "large" or "small" (only when learn_sigma is False).

        Returns:
            dict with "mean", "var", "log_var", "x0", "eps", each (B, C, ...). When x0 is
            clipped, "eps" is re-derived from the clipped x0 (what DDIM needs).
        """
        c = x_k.shape[1]
        if learn_sigma:
            if model_out.shape[1] != 2 * c or model_out.shape[2:] != x_k.shape[2:]:
                raise ValueError(
                    f"with learn_sigma=True the model output must be (B, 2C, ...) = "
                    f"{(x_k.shape[0], 2 * c, *x_k.shape[2:])}; got {tuple(model_out.shape)}"
                )
            eps, v = model_out[:, :c], model_out[:, c:]
            frac = (v + 1.0) / 2.0
            max_log = self.gather(self.log_betas, k, x_k)
            min_log = self.gather(self.posterior_log_variance_clipped, k, x_k)
            log_var = frac * max_log + (1.0 - frac) * min_log
        else:
            if model_out.shape != x_k.shape:
                raise ValueError(
                    f"with learn_sigma=False the model output must match x_k "
                    f"{tuple(x_k.shape)}; got {tuple(model_out.shape)}"
                )
            eps = model_out
            if fixed_var == "large":
                table = self.posterior_log_variance_large
            elif fixed_var == "small":
                table = self.posterior_log_variance_clipped
            else:
                raise ValueError(f"fixed_var must be 'large' or 'small'; got {fixed_var!r}")
            log_var = self.gather(table, k, x_k).expand_as(x_k)
        x0 = self.predict_x0_from_eps(x_k, k, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(x_k, k, x0)
        mean, _, _ = self.q_posterior(x0, x_k, k)
        return {"mean": mean, "var": torch.exp(log_var), "log_var": log_var, "x0": x0, "eps": eps}

    def vb_terms(
        self, x0: Tensor, x_k: Tensor, k: Tensor, *, mean: Tensor, log_var: Tensor
    ) -> Tensor:
        """Per-sample variational-bound term L_k in bits per dimension.

        For k > 0: KL(q(x_{k-1} | x_k, x0) || N(mean, exp(log_var))). For k = 0 (the last
        reverse step, where q has zero variance): the decoder negative log-likelihood
        -log p(x0 | x_1) of 8-bit data under the discretised Gaussian (ADM). On continuous
        latents (DiT) that k = 0 term is only a proxy; it is what DiT trains with.

        Args:
            x0: (B, ...) data.
            x_k: (B, ...) noisy sample at k.
            k: (B,) integer steps.
            mean, log_var: (B, ...) the model's reverse-step Gaussian.

        Returns:
            (B,) mean over non-batch dims, in bits.
        """
        true_mean, _, true_log_var = self.q_posterior(x0, x_k, k)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_var)
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(k.to(kl.device) == 0, nll, kl)

    # ------------------------------------------------------------------ respacing
    def respace(self, steps: int | Sequence[int]) -> DDPMSchedule:
        """A shorter schedule that visits a subset of the steps (DiT/ADM "respacing").

        The kept steps keep their ``alphas_cumprod``; betas are recomputed as
        ``1 - abar_i / abar_prev_kept``. ``timesteps`` of the result holds the original
        indices, which is what the model must be called with.

        Args:
            steps: a count n (n evenly spaced steps from the first to the last, rounded by
                ADM's ``space_timesteps`` rule, which DiT uses: see :func:`respaced_steps`) or
                an explicit sequence of step indices into this schedule.

        Returns:
            A new DDPMSchedule with ``num_steps == len(kept)``.
        """
        n = self.num_steps
        if isinstance(steps, int) and not isinstance(steps, bool):
            if not 1 <= steps <= n:
                raise ValueError(f"steps must be in [1, {n}]; got {steps}")
            kept = respaced_steps(n, steps)
        else:
            kept = sorted({int(s) for s in steps})
            if not kept or kept[0] < 0 or kept[-1] >= n:
                raise ValueError(f"respace indices must be a non-empty subset of [0, {n - 1}]")
        idx = torch.tensor(kept, dtype=torch.long)
        ac = self.alphas_cumprod[idx]
        prev = torch.cat([torch.ones(1, dtype=_F64), ac[:-1]])
        return DDPMSchedule(betas=1.0 - ac / prev, timesteps=self.timesteps[idx])


def respaced_steps(num_steps: int, count: int) -> list[int]:
    """The ``count`` step indices of a ``num_steps`` schedule that DiT / ADM respacing keeps.

    ADM's ``space_timesteps(num_steps, [count])`` (improved-diffusion / guided-diffusion
    ``respace.py``, used by DiT's ``--num-sampling-steps``): a position starts at 0 and grows by
    the stride ``(num_steps - 1) / (count - 1)`` by repeated float64 addition, and each position
    is rounded half to even. Both details matter: rounding ``i * stride`` directly breaks ties
    differently for 283 counts in 2..1000 (never for 10, 25, 50, 100, 250, 500 or 1000).
    ``count = 1`` keeps the last (noisiest) step, where ADM would keep step 0, from which no
    sample can be drawn.

    Args:
        num_steps: T, the length of the original schedule.
        count: n in [1, T].

    Returns:
        The kept indices, increasing.
    """
    if not 1 <= count <= num_steps:
        raise ValueError(f"count must be in [1, {num_steps}]; got {count}")
    if count == 1:
        return [num_steps - 1]
    stride = (num_steps - 1) / (count - 1)
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))  # Python's round: half to even, as ADM's
        position += stride  # accumulated, not i * stride: ADM's ties depend on it
    return kept
