"""Samplers: integrate a model function from noise (t = 1) to data (t = 0).

Every sampler takes a plain function and a starting tensor of noise and returns a tensor of the
same shape. Guidance, labels and the network itself live in the function (see
:mod:`dispersive.guidance`), so samplers never see them.

Time convention (:mod:`dispersive.paths`): ``x_t = alpha(t) x0 + sigma(t) noise``, t = 0 is data,
t = 1 is noise, and a flow model returns the velocity ``v = dx_t/dt``. ``fn(x, t)`` receives t as
a (B,) tensor in x's dtype and device.

Samplers and the number of model evaluations (NFE) each makes, see :func:`nfe`:

============== ============================================= ================================
name           what                                          NFE
============== ============================================= ================================
euler          ODE, explicit Euler on a linear t grid        steps
heun           ODE, Heun (2nd order), Euler on the last step 2 steps - 1 (2 steps if full)
dopri5         ODE, adaptive Dormand-Prince 5(4) (torchdiffeq) adaptive: counted, see below
euler_maruyama SDE, Euler-Maruyama + one final mean step     steps (SiT's ``num_steps``)
ddpm           DDPM ancestral sampling (DiT), respaced       steps
ddim           DDIM (eta = 0: deterministic), respaced       steps
meanflow       MeanFlow average velocity, one or few steps   steps
============== ============================================= ================================

The paper samples with "ODE Heun, 250 steps": with the Euler last step that is 499 model
evaluations, not 250 (and 500 with ``final_euler=False``). SiT's ``--sampling-method heun2
--num-sampling-steps 250`` puts 250 points on its t grid, i.e. 249 intervals, each a full Heun
step (evaluated at t = 0 too): 498 evaluations, which is ``heun`` with ``steps=249,
final_euler=False`` here. SiT's default ODE, adaptive dopri5 (atol 1e-6, rtol 1e-3), is
:func:`dopri5`; its NFE depends on the model and the batch and is counted, not predicted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dispersive.paths import AffinePath, expand_like

__all__ = [
    "SAMPLERS",
    "ddim_sample",
    "ddpm_sample",
    "euler",
    "euler_maruyama",
    "dopri5",
    "heun",
    "meanflow_sample",
    "nfe",
    "time_grid",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]

DIFFUSIONS = ("sigma", "constant")


def _check_steps(steps: int, minimum: int = 1) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise ValueError(f"steps must be an integer >= {minimum}; got {steps!r}")
    return steps


def _full_t(value: float, x: Tensor) -> Tensor:
    """A (B,) tensor of one time value in x's dtype and device."""
    return torch.full((x.shape[0],), float(value), dtype=x.dtype, device=x.device)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` (on its own device)."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return noise.to(x.device)


def _call(fn: Callable[..., Tensor], x: Tensor, *args: Any) -> Tensor:
    out = fn(x, *args)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the model function must return a tensor shaped like x {tuple(x.shape)}; got {got}"
        )
    return out


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> list[float]:
    """The linear t grid of ``steps`` intervals from ``t_start`` to ``t_end`` (steps + 1 points).

    Computed in float64 (Python floats) so that the grid does not depend on x's dtype.
    """
    _check_steps(steps)
    # Weighted form so both ends are exact (t_start + (t_end - t_start) * 1 may not be).
    return [t_start * (steps - i) / steps + t_end * i / steps for i in range(steps + 1)]


# --------------------------------------------------------------------------------------------
# ODE
# --------------------------------------------------------------------------------------------


def euler(
    fn: VelocityFn, x: Tensor, *, steps: int, t_start: float = 1.0, t_end: float = 0.0
) -> Tensor:
    """Explicit Euler for dx/dt = fn(x, t) on a linear grid from ``t_start`` to ``t_end``.

    Args:
        fn: velocity function ``fn(x (B, ...), t (B,)) -> (B, ...)``.
        x: the state at ``t_start``, (B, ...); noise for generation.
        steps: number of intervals; NFE = steps.
        t_start: where the integration starts (1 = noise).
        t_end: where it stops (0 = data).

    Returns:
        The state at ``t_end``, (B, ...), same dtype as x.
    """
    grid = time_grid(steps, t_start, t_end)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * _call(fn, x, _full_t(t_cur, x))
    return x


def heun(
    fn: VelocityFn,
    x: Tensor,
    *,
    steps: int,
    t_start: float = 1.0,
    t_end: float = 0.0,
    final_euler: bool = True,
) -> Tensor:
    """Heun's second-order method (explicit trapezoid) on a linear t grid.

    Each interval takes an Euler predictor and corrects it with the average of the velocities at
    both ends. With ``final_euler=True`` (default) the last interval keeps the Euler predictor,
    as in EDM and in REPA's / the authors' sampler: the model is never evaluated at exactly
    ``t_end`` (t = 0 lies outside the training range of logit-normal t), and one first-order step
    only adds an O(h^2) local error, so the method stays second order. NFE = 2 steps - 1
    (``final_euler=False``: 2 steps).

    Args:
        fn: velocity function ``fn(x (B, ...), t (B,)) -> (B, ...)``.
        x: the state at ``t_start``, (B, ...).
        steps: number of intervals.
        t_start: where the integration starts (1 = noise).
        t_end: where it stops (0 = data).
        final_euler: use a plain Euler step on the last interval.

    Returns:
        The state at ``t_end``, (B, ...).
    """
    grid = time_grid(steps, t_start, t_end)
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        h = t_next - t_cur
        d_cur = _call(fn, x, _full_t(t_cur, x))
        x_pred = x + h * d_cur
        if final_euler and i == steps - 1:
            x = x_pred
        else:
            d_next = _call(fn, x_pred, _full_t(t_next, x))
            x = x + h * 0.5 * (d_cur + d_next)
    return x


def dopri5(
    fn: VelocityFn,
    x: Tensor,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    t_start: float = 1.0,
    t_end: float = 0.0,
) -> Tensor:
    """Adaptive Dormand-Prince 5(4) ODE solver (torchdiffeq's ``dopri5``), SiT's default ODE.

    Integrates dx/dt = fn(x, t) from ``t_start`` to ``t_end`` with steps chosen so that the
    local error estimate stays within ``atol + rtol * |x|`` (RMS over every element of the
    batch, so the steps, and the samples, depend on the batch as in SiT). SiT integrates its
    time t_sit = 1 - t forward with v_sit = -v: the same ODE, the same steps. The defaults are
    SiT's (``--atol 1e-6 --rtol 1e-3``). The number of model evaluations is adaptive: count the
    calls of ``fn`` (:func:`dispersive.generate.generate` does and reports it).

    Needs the optional dependency torchdiffeq (``pip install 'dispersive[ode]'``).

    Args:
        fn: velocity function ``fn(x (B, ...), t (B,)) -> (B, ...)``.
        x: the state at ``t_start``, (B, ...).
        atol: absolute error tolerance, > 0.
        rtol: relative error tolerance, > 0.
        t_start: where the integration starts (1 = noise).
        t_end: where it stops (0 = data).

    Returns:
        The state at ``t_end``, (B, ...), same dtype as x.
    """
    try:
        from torchdiffeq import odeint
    except ImportError as e:
        raise ImportError(
            "the dopri5 sampler needs torchdiffeq; install it with "
            "pip install 'dispersive[ode]' (or pip install torchdiffeq)"
        ) from e
    if not (atol > 0 and rtol > 0):
        raise ValueError(f"atol and rtol must be > 0; got atol={atol}, rtol={rtol}")

    def rhs(t: Tensor, state: Tensor) -> Tensor:
        # torchdiffeq passes a scalar t; the model wants a (B,) vector in x's dtype.
        return _call(fn, state, t.to(state.dtype).expand(state.shape[0]))

    times = torch.tensor([float(t_start), float(t_end)], dtype=x.dtype, device=x.device)
    return odeint(rhs, x, times, method="dopri5", atol=atol, rtol=rtol)[-1]


# --------------------------------------------------------------------------------------------
# SDE
# --------------------------------------------------------------------------------------------


def _diffusion_coefficient(
    diffusion: str | Callable[[Tensor], Tensor], path: AffinePath, t: Tensor, scale: float
) -> Tensor:
    if callable(diffusion):
        return scale * diffusion(t)
    if diffusion == "sigma":
        return scale * path.sigma(t)
    if diffusion == "constant":
        return scale * torch.ones_like(t)
    raise ValueError(
        f"unknown diffusion {diffusion!r}; valid choices: {list(DIFFUSIONS)} or a callable w(t)"
    )


def euler_maruyama(
    fn: VelocityFn,
    x: Tensor,
    *,
    steps: int,
    path: AffinePath,
    diffusion: str | Callable[[Tensor], Tensor] = "sigma",
    diffusion_scale: float = 1.0,
    last_step: float = 0.04,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler-Maruyama for the reverse-time SDE of a velocity model (SiT's SDE sampler).

    The probability-flow ODE dx = v dt keeps the marginals p_t. Adding Langevin dynamics with
    rate w(t) >= 0 keeps them too; run backwards in time (t from 1 to 0, step h > 0)::

        x_{t-h} = x_t - h v(x_t, t) + h w(t) score(x_t, t) + sqrt(2 w(t) h) z,   z ~ N(0, I)

    with score = ``path.velocity_to_score(v, x_t, t)`` (exact for the exact velocity). This is
    SiT's sampler: its drift ``v_sit + w score`` and noise ``sqrt(2 w dt)`` with t_sit = 1 - t,
    v_sit = -v. The stochastic steps run on ``linspace(1, last_step, steps)`` (steps - 1 steps);
    then one deterministic "mean" step (the same update without noise) of size ``last_step`` goes
    to t = 0, so NFE = steps, as SiT's ``num_steps``. ``last_step=0`` gives a uniform grid of
    ``steps`` intervals down to 0 whose last step is the noise-free mean step.

    Args:
        fn: velocity function ``fn(x (B, ...), t (B,)) -> (B, ...)``.
        x: noise at t = 1, (B, ...).
        steps: number of model evaluations (>= 2 when ``last_step > 0``).
        path: the interpolant the model was trained with (for velocity -> score).
        diffusion: w(t): ``"sigma"`` w = sigma(t) (SiT's default ``diffusion_form="sigma"``),
            ``"constant"`` w = 1, or a callable mapping t (B,) to w (B,).
        diffusion_scale: multiplies w (SiT's ``diffusion_norm``); 0 makes the sampler a
            deterministic Euler ODE solver on the same grid.
        last_step: size of the final deterministic step (SiT: 0.04); in [0, 1).
        generator: source of the noise.

    Returns:
        Samples at t = 0, (B, ...).
    """
    if not 0.0 <= last_step < 1.0:
        raise ValueError(f"last_step must be in [0, 1); got {last_step}")
    if diffusion_scale < 0:
        raise ValueError(f"diffusion_scale must be >= 0; got {diffusion_scale}")
    if last_step > 0:
        _check_steps(steps, minimum=2)
        grid = time_grid(steps - 1, 1.0, last_step) + [0.0]
    else:
        grid = time_grid(_check_steps(steps), 1.0, 0.0)
    n = len(grid) - 1
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        h = t_cur - t_next  # > 0: time runs backwards
        t = _full_t(t_cur, x)
        v = _call(fn, x, t)
        w = expand_like(_diffusion_coefficient(diffusion, path, t, diffusion_scale), x)
        if diffusion_scale > 0:
            # score = p x + q v, so the mean is c_x x + c_v v with per-sample (B, 1, ...)
            # coefficients: two full-size operations where forming the score takes ten.
            p, q = path.score_coefficients(x, t)
            hw = h * w
            mean = torch.addcmul(x * (1 + hw * p), v, hw * q - h)
        else:
            mean = x - h * v
        if i == n - 1:
            x = mean  # the final "mean" step adds no noise
        else:
            x = mean.addcmul_(_randn_like(x, generator), torch.sqrt(2 * w * h))
    return x


# --------------------------------------------------------------------------------------------
# DDPM / DDIM (DiT)
# --------------------------------------------------------------------------------------------


def _respaced(schedule: Any, steps: int | None) -> Any:
    """The schedule itself (steps None or all of them) or its DiT-style respacing."""
    num = int(schedule.num_steps)
    if steps is None or steps == num:
        return schedule
    _check_steps(steps)
    if steps > num:
        raise ValueError(f"steps={steps} exceeds the schedule's {num} steps; use steps <= {num}")
    return schedule.respace(steps)


def _coef(values: Tensor, i: int, x: Tensor) -> Tensor:
    """values[i] (float64 schedule entry) as a scalar tensor in x's dtype and device."""
    return values[i].to(device=x.device, dtype=x.dtype)


def _split_eps(out: Tensor, x: Tensor, learn_sigma: bool) -> tuple[Tensor, Tensor | None]:
    c = x.shape[1]
    want = 2 * c if learn_sigma else c
    if out.ndim != x.ndim or out.shape[0] != x.shape[0] or out.shape[1] != want:
        raise ValueError(
            f"model output {tuple(out.shape)} does not match x {tuple(x.shape)} with "
            f"learn_sigma={learn_sigma} (expected {want} channels); set learn_sigma to match "
            "the model"
        )
    if learn_sigma:
        return out[:, :c], out[:, c:]
    return out, None


def ddpm_sample(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    *,
    schedule: Any,
    steps: int | None = None,
    learn_sigma: bool = True,
    clip_x0: bool = False,
    fixed_var: str = "large",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDPM ancestral sampling (DiT), optionally on a respaced schedule.

    Args:
        model_fn: ``model_fn(x_k (B, C, ...), k (B,)) -> (B, 2C, ...)`` (eps then the learned
            variance values v in [-1, 1]) if ``learn_sigma`` else eps (B, C, ...). k is a float
            tensor of ORIGINAL step indices (0..T-1) even after respacing, as DiT expects.
        x: noise at the last step, (B, C, ...).
        schedule: a :class:`dispersive.ddpm.DDPMSchedule`.
        steps: number of sampling steps (respaced evenly as DiT); None = all T steps.
        learn_sigma: the model predicts the variance interpolation (DiT) or not (fixed
            variance of the schedule).
        clip_x0: clip the predicted x0 to [-1, 1] (pixel-space models).
        fixed_var: the variance when ``learn_sigma`` is False: "large" (beta_k, ADM's default)
            or "small" (the posterior variance).
        generator: source of the noise.

    Returns:
        Samples x_0, (B, C, ...). NFE = number of steps.
    """
    sched = _respaced(schedule, steps)
    for i in reversed(range(sched.num_steps)):
        out = model_fn(x, _full_t(float(sched.timesteps[i]), x))
        _split_eps(out, x, learn_sigma)
        # p_mean_variance indexes the (respaced) schedule, not the original steps.
        idx = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        p = sched.p_mean_variance(
            out, x, idx, learn_sigma=learn_sigma, clip_x0=clip_x0, fixed_var=fixed_var
        )
        x = p["mean"]
        if i > 0:  # the last step returns the mean (DDPM adds no noise at k = 0)
            x = x + torch.exp(0.5 * p["log_var"]) * _randn_like(x, generator)
    return x


def ddim_sample(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    *,
    schedule: Any,
    steps: int,
    eta: float = 0.0,
    learn_sigma: bool = True,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM sampling on a respaced schedule (eta = 0: deterministic; eta = 1: DDPM-like).

    Update from step k to the previous kept step k'::

        x0 = (x_k - sqrt(1 - a_k) eps) / sqrt(a_k)
        s  = eta sqrt((1 - a_k') / (1 - a_k)) sqrt(1 - a_k / a_k')
        x_k' = sqrt(a_k') x0 + sqrt(1 - a_k' - s^2) eps + s z

    with a = alphas_cumprod. Only eps is used (a learned variance is ignored).

    Args:
        model_fn: as in :func:`ddpm_sample` (k: original step indices).
        x: noise, (B, C, ...).
        schedule: a :class:`dispersive.ddpm.DDPMSchedule`.
        steps: number of steps (NFE).
        eta: amount of noise, >= 0.
        learn_sigma: the model output has 2C channels (eps first).
        clip_x0: clip the predicted x0 to [-1, 1].
        generator: source of the noise (used when eta > 0).

    Returns:
        Samples x_0, (B, C, ...).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    sched = _respaced(schedule, steps)
    abar = sched.alphas_cumprod
    abar_prev = sched.alphas_cumprod_prev
    for i in reversed(range(sched.num_steps)):
        out = model_fn(x, _full_t(float(sched.timesteps[i]), x))
        eps, _ = _split_eps(out, x, learn_sigma)
        a, a_prev = _coef(abar, i, x), _coef(abar_prev, i, x)
        x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
        s = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        x = torch.sqrt(a_prev) * x0 + torch.sqrt((1 - a_prev - s**2).clamp_min(0)) * eps
        if eta > 0 and i > 0:
            x = x + s * _randn_like(x, generator)
    return x


# --------------------------------------------------------------------------------------------
# MeanFlow
# --------------------------------------------------------------------------------------------


def meanflow_sample(
    u_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    x: Tensor,
    *,
    steps: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MeanFlow sampling with the average velocity, one step or a few on a uniform grid.

    ``u_fn(z, t, h)`` is the average velocity over [t - h, t], so z_{t-h} = z_t - h u exactly:
    one step is ``x = z - u(z, t=1, h=1)``.

    Args:
        u_fn: ``u_fn(z (B, ...), t (B,), h (B,)) -> (B, ...)``.
        x: noise at t = 1, (B, ...).
        steps: number of steps (NFE).
        generator: unused (the sampler is deterministic); accepted so every sampler takes it.

    Returns:
        Samples at t = 0, (B, ...).
    """
    del generator
    grid = time_grid(_check_steps(steps), 1.0, 0.0)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        h = t_cur - t_next
        x = x - h * _call(u_fn, x, _full_t(t_cur, x), _full_t(h, x))
    return x


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "heun": heun,
    "dopri5": dopri5,
    "euler_maruyama": euler_maruyama,
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "meanflow": meanflow_sample,
}


def nfe(method: str, steps: int, *, final_euler: bool = True) -> int:
    """The exact number of model-function calls a sampler makes.

    With classifier-free guidance each call is one forward on a doubled batch. The adaptive
    ``dopri5`` has no NFE known in advance (count the calls): asking for it is an error.

    Args:
        method: a name in :data:`SAMPLERS`.
        steps: the ``steps`` argument given to the sampler.
        final_euler: Heun's option of the same name.

    Returns:
        The number of calls of the model function.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; valid samplers: {sorted(SAMPLERS)}")
    if method == "dopri5":
        raise ValueError("dopri5 is adaptive: its NFE is counted during sampling, not predicted")
    _check_steps(steps)
    if method == "heun":
        return 2 * steps - 1 if final_euler else 2 * steps
    return steps
