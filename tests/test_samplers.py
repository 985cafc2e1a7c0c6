"""Samplers against an analytic problem: Gaussian data, where every field is closed-form.

Data x0 ~ N(mu, diag(s^2)) and x_t = alpha(t) x0 + sigma(t) noise give Gaussian marginals
N(m_t, sd_t^2) with m_t = alpha mu, sd_t^2 = alpha^2 s^2 + sigma^2. The exact flow maps x_t to
x_r = m_r + (sd_r / sd_t) (x_t - m_t); its velocity, score, average velocity (MeanFlow) and
DDPM epsilon predictor follow in closed form. Everything runs in float64.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

from dispersive.ddpm import DDPMSchedule
from dispersive.generate import generate
from dispersive.paths import AffinePath, get_path
from dispersive.samplers import (
    SAMPLERS,
    ddim_sample,
    ddpm_sample,
    dopri5,
    euler,
    euler_maruyama,
    heun,
    meanflow_sample,
    nfe,
    time_grid,
)

F64 = torch.float64
MU = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
S = torch.tensor([0.3, 0.8, 0.5], dtype=F64)


pytestmark = pytest.mark.usefixtures("one_thread")


class Gaussian:
    """Closed-form fields of Gaussian data x0 ~ N(mu, diag(s^2)) along an affine path."""

    def __init__(self, path: AffinePath, mu: Tensor = MU, s: Tensor = S):
        self.path, self.mu, self.s = path, mu, s

    def _moments(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.reshape(-1, 1)
        a, sig = self.path.alpha(t), self.path.sigma(t)
        return a * self.mu, (a**2 * self.s**2 + sig**2).sqrt()

    def flow(self, x: Tensor, t: float, r: float) -> Tensor:
        """The exact ODE solution from time t to time r."""
        b = x.shape[0]
        m_t, sd_t = self._moments(torch.full((b,), t, dtype=F64))
        m_r, sd_r = self._moments(torch.full((b,), r, dtype=F64))
        return m_r + sd_r / sd_t * (x - m_t)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        tt = t.reshape(-1, 1)
        a, sig = self.path.alpha(tt), self.path.sigma(tt)
        da, dsig = self.path.d_alpha(tt), self.path.d_sigma(tt)
        var = a**2 * self.s**2 + sig**2
        return da * self.mu + (a * da * self.s**2 + sig * dsig) / var * (x - a * self.mu)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        m, sd = self._moments(t)
        return -(x - m) / sd**2

    def average_velocity(self, z: Tensor, t: Tensor, h: Tensor) -> Tensor:
        # The exact displacement over [t - h, t] divided by h (per sample).
        out = torch.empty_like(z)
        for i in range(z.shape[0]):
            ti, hi = float(t[i]), float(h[i])
            out[i] = (z[i : i + 1] - self.flow(z[i : i + 1], ti, ti - hi))[0] / hi
        return out


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls, self.times = fn, 0, []

    def __call__(self, x, t, *args):
        self.calls += 1
        self.times.append(t.clone())
        return self.fn(x, t, *args)


def _order(errors: list[float]) -> list[float]:
    return [math.log2(e0 / e1) for e0, e1 in zip(errors[:-1], errors[1:])]


def _start_points() -> Tensor:
    return torch.linspace(-2.5, 2.5, 11, dtype=F64).reshape(-1, 1).repeat(1, 3)


# ------------------------------------------------------------------------------ the oracle


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
def test_oracle_velocity_and_score_agree_with_the_path(path_name):
    g = Gaussian(get_path(path_name))
    x = _start_points()
    t = torch.full((x.shape[0],), 0.37, dtype=F64)
    # The velocity is the time derivative of the exact flow (central difference).
    d = 1e-5
    fd = (g.flow(x, 0.37, 0.37 + d) - g.flow(x, 0.37, 0.37 - d)) / (2 * d)
    torch.testing.assert_close(g.velocity(x, t), fd, rtol=1e-7, atol=1e-8)
    # velocity -> score through the path's own conversion matches the Gaussian score.
    torch.testing.assert_close(g.path.velocity_to_score(g.velocity(x, t), x, t), g.score(x, t))


# ------------------------------------------------------------------------------ ODE


def test_time_grid_is_linear_and_exact_at_the_ends():
    grid = time_grid(4)
    assert grid == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert time_grid(3, 0.9, 0.3)[0] == 0.9 and time_grid(3, 0.9, 0.3)[-1] == 0.3


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
def test_euler_is_first_order(path_name):
    g = Gaussian(get_path(path_name))
    x1 = _start_points()
    exact = g.flow(x1, 1.0, 0.0)
    errors = [(euler(g.velocity, x1, steps=n) - exact).abs().max().item() for n in (32, 64, 128)]
    for p in _order(errors):
        assert 0.85 < p < 1.15, (errors, _order(errors))


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
@pytest.mark.parametrize("final_euler", [True, False])
def test_heun_is_second_order(path_name, final_euler):
    g = Gaussian(get_path(path_name))
    x1 = _start_points()
    exact = g.flow(x1, 1.0, 0.0)
    errors = [
        (heun(g.velocity, x1, steps=n, final_euler=final_euler) - exact).abs().max().item()
        for n in (16, 32, 64)
    ]
    for p in _order(errors):
        assert 1.8 < p < 2.2, (errors, _order(errors))


def test_ode_partial_interval_matches_the_exact_flow():
    g = Gaussian(get_path("linear"))
    x = _start_points()
    out = heun(g.velocity, x, steps=200, t_start=0.8, t_end=0.3, final_euler=False)
    torch.testing.assert_close(out, g.flow(x, 0.8, 0.3), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ SDE


def _check_moments(samples: Tensor, mu: Tensor, s: Tensor, z: float = 4.5) -> None:
    """Mean and std per dimension within z standard errors (normal data: SE(std) = s/sqrt(2n))."""
    n = samples.shape[0]
    mean_err = (samples.mean(0) - mu).abs() / (s / math.sqrt(n))
    std_err = (samples.std(0) - s).abs() / (s / math.sqrt(2 * n))
    assert bool((mean_err < z).all()), f"mean off by {mean_err.tolist()} standard errors"
    assert bool((std_err < z).all()), f"std off by {std_err.tolist()} standard errors"


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
def test_euler_maruyama_matches_the_target_moments(path_name):
    # last_step=0: a uniform grid to t = 0 whose last step is the noise-free mean step.
    g = Gaussian(get_path(path_name))
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(4000, 3, dtype=F64, generator=gen)
    out = euler_maruyama(g.velocity, x1, steps=100, path=g.path, last_step=0.0, generator=gen)
    _check_moments(out, g.mu, g.s)


@pytest.mark.parametrize("diffusion", ["sigma", "constant"])
def test_euler_maruyama_sit_final_mean_step(diffusion):
    # SiT's default: stochastic steps down to t = 0.04, then one deterministic step of the SDE
    # drift. With the exact fields the stochastic part reaches p_0.04 = N(m, sd^2) and the
    # mean step is the affine map x -> x - h v + h w score, so the output law is
    # N(m - h da mu, (sd (1 - h k - h w / sd^2))^2) with v = da mu + k (x - m).
    g = Gaussian(get_path("linear"))
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(4000, 3, dtype=F64, generator=gen)
    out = euler_maruyama(
        g.velocity, x1, steps=200, path=g.path, diffusion=diffusion, diffusion_scale=0.5,
        generator=gen,
    )  # fmt: skip
    h = torch.tensor([0.04], dtype=F64)
    m, sd = g._moments(h)
    k = g.velocity(m + 1, h) - g.velocity(m, h)  # the slope of the affine velocity
    w = 0.5 * (g.path.sigma(h) if diffusion == "sigma" else torch.ones_like(h))
    mean = m - h * g.velocity(m, h)
    std = sd * (1 - h * k - h * w / sd**2)
    _check_moments(out, mean[0], std[0])


def test_euler_maruyama_without_diffusion_is_euler_on_its_grid():
    g = Gaussian(get_path("linear"))
    x1 = _start_points()
    # last_step=0: uniform grid of `steps` intervals, so w = 0 leaves exactly Euler.
    out = euler_maruyama(g.velocity, x1, steps=20, path=g.path, diffusion_scale=0.0, last_step=0)
    torch.testing.assert_close(out, euler(g.velocity, x1, steps=20))


def test_euler_maruyama_grid_follows_sit():
    g = Gaussian(get_path("linear"))
    fn = Counter(g.velocity)
    euler_maruyama(fn, _start_points(), steps=26, path=g.path, generator=torch.Generator())
    ts = [float(t[0]) for t in fn.times]
    # steps - 1 stochastic steps on linspace(1, 0.04, steps), then the mean step at t = 0.04.
    assert len(ts) == 26
    assert ts[0] == 1.0 and ts[-1] == pytest.approx(0.04)
    assert all(a - b == pytest.approx(0.96 / 25) for a, b in zip(ts[:-1], ts[1:]))


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
@pytest.mark.parametrize("diffusion", ["sigma", "constant"])
def test_euler_maruyama_update_is_the_sde_step_with_the_score(path_name, diffusion):
    # The sampler folds the score into per-sample coefficients; step by step it must equal
    # x - h v + h w score + sqrt(2 w h) z written out with velocity_to_score (float64 oracle).
    g = Gaussian(get_path(path_name))
    x1 = _start_points()
    out = euler_maruyama(
        g.velocity, x1, steps=12, path=g.path, diffusion=diffusion, diffusion_scale=0.7,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    gen, x = torch.Generator().manual_seed(5), x1
    grid = [*torch.linspace(1.0, 0.04, 12, dtype=F64).tolist(), 0.0]
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        h, t = t_cur - t_next, torch.full((x.shape[0],), t_cur, dtype=F64)
        tt = t[:, None]
        w = 0.7 * (g.path.sigma(tt) if diffusion == "sigma" else torch.ones_like(tt))
        v = g.velocity(x, t)
        x = x - h * v + h * w * g.path.velocity_to_score(v, x, t)
        if i < 11:
            x = x + torch.sqrt(2 * w * h) * torch.randn(x.shape, generator=gen, dtype=F64)
    torch.testing.assert_close(out, x, atol=1e-12, rtol=1e-12)
    assert not torch.equal(out, euler_maruyama(g.velocity, x1, steps=12, path=g.path))


def test_euler_maruyama_is_reproducible_with_a_generator():
    g = Gaussian(get_path("linear"))
    x1 = _start_points()
    a = euler_maruyama(
        g.velocity, x1, steps=10, path=g.path, generator=torch.Generator().manual_seed(3)
    )
    b = euler_maruyama(
        g.velocity, x1, steps=10, path=g.path, generator=torch.Generator().manual_seed(3)
    )
    c = euler_maruyama(
        g.velocity, x1, steps=10, path=g.path, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_euler_maruyama_rejects_bad_arguments():
    g = Gaussian(get_path("linear"))
    x = _start_points()
    with pytest.raises(ValueError, match="diffusion"):
        euler_maruyama(g.velocity, x, steps=5, path=g.path, diffusion="SBDM-typo")
    with pytest.raises(ValueError, match="last_step"):
        euler_maruyama(g.velocity, x, steps=5, path=g.path, last_step=1.0)
    with pytest.raises(ValueError, match="steps"):
        euler_maruyama(g.velocity, x, steps=1, path=g.path)


# ------------------------------------------------------------------------------ MeanFlow


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
@pytest.mark.parametrize("steps", [1, 3])
def test_meanflow_is_exact_with_the_exact_average_velocity(path_name, steps):
    g = Gaussian(get_path(path_name))
    z = _start_points()
    out = meanflow_sample(g.average_velocity, z, steps=steps)
    torch.testing.assert_close(out, g.flow(z, 1.0, 0.0), rtol=0, atol=1e-12)


def test_meanflow_one_step_is_z_minus_u():
    calls = []

    def u_fn(z, t, h):
        calls.append((t.clone(), h.clone()))
        return torch.full_like(z, 0.25)

    z = torch.zeros(2, 3)
    assert torch.equal(meanflow_sample(u_fn, z), torch.full_like(z, -0.25))
    (t, h), = calls  # fmt: skip
    assert torch.equal(t, torch.ones(2)) and torch.equal(h, torch.ones(2))


# ------------------------------------------------------------------------------ DDPM / DDIM


class GaussianEps:
    """The exact DDPM predictor for Gaussian data: E[eps | x_k] and the exact reverse variance.

    Returns DiT's layout [eps, v] where v encodes the true variance of x_{k-1} given x_k,
    ``beta~ + coef1^2 Var[x0 | x_k]``, in the learned range [log beta~, log beta] of the
    (respaced) schedule, so ancestral sampling is exact.
    """

    def __init__(self, sched: DDPMSchedule, mu: Tensor = MU, s: Tensor = S, learn_sigma=True):
        self.sched, self.mu, self.s, self.learn_sigma = sched, mu, s, learn_sigma
        self.index = {int(k): i for i, k in enumerate(sched.timesteps)}
        self.ks: list[Tensor] = []

    def __call__(self, x: Tensor, k: Tensor) -> Tensor:
        self.ks.append(k.clone())
        i = self.index[int(k[0])]
        sc = self.sched
        a = sc.alphas_cumprod[i]
        var_k = a * self.s**2 + 1 - a
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / var_k
        if not self.learn_sigma:
            return eps
        var_x0 = self.s**2 * (1 - a) / var_k
        true_var = sc.posterior_variance[i] + sc.posterior_mean_coef1[i] ** 2 * var_x0
        lo, hi = sc.posterior_log_variance_clipped[i], sc.betas[i].log()
        v = 2 * (true_var.log() - lo) / (hi - lo) - 1
        return torch.cat([eps, v.expand_as(x)], dim=1)


def _short_schedule() -> DDPMSchedule:
    # 100 steps that still end near pure noise (abar_99 ~ 3e-5): the exactness argument holds
    # for any schedule, and the test stays fast.
    return DDPMSchedule(num_steps=100, beta_start=1e-3, beta_end=0.2)


@pytest.mark.parametrize("steps", [None, 20])
def test_ddpm_recovers_the_gaussian(steps):
    base = _short_schedule()
    sched = base if steps is None else base.respace(steps)
    fn = GaussianEps(sched)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 3, dtype=F64, generator=gen)
    out = ddpm_sample(fn, x, schedule=base, steps=steps, generator=gen)
    _check_moments(out, MU, S)
    assert len(fn.ks) == nfe("ddpm", sched.num_steps)


def test_ddpm_calls_the_model_with_original_step_indices():
    base = DDPMSchedule()
    sched = base.respace(25)
    fn = GaussianEps(sched)
    ddpm_sample(fn, torch.zeros(2, 3, dtype=F64), schedule=base, steps=25, generator=None)
    ks = torch.stack([k[0] for k in fn.ks])
    assert ks.dtype == F64 and ks[0] == 999 and ks[-1] == 0
    assert torch.equal(ks, sched.timesteps.flip(0).to(F64))


def _adm_spacing(total: int, count: int) -> list[int]:
    """ADM's space_timesteps(total, [count]) from its published description: positions
    0, s, 2s, ... built by repeated float64 addition of the stride s = (total - 1) / (count - 1),
    each rounded half to even (an independent oracle: a numpy running sum and rint)."""
    import numpy as np

    stride = (total - 1) / (count - 1)
    positions = np.cumsum(np.concatenate([[0.0], np.full(count - 1, stride)]))
    return np.rint(positions).astype(int).tolist()


def test_respacing_matches_adm_for_every_count():
    from dispersive.ddpm import respaced_steps

    direct_differs = 0
    for total in (1000, 4000, 250):
        for count in range(2, total + 1, 1 if total == 1000 else 7):
            kept = respaced_steps(total, count)
            assert kept == _adm_spacing(total, count), (total, count)
            if total == 1000:
                direct = [round(i * (total - 1) / (count - 1)) for i in range(count)]
                direct_differs += direct != kept
    # The oracle has teeth: rounding i * stride directly (this package's former rule) breaks
    # ties differently for 283 counts in 2..1000, none of them a round number.
    assert direct_differs == 283
    assert respaced_steps(1000, 1) == [999]  # one step: the noisiest (ADM: step 0)
    base = DDPMSchedule()
    assert base.respace(21).timesteps.tolist() == _adm_spacing(1000, 21)
    with pytest.raises(ValueError, match=r"count must be in \[1, 1000\]"):
        respaced_steps(1000, 1001)


def test_ddim_eta0_converges_to_the_gaussian_at_first_order():
    # DDIM with eta = 0 and a linear predictor is an affine map x -> A x + b: its output law
    # N(b, A^2) is computed exactly from two evaluations, so the discretization error is seen
    # without sampling noise.
    base = DDPMSchedule()
    errors = []
    for steps in (10, 40, 160):
        fn = GaussianEps(base.respace(steps))
        b = ddim_sample(fn, torch.zeros(1, 3, dtype=F64), schedule=base, steps=steps)[0]
        a = ddim_sample(fn, torch.ones(1, 3, dtype=F64), schedule=base, steps=steps)[0] - b
        errors.append(max((b - MU).abs().max().item(), (a.abs() - S).abs().max().item()))
    # First order in the step size: the error falls 4x when the steps grow 4x.
    orders = [math.log(e0 / e1, 4) for e0, e1 in zip(errors[:-1], errors[1:])]
    assert all(0.85 < p < 1.15 for p in orders), (errors, orders)


def test_ddim_eta1_is_ddpm_with_the_posterior_variance():
    base = DDPMSchedule()
    fn = GaussianEps(base.respace(25), learn_sigma=False)
    x = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(schedule=base, steps=25, learn_sigma=False)
    a = ddim_sample(fn, x, eta=1.0, generator=torch.Generator().manual_seed(5), **kw)
    b = ddpm_sample(fn, x, fixed_var="small", generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(a, b)


def test_ddpm_rejects_a_mismatched_model_output():
    base = DDPMSchedule()
    fn = GaussianEps(base.respace(4), learn_sigma=False)
    with pytest.raises(ValueError, match="learn_sigma"):
        ddpm_sample(fn, torch.zeros(2, 3, dtype=F64), schedule=base, steps=4, learn_sigma=True)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(fn, torch.zeros(2, 3, dtype=F64), schedule=base, steps=2000)


# ------------------------------------------------------------------------------ NFE


@pytest.mark.parametrize("method", sorted(set(SAMPLERS) - {"dopri5"}))  # dopri5: adaptive
@pytest.mark.parametrize("steps", [2, 5])
def test_nfe_equals_the_counted_calls(method, steps):
    g = Gaussian(get_path("linear"))
    x = _start_points()
    base = DDPMSchedule(num_steps=20)
    if method in ("euler", "heun"):
        fn = Counter(g.velocity)
        SAMPLERS[method](fn, x, steps=steps)
    elif method == "euler_maruyama":
        fn = Counter(g.velocity)
        euler_maruyama(fn, x, steps=steps, path=g.path, generator=torch.Generator())
    elif method == "meanflow":
        fn = Counter(lambda z, t, h: torch.zeros_like(z))
        meanflow_sample(fn, x, steps=steps)
    else:
        fn = Counter(GaussianEps(base.respace(steps)))
        SAMPLERS[method](fn, x, schedule=base, steps=steps, generator=torch.Generator())
    assert fn.calls == nfe(method, steps)


def test_sit_heun2_is_full_heun_on_one_interval_fewer():
    # SiT's --sampling-method heun2 --num-sampling-steps N: torchdiffeq's fixed-grid heun2 on
    # N grid points, i.e. heun(steps=N - 1, final_euler=False) here, 2 (N - 1) model calls.
    torchdiffeq = pytest.importorskip("torchdiffeq")
    g = Gaussian(get_path("linear"))
    x = _start_points()
    for n_points in (2, 7, 250):
        sit = Counter(lambda t, y: g.velocity(y, t.expand(y.shape[0])))
        grid = torch.linspace(1.0, 0.0, n_points, dtype=F64)
        ref = torchdiffeq.odeint(sit, x, grid, method="heun2")[-1]
        fn = Counter(g.velocity)
        out = heun(fn, x, steps=n_points - 1, final_euler=False)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        assert fn.calls == sit.calls == 2 * (n_points - 1)
    assert nfe("heun", 249, final_euler=False) == 498


def test_nfe_of_the_paper_heun_setting():
    assert nfe("heun", 250) == 499
    assert nfe("heun", 250, final_euler=False) == 500
    fn = Counter(lambda x, t: torch.zeros_like(x))
    heun(fn, torch.zeros(1, 1), steps=7, final_euler=False)
    assert fn.calls == nfe("heun", 7, final_euler=False)


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
def test_dopri5_meets_its_tolerance_on_the_exact_flow(path_name):
    # Gaussian data: the exact flow map is known, so the global error is measured directly.
    pytest.importorskip("torchdiffeq")
    g = Gaussian(get_path(path_name))
    x1 = torch.randn(200, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    exact = g.flow(x1, 1.0, 0.0)
    errors, calls = [], []
    for rtol in (1e-3, 1e-5, 1e-7, 1e-9):
        fn = Counter(g.velocity)
        out = dopri5(fn, x1, rtol=rtol, atol=rtol * 1e-3)
        assert out.dtype == F64 and out.shape == x1.shape
        errors.append(float((out - exact).abs().max()))
        calls.append(fn.calls)
        assert errors[-1] < 20 * rtol, (rtol, errors[-1])
        # Dormand-Prince with FSAL: 2 calls choose the first step, then 6 per attempted step.
        assert (fn.calls - 2) % 6 == 0, fn.calls
        assert all(t.shape == (200,) and t.dtype == F64 for t in fn.times)
        assert float(fn.times[0][0]) == 1.0
    assert errors == sorted(errors, reverse=True) and calls == sorted(calls)
    assert errors[-1] < 1e-8


def test_bad_steps_and_methods_are_named():
    with pytest.raises(ValueError, match="unknown sampler 'hune'"):
        nfe("hune", 3)
    with pytest.raises(ValueError, match="dopri5 is adaptive"):
        nfe("dopri5", 3)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        euler(lambda x, t: x, torch.zeros(1, 1), steps=0)
    with pytest.raises(ValueError, match="shaped like x"):
        euler(lambda x, t: x[:, :1], torch.zeros(2, 3), steps=1)


def test_samplers_keep_dtype_and_pass_time_as_a_batch_vector():
    fn = Counter(lambda x, t: torch.ones_like(x))
    out = heun(fn, torch.zeros(4, 2, dtype=torch.float32), steps=3)
    assert out.dtype == torch.float32
    assert all(t.shape == (4,) and t.dtype == torch.float32 for t in fn.times)
    torch.testing.assert_close(out, torch.full((4, 2), -1.0))  # dx/dt = 1 from t=1 to 0


# ------------------------------------------------------------------------------ generate


class GaussianFlowModel(torch.nn.Module):
    """A stand-in flow model returning the exact velocity of N(mu, s^2) data (default pixels
    N(0.2, 0.25^2); s = 1 is latent-like: a third of the values lie outside [-1, 1])."""

    kind, num_classes, in_channels, out_channels, input_size = "flow", 0, 1, 1, 4
    config = {"name": "gaussian-oracle"}

    def __init__(self, mu: float = 0.2, s: float = 0.25):
        super().__init__()
        self.gauss = Gaussian(
            get_path("linear"), torch.tensor([mu], dtype=F64), torch.tensor([s], dtype=F64)
        )
        self.seen_t: list[Tensor] = []

    def forward(self, x, t, y=None):
        assert y is None
        self.seen_t.append(t)
        v = self.gauss.velocity(x.double().reshape(-1, 1), t.double().repeat_interleave(16))
        return v.reshape(x.shape).to(x.dtype)


def test_generate_end_to_end_recovers_the_gaussian_and_restores_train_mode():
    model = GaussianFlowModel().train()
    imgs, spec = generate(
        model, num=300, sampler="heun", steps=20, generator=torch.Generator().manual_seed(0),
        batch_size=128,
    )  # fmt: skip
    assert model.training
    assert imgs.shape == (300, 1, 4, 4) and imgs.dtype == torch.float32
    pixels = imgs.reshape(-1, 1).double()
    _check_moments(pixels[:, :], torch.tensor([0.2], dtype=F64), torch.tensor([0.25], dtype=F64))
    assert spec == {
        "method": "heun", "steps": 20, "nfe": 39, "cfg_scale": 1.0, "cfg_interval": [0.0, 1.0],
        "options": {"final_euler": True},
        "model": "gaussian-oracle", "kind": "flow", "num": 300, "path": "linear", "seed": 0,
        "space": "pixel", "decoded": False, "clamp": "pixels", "cfg_channels": 1,
    }  # fmt: skip
    # 3 batches x 39 evaluations, t running from noise (1) to data.
    assert len(model.seen_t) == 3 * 39 and float(model.seen_t[0][0]) == 1.0


def test_generate_never_clamps_latents_and_clamps_pixels():
    # Latent-like data N(0, 1): about 32% of the exact samples lie outside [-1, 1].
    def run(**kw):
        return generate(
            GaussianFlowModel(mu=0.0, s=1.0), num=64, sampler="heun", steps=20,
            generator=torch.Generator().manual_seed(0), **kw,
        )  # fmt: skip

    latents, spec = run(space="latent")
    assert spec["space"] == "latent" and spec["clamp"] == "none" and not spec["decoded"]
    outside = float((latents.abs() > 1).double().mean())
    assert 0.25 < outside < 0.4  # N(0, 1): P(|z| > 1) = 0.317
    zero, one = torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)
    _check_moments(latents.reshape(-1, 1).double(), zero, one)

    pixels, spec = run()  # the same model taken for a pixel model: clamped
    assert spec["space"] == "pixel" and spec["clamp"] == "pixels"
    torch.testing.assert_close(pixels, latents.clamp(-1, 1))

    # Decoding: the decoder sees the raw latents; its pixels (here 3 z) are clamped afterwards.
    seen = []

    def decode(z):
        seen.append(z.clone())
        return 3 * z

    images, spec = run(space="latent", decode=decode)
    assert spec["space"] == "latent" and spec["decoded"] and spec["clamp"] == "pixels"
    torch.testing.assert_close(torch.cat(seen).float(), latents)
    torch.testing.assert_close(images, (3 * latents).clamp(-1, 1))


def test_generate_space_errors_are_named():
    with pytest.raises(ValueError, match=r"space must be one of \['pixel', 'latent'\]"):
        generate(GaussianFlowModel(), num=1, steps=1, space="latents")
    with pytest.raises(ValueError, match="pass space='latent'"):
        generate(GaussianFlowModel(), num=1, steps=1, decode=lambda z: z)


@pytest.fixture(scope="module")
def tiny_models():
    build = pytest.importorskip("dispersive.models").build
    torch.manual_seed(0)
    kw = dict(input_size=8, in_channels=1, num_classes=3)
    return {kind: build(name, **kw) for kind, name in
            [("flow", "SiT-XS/4"), ("ddpm", "DiT-XS/4"), ("meanflow", "MF-XS/4")]}  # fmt: skip


@pytest.mark.parametrize(
    "kind,sampler,steps",
    [("flow", "euler", 3), ("flow", "heun", 3), ("flow", "euler_maruyama", 3),
     ("ddpm", "ddpm", 3), ("ddpm", "ddim", 3), ("meanflow", "meanflow", 2)],
)  # fmt: skip
def test_generate_with_tiny_models(tiny_models, kind, sampler, steps):
    model = tiny_models[kind]
    batches = []
    handle = model.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        gen = torch.Generator().manual_seed(7)
        imgs, spec = generate(
            model, num=5, sampler=sampler, steps=steps, cfg_scale=2.0, batch_size=3,
            generator=gen,
        )  # fmt: skip
        again, _ = generate(
            model, num=5, sampler=sampler, steps=steps, cfg_scale=2.0, batch_size=3,
            generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
    finally:
        handle.remove()
    assert imgs.shape == (5, 1, 8, 8) and float(imgs.abs().max()) <= 1.0
    assert torch.equal(imgs, again)
    json.dumps(spec)
    assert spec["method"] == sampler and spec["kind"] == kind and spec["seed"] == 7
    # NFE per batch is the reported one; each guided call is one forward on a doubled batch.
    per_run = 2 * spec["nfe"]  # two batches (3 + 2) per run
    assert len(batches) == 2 * per_run
    assert sorted(set(batches)) == [4, 6]


def test_generate_ddpm_guidance_interval_is_in_package_time(tiny_models):
    model = tiny_models["ddpm"]
    seen = []
    handle = model.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].shape[0], args[1][0].item()))
    )
    try:
        generate(model, num=2, sampler="ddim", steps=4, cfg_scale=3.0, cfg_interval=(0.0, 0.5))
    finally:
        handle.remove()
    # Respaced steps 999, 666, 333, 0: guidance (doubled batch) only where k / 1000 <= 0.5.
    assert seen == [(2, 999.0), (2, 666.0), (4, 333.0), (4, 0.0)]


def test_generate_rejects_mismatches(tiny_models):
    with pytest.raises(ValueError, match="valid samplers for it: \\['ddpm', 'ddim'\\]"):
        generate(tiny_models["ddpm"], num=1, sampler="heun")
    with pytest.raises(ValueError, match="class-conditional"):
        generate(GaussianFlowModel(), num=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        generate(tiny_models["flow"], num=2, labels=[0, 7], steps=1)
    with pytest.raises(ValueError, match=r"valid options: \['clip_x0', 'eta'\]"):
        generate(tiny_models["ddpm"], num=1, sampler="ddim", options={"last_step": 0.0})


def test_generate_dopri5_counts_and_records_the_nfe_actually_used():
    pytest.importorskip("torchdiffeq")
    model = GaussianFlowModel()
    imgs, spec = generate(
        model, num=300, sampler="dopri5", steps=25, batch_size=128, space="latent",
        options={"rtol": 1e-5, "atol": 1e-8}, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    per_batch = spec["nfe_per_batch"]
    assert len(per_batch) == 3 and sum(per_batch) == len(model.seen_t)
    assert spec["nfe"] == pytest.approx(sum(per_batch) / 3, abs=0.01)
    assert spec["steps"] is None and spec["options"] == {"atol": 1e-8, "rtol": 1e-5}
    _check_moments(imgs.reshape(-1, 1).double(), torch.tensor([0.2], dtype=F64),
                   torch.tensor([0.25], dtype=F64))  # fmt: skip
    # SiT's defaults: atol 1e-6, rtol 1e-3; fewer calls at the looser tolerance.
    _, loose = generate(GaussianFlowModel(), num=128, sampler="dopri5")
    assert loose["options"] == {"atol": 1e-6, "rtol": 1e-3}
    assert loose["nfe"] == loose["nfe_per_batch"][0] < per_batch[0]
    json.dumps(spec)


def test_generate_passes_sampler_options_and_records_them():
    model = GaussianFlowModel()
    _, spec = generate(model, num=2, sampler="heun", steps=4, options={"final_euler": False})
    assert spec["nfe"] == 8 and len(model.seen_t) == 8
    assert spec["options"] == {"final_euler": False}
    _, spec = generate(model, num=2, sampler="euler_maruyama", steps=5, options={"last_step": 0.0})
    assert spec["options"] == {"diffusion": "sigma", "diffusion_scale": 1.0, "last_step": 0.0}
    assert float(model.seen_t[-1][0]) == pytest.approx(0.2)  # uniform grid, no 0.04 step
