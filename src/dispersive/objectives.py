"""Per-sample training objectives: flow matching (SiT), DDPM with learned variance (DiT), MeanFlow.

Every loss returns an unreduced tensor of shape (B,) (the caller averages, adds the dispersive
term, weights...). Randomness enters only through arguments (``t``, ``k``, ``noise``,
``generator``): nothing here touches the global RNG.

Time convention (:mod:`dispersive.paths`): t = 0 is data, t = 1 is noise,
``x_t = alpha(t) x0 + sigma(t) noise`` and velocity ``v = d x_t / d t``. For the linear path
``v = noise - x0``. SiT's code uses ``t_sit = 1 - t`` and ``v_sit = -v``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dispersive.ddpm import DDPMSchedule
from dispersive.paths import AffinePath, expand_like
from dispersive.taps import unwrap
from dispersive.timesteps import TWO_VIEW_MODES, sample_t, two_view_t  # noqa: F401 (old home)

__all__ = [
    "TWO_VIEW_MODES",
    "flow_matching_loss",
    "ddpm_loss",
    "meanflow_loss",
    "meanflow_target",
    "meanflow_guided_velocity",
    "two_view_t",
]


def _mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _sum_flat(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: (B, ...) -> (B,)."""
    return x.sum(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _check_same_shape(pred: Tensor, ref: Tensor, what: str) -> None:
    if not isinstance(pred, Tensor):
        raise TypeError(f"{what} must return a Tensor; got {type(pred).__name__}")
    if pred.shape != ref.shape:
        raise ValueError(
            f"{what} returned shape {tuple(pred.shape)}; expected {tuple(ref.shape)} "
            "(the shape of x0)"
        )


def _check_noise(x0: Tensor, noise: Tensor) -> None:
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the shape of x0 {tuple(x0.shape)}")


# --------------------------------------------------------------------------- flow matching
def flow_matching_loss(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    *,
    t: Tensor,
    noise: Tensor,
    path: AffinePath,
) -> Tensor:
    """Flow matching with velocity prediction (SiT): ``mean((model_fn(x_t, t) - v)^2)``.

    Args:
        model_fn: ``model_fn(x_t, t) -> v_pred`` with x_t (B, ...), t (B,) in this package's
            convention (data at t=0).
        x0: (B, ...) data.
        t: (B,) noise levels in [0, 1] (e.g. :func:`dispersive.timesteps.sample_t`).
        noise: (B, ...) standard normal noise.
        path: an :class:`~dispersive.paths.AffinePath` (``LinearPath`` for SiT's default,
            ``GVPPath`` for the variance-preserving option).

    Returns:
        (B,) squared error averaged over the non-batch dimensions.

    The minimiser over all functions is ``E[v | x_t]``, the marginal velocity field.
    """
    _check_noise(x0, noise)
    x_t = path.interpolate(x0, noise, t)
    target = path.velocity(x0, noise, t)
    pred = model_fn(x_t, t)
    _check_same_shape(pred, target, "model_fn(x_t, t)")
    return _mean_flat((pred - target) ** 2)


# --------------------------------------------------------------------------- DDPM (DiT)
def ddpm_loss(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    *,
    k: Tensor,
    noise: Tensor,
    schedule: DDPMSchedule,
    learn_sigma: bool = True,
) -> Tensor:
    """DiT's DDPM objective: epsilon MSE, plus the variational-bound term for the variance.

    The "hybrid" loss of improved DDPM (Nichol & Dhariwal 2021) as DiT trains it:
    ``mse(eps_pred, noise) + (K / 1000) * L_vb``. The vb term is computed with a stop-gradient on
    the predicted eps, so it trains only the variance channels (the mean is trained by the MSE).
    ``K / 1000`` is improved-DDPM's lambda = 0.001 times K (L_vlb summed over K steps); it is 1
    for DiT's 1000 steps. L_vb is in bits per dimension; at k = 0 it is the discretised-Gaussian
    decoder NLL (see :meth:`DDPMSchedule.vb_terms`), otherwise the KL to the true posterior.

    Args:
        model_fn: ``model_fn(x_k, k_float) -> out``, out (B, 2C, ...) = [eps, v] when
            ``learn_sigma`` else (B, C, ...) = eps. It receives the step as a float tensor (B,)
            of original step indices (``schedule.timesteps[k]``), the DiT model convention.
        x0: (B, C, ...) data.
        k: (B,) integer steps in [0, K) (:func:`dispersive.timesteps.sample_steps`).
        noise: (B, C, ...) standard normal noise.
        schedule: the :class:`~dispersive.ddpm.DDPMSchedule`.
        learn_sigma: whether the model predicts the variance (DiT: True).

    Returns:
        (B,) per-sample loss.
    """
    _check_noise(x0, noise)
    x_k = schedule.q_sample(x0, k, noise)
    k_model = schedule.timesteps.to(k.device)[k].to(x0.dtype)
    out = model_fn(x_k, k_model)
    c = x0.shape[1]
    if not learn_sigma:
        _check_same_shape(out, x0, "model_fn(x_k, k)")
        return _mean_flat((noise - out) ** 2)
    if not isinstance(out, Tensor) or out.shape != (x0.shape[0], 2 * c, *x0.shape[2:]):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"with learn_sigma=True model_fn(x_k, k) must return (B, 2C, ...) = "
            f"{(x0.shape[0], 2 * c, *x0.shape[2:])} (eps then variance values); got {got}. "
            "Pass learn_sigma=False for an eps-only model."
        )
    eps_pred, v = out[:, :c], out[:, c:]
    mse = _mean_flat((noise - eps_pred) ** 2)
    # Stop-gradient on the mean: the vb term trains the variance only (improved DDPM, Sec. 3.1).
    frozen = torch.cat([eps_pred.detach(), v], dim=1)
    pmv = schedule.p_mean_variance(frozen, x_k, k, learn_sigma=True)
    vb = schedule.vb_terms(x0, x_k, k, mean=pmv["mean"], log_var=pmv["log_var"])
    return mse + vb * (schedule.num_steps / 1000.0)


# --------------------------------------------------------------------------- MeanFlow
def _discard_tap(tap: Any) -> None:
    """Forget whatever the tap recorded (e.g. during the no-grad jvp forwards)."""
    if hasattr(tap, "clear"):
        tap.clear()
        return
    try:
        tap.pop()
    except (RuntimeError, LookupError, ValueError):
        pass  # nothing was recorded: fine


def meanflow_guided_velocity(
    fn: Callable[..., Tensor],
    z_t: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    y: Tensor | None = None,
    omega: float = 1.0,
    kappa: float = 0.0,
    t_interval: tuple[float, float] = (0.0, 1.0),
    null_y: int | None = None,
) -> Tensor:
    """MeanFlow's guided instantaneous velocity (Geng et al. 2025, Sec. 4.2 and App. "CFG").

    ``v~ = omega * v + kappa * u(z_t, t, t | y) + (1 - omega - kappa) * u(z_t, t, t | null)``
    where u(., t, t) (h = 0) is the network's own instantaneous velocity, evaluated without
    gradient. It is applied to samples whose t lies in ``t_interval`` (inclusive) and whose label
    is not already the null label (those are the label-dropout samples: they learn the
    unconditional field, so their target stays v). Elsewhere v~ = v.

    At the optimum u(.|y) = omega' v(.|y) + (1 - omega') v(.|null) with the *effective* scale
    ``omega' = omega / (1 - kappa)``; e.g. the Dispersive-Loss paper's MF-B/4 setting
    omega' = 2.0, kappa = 0.5 means ``omega = 1.0, kappa = 0.5`` here. With omega = 1 and
    kappa = 0, v~ = v and no network evaluation is made.

    Args:
        fn: ``fn(z, t, h, y) -> u`` (no DDP wrapper needed: called under no_grad).
        z_t: (B, ...) noisy input; t: (B,); v: (B, ...) the conditional velocity noise - x0.
        y: (B,) long labels (``null_y`` marks dropped labels).
        omega, kappa: guidance weights.
        t_interval: (t_min, t_max), guidance is applied for t_min <= t <= t_max.
        null_y: the null label (usually ``num_classes``).

    Returns:
        (B, ...) the target velocity v~ (no gradient).
    """
    if omega == 1.0 and kappa == 0.0:
        return v
    if y is None or null_y is None:
        raise ValueError(
            "guided MeanFlow targets (cfg_omega != 1 or cfg_kappa != 0) need class labels y and "
            "the null label null_y (usually num_classes)"
        )
    lo, hi = t_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_t_interval must satisfy 0 <= t_min <= t_max <= 1; got {t_interval}")
    b = z_t.shape[0]
    h0 = torch.zeros_like(t)
    y_null = torch.full_like(y, null_y)
    with torch.no_grad():
        if kappa != 0.0:
            # One batched forward for the conditional and the unconditional branch.
            u = fn(
                torch.cat([z_t, z_t]),
                torch.cat([t, t]),
                torch.cat([h0, h0]),
                torch.cat([y, y_null]),
            )
            u_cond, u_null = u[:b], u[b:]
        else:
            u_cond, u_null = 0.0, fn(z_t, t, h0, y_null)
        v_g = omega * v + kappa * u_cond + (1.0 - omega - kappa) * u_null
    use = (t >= lo) & (t <= hi) & (y != null_y)
    return torch.where(expand_like(use, v).bool(), v_g.to(v.dtype), v)


def meanflow_target(
    fn: Callable[..., Tensor],
    z_t: Tensor,
    t: Tensor,
    h: Tensor,
    v: Tensor,
    *,
    y: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The MeanFlow regression target ``u_tgt = v - h * du/dt`` via ``torch.func.jvp``.

    du/dt is the total derivative of u(z_t, t, h) along the trajectory with r = t - h fixed:
    tangents ``(dz, dt, dh) = (v, 1, 1)`` (h = t - r grows with t). This is the MeanFlow
    identity u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t), with the conditional
    velocity in place of the marginal one (unbiased in expectation given z_t).

    Args:
        fn: ``fn(z, t, h, y) -> u``, a function torch.func can trace (an unwrapped module
            with a forward-mode-AD-capable attention backend).
        z_t: (B, ...); t, h: (B,); v: (B, ...) the tangent velocity (guided or not).
        y: optional labels passed through to fn.

    Returns:
        (u, u_tgt): (B, ...) each; u_tgt is not detached (call under no_grad or detach it).
    """
    ones = torch.ones_like(t)
    u, dudt = torch.func.jvp(lambda z, tt, hh: fn(z, tt, hh, y), (z_t, t, h), (v, ones, ones))
    return u, v - expand_like(h, v) * dudt


def meanflow_loss(
    model_fn: Callable[..., Tensor],
    x0: Tensor,
    *,
    t: Tensor,
    r: Tensor,
    noise: Tensor,
    y: Tensor | None = None,
    jvp_fn: Callable[..., Tensor] | None = None,
    tap: Any = None,
    adaptive_p: float = 1.0,
    adaptive_eps: float = 0.01,
    cfg_omega: float = 1.0,
    cfg_kappa: float = 0.0,
    cfg_t_interval: tuple[float, float] = (0.0, 1.0),
    null_y: int | None = None,
    fused: bool = False,
) -> tuple[Tensor, Tensor | dict[str, Tensor] | None]:
    """MeanFlow objective (Geng et al. 2025) with adaptive weighting and guided targets.

    With z_t = (1 - t) x0 + t noise (linear path, data at t = 0), v = noise - x0 and h = t - r:
    ``u_tgt = stopgrad(v~ - h du/dt)`` (:func:`meanflow_target`, v~ from
    :func:`meanflow_guided_velocity`), the per-sample squared error
    ``L = ||u_theta(z_t, t, h) - u_tgt||^2`` summed over the non-batch dims (the paper's squared
    l2 norm), and the adaptive weight ``loss = L / stopgrad((L + adaptive_eps)^adaptive_p)``
    (p = 0 is the plain squared error; p = 1 is MeanFlow's ImageNet choice). The defaults
    p = 1, eps = 0.01 are the official ImageNet (JAX) code's ``norm_p``, ``norm_eps``; the
    official PyTorch code (CIFAR-10) uses p = 0.75, eps = 1e-3.

    Two ways to compute it:

    * ``fused=False`` (default, DDP-safe): the target is computed with ``torch.func.jvp`` on
      ``jvp_fn`` under ``torch.no_grad`` (no graph is kept), then an ordinary forward of
      ``model_fn`` (which may be DDP-wrapped, so gradient all-reduce works as usual) gives the
      prediction; the tap is read after that forward. Cost: the jvp (about two forwards, no
      backward graph) + one forward/backward. ``jvp_fn`` defaults to ``model_fn`` with a DDP
      wrapper removed (``model_fn.module``); tap records made by the jvp (and guidance)
      forwards are discarded, so the returned aux is the gradient forward's activation.
    * ``fused=True``: one ``torch.func.jvp`` with gradients enabled; the prediction is the jvp's
      primal output and the tap is popped *inside* the traced function and returned through
      ``has_aux`` (reading a hook's record after the jvp would give functorch's internal
      wrapper). Saves the extra forward but the backward also walks the jvp graph, and it cannot
      be used with a DDP-wrapped module (gradients would bypass DDP's all-reduce).

    Both give the same loss, aux and gradients (float64 test). Time per training step (loss +
    dispersive term on the aux + backward), one CPU thread, fused and unfused interleaved per
    round, on a heavily loaded 2-core machine (load ~15): MF-XS/4 16x16x1 batch 16: 322 vs
    300 ms (medians of 25, fused/unfused per round 0.99, range 0.59-1.30); MF-T/4 32x32x4
    batch 16: 3247 vs 3010 ms (25 rounds, ratio 0.96, 0.75-1.19); with kappa = 0.5 guidance:
    3163 vs 3101 ms (15 rounds, ratio 0.95). The fused path saves the extra forward but builds
    a graph over the jvp's tangent computation as well (more activation memory), so it wins by
    a few percent at most here, within the noise. The default stays unfused because it works
    with DDP (the multi-GPU runs of the ImageNet presets). Re-measure time and memory on GPU.

    Args:
        model_fn: ``model_fn(z, t, h, y) -> u`` (B, ...). May be DDP-wrapped (fused=False).
        x0: (B, ...) data.
        t, r: (B,) with 0 <= r <= t <= 1 (:func:`dispersive.timesteps.sample_t_r`).
        noise: (B, ...) standard normal noise.
        y: (B,) long class labels (already label-dropped by the caller), or None.
        jvp_fn: the unwrapped function for the jvp (default: model_fn without DDP wrapper).
        tap: a :class:`dispersive.FeatureTap` on the model, or None.
        adaptive_p, adaptive_eps: adaptive loss weighting power and constant.
        cfg_omega, cfg_kappa, cfg_t_interval, null_y: guided target, see
            :func:`meanflow_guided_velocity` (omega=1, kappa=0 is unguided).
        fused: use the single-jvp computation described above.

    Returns:
        (loss, aux): loss (B,); aux is ``tap.pop()`` of the gradient forward (Tensor, or dict
        for several names), None without a tap.
    """
    _check_noise(x0, noise)
    b = x0.shape[0]
    for name, tt in (("t", t), ("r", r)):
        if not isinstance(tt, Tensor) or tt.shape != (b,):
            raise ValueError(
                f"{name} must be a tensor of shape ({b},); got {getattr(tt, 'shape', tt)}"
            )
    if adaptive_p < 0 or adaptive_eps <= 0:
        raise ValueError(
            f"need adaptive_p >= 0 and adaptive_eps > 0; got {adaptive_p}, {adaptive_eps}"
        )
    t = t.to(x0.dtype)
    h = t - r.to(x0.dtype)
    tt = expand_like(t, x0)
    z_t = (1.0 - tt) * x0 + tt * noise
    v = noise - x0

    ddp = torch.nn.parallel.DistributedDataParallel
    jfn = jvp_fn if jvp_fn is not None else unwrap(model_fn)
    v_tilde = meanflow_guided_velocity(
        jfn,
        z_t,
        t,
        v,
        y=y,
        omega=cfg_omega,
        kappa=cfg_kappa,
        t_interval=cfg_t_interval,
        null_y=null_y,
    )
    if fused:
        if isinstance(model_fn, ddp) or isinstance(jfn, ddp):
            raise ValueError(
                "fused=True runs the model inside torch.func.jvp, which cannot take a "
                "DDP-wrapped module (and would bypass its gradient all-reduce); use fused=False"
            )
        if tap is not None:
            _discard_tap(tap)  # records of the guidance forwards

        def f(z: Tensor, t_: Tensor, h_: Tensor) -> tuple[Tensor, Any]:
            # The tap is read inside the traced function: has_aux unwraps the activation.
            return jfn(z, t_, h_, y), tap.pop()

        ones = torch.ones_like(t)
        primals, tangents = (z_t, t, h), (v_tilde, ones, ones)
        if tap is not None:
            u, dudt, aux = torch.func.jvp(f, primals, tangents, has_aux=True)
        else:
            u, dudt = torch.func.jvp(lambda z, t_, h_: jfn(z, t_, h_, y), primals, tangents)
            aux = None
        u_tgt = (v_tilde - expand_like(h, v) * dudt).detach()
    else:
        with torch.no_grad():
            _, u_tgt = meanflow_target(jfn, z_t, t, h, v_tilde, y=y)
        if tap is not None:
            _discard_tap(tap)  # records of the no-grad forwards
        u = model_fn(z_t, t, h, y)
        aux = tap.pop() if tap is not None else None
    _check_same_shape(u, x0, "model_fn(z, t, h, y)")

    sq = _sum_flat((u - u_tgt) ** 2)
    weight = (sq.detach() + adaptive_eps) ** adaptive_p
    return sq / weight, aux


# --------------------------------------------------------------------------- two views
