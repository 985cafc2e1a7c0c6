"""Time sampling, the DDPM schedule and the training objectives, against analytic answers.

The analytic problem: data x0 ~ N(mu, s^2 I), noise ~ N(0, I). Every marginal is Gaussian, the
optimal velocity E[v | x_t] is affine in x_t, and on the linear path the ODE flow between two
times is the affine map between two Gaussians, which gives MeanFlow's average velocity in
closed form.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from _ranks import run_ranks
from dispersive.ddpm import DDPMSchedule, discretized_gaussian_log_likelihood, normal_kl
from dispersive.objectives import (
    ddpm_loss,
    flow_matching_loss,
    meanflow_guided_velocity,
    meanflow_loss,
    meanflow_target,
    two_view_t,
)
from dispersive.paths import PATHS, LinearPath, expand_like, get_path
from dispersive.timesteps import sample_steps, sample_t, sample_t_r
from dispersive.train.distributed import retire_process_group

F64 = torch.float64
MU, S = 0.7, 0.5  # the Gaussian data distribution N(MU, S^2) per coordinate


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =========================================================================== timesteps
def test_sample_t_uniform_and_logit_normal_moments():
    n = 20000
    t = sample_t(n, generator=gen(0), dtype=F64)
    assert t.shape == (n,) and t.dtype == F64 and 0 <= float(t.min()) and float(t.max()) <= 1
    se = math.sqrt(1 / 12 / n)
    assert abs(float(t.mean()) - 0.5) < 5 * se
    t = sample_t(n, dist="logit_normal", mean=-0.4, std=1.3, generator=gen(1), dtype=F64)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) + 0.4) < 5 * 1.3 / math.sqrt(n)
    assert abs(float(logit.std()) - 1.3) < 5 * 1.3 / math.sqrt(2 * n)


def test_sample_t_is_reproducible_and_validates():
    a = sample_t(5, dist="logit_normal", generator=gen(3))
    b = sample_t(5, dist="logit_normal", generator=gen(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="valid choices"):
        sample_t(3, dist="beta")
    with pytest.raises(ValueError, match="std"):
        sample_t(3, dist="logit_normal", std=0.0)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_sample_t_r_order_share_and_marginals(ratio):
    n = 8000
    t, r = sample_t_r(n, ratio_r_neq_t=ratio, dist="uniform", generator=gen(4), dtype=F64)
    assert bool((r <= t).all())
    neq = r != t
    assert int(neq.sum()) == n - round(n * (1 - ratio))  # the exact share
    if ratio > 0:
        # max / min of two uniforms have means 2/3 and 1/3 (variance 1/18).
        se = math.sqrt(1 / 18 / int(neq.sum()))
        assert abs(float(t[neq].mean()) - 2 / 3) < 5 * se
        assert abs(float(r[neq].mean()) - 1 / 3) < 5 * se


def test_sample_t_r_defaults_are_meanflows_imagenet_setting():
    t, r = sample_t_r(4000, generator=gen(5), dtype=F64)
    assert abs(float((r != t).double().mean()) - 0.25) < 1e-3
    # r = t samples are the max of two logit-normal(-0.4, 1) draws; all values are in (0, 1).
    assert 0 < float(r.min()) and float(t.max()) < 1
    with pytest.raises(ValueError, match="ratio_r_neq_t"):
        sample_t_r(4, ratio_r_neq_t=1.5)


def test_sample_steps():
    k = sample_steps(5000, num_steps=10, generator=gen(6))
    assert k.dtype == torch.long and int(k.min()) == 0 and int(k.max()) == 9
    with pytest.raises(ValueError, match="num_steps"):
        sample_steps(3, num_steps=0)


# =========================================================================== flow matching
def gaussian_fm_closed_form(path, t: float):
    """(A, b, minimum): E[v | x_t] = A x_t + b and the minimal expected loss E Var(v | x_t)."""
    tt = torch.tensor(t, dtype=F64)
    a, s, da, ds = (float(f(tt)) for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))
    var_x = a * a * S * S + s * s
    cov = da * a * S * S + ds * s
    var_v = da * da * S * S + ds * ds
    A = cov / var_x
    return A, da * MU - A * a * MU, var_v - cov * cov / var_x


def gaussian_batch(n: int, d: int, seed: int):
    g = gen(seed)
    x0 = MU + S * torch.randn(n, d, generator=g, dtype=F64)
    noise = torch.randn(n, d, generator=g, dtype=F64)
    return x0, noise


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize("t0", [0.2, 0.7])
def test_flow_matching_optimal_velocity_gives_the_minimum(name, t0):
    path = get_path(name)
    A, b, minimum = gaussian_fm_closed_form(path, t0)
    n = 20000
    x0, noise = gaussian_batch(n, 2, seed=10)
    t = torch.full((n,), t0, dtype=F64)
    loss = flow_matching_loss(lambda x, tt: A * x + b, x0, t=t, noise=noise, path=path)
    assert loss.shape == (n,)
    assert abs(float(loss.mean()) - minimum) < 5 * float(loss.std()) / math.sqrt(n)
    # A wrong slope costs exactly delta^2 E[x_t^2] more in expectation.
    delta = 0.2
    worse = flow_matching_loss(lambda x, tt: (A + delta) * x + b, x0, t=t, noise=noise, path=path)
    x_t = path.interpolate(x0, noise, t)
    excess = delta**2 * float((path.alpha(torch.tensor(t0)) * MU) ** 2) + delta**2 * (
        float(path.alpha(torch.tensor(t0))) ** 2 * S * S + float(path.sigma(torch.tensor(t0))) ** 2
    )
    diff = worse - loss
    assert float(diff.mean()) > 0
    assert abs(float(diff.mean()) - excess) < 5 * float(diff.std()) / math.sqrt(n) + 1e-12
    assert x_t.shape == x0.shape


@pytest.mark.parametrize("name", sorted(PATHS))
def test_flow_matching_affine_fit_recovers_the_closed_form(name):
    # The empirical loss is quadratic in (A, b): one Newton step from zero is its exact minimiser.
    path = get_path(name)
    t0 = 0.45
    A, b, _ = gaussian_fm_closed_form(path, t0)
    n = 40000
    x0, noise = gaussian_batch(n, 1, seed=11)
    t = torch.full((n,), t0, dtype=F64)

    def mean_loss(theta):
        return flow_matching_loss(
            lambda x, tt: theta[0] * x + theta[1], x0, t=t, noise=noise, path=path
        ).mean()

    grad_fn = torch.func.grad(mean_loss)
    theta0 = torch.zeros(2, dtype=F64)
    grad0 = grad_fn(theta0)
    # The gradient is affine in theta: its change along each unit vector is a Hessian column.
    hess = torch.stack([grad_fn(e) - grad0 for e in torch.eye(2, dtype=F64)], dim=1)
    theta = theta0 - torch.linalg.solve(hess, grad0)
    assert float(grad_fn(theta).abs().max()) < 1e-10
    assert abs(float(theta[0]) - A) < 0.03
    assert abs(float(theta[1]) - b) < 0.03


def test_flow_matching_per_sample_t_and_errors():
    path = LinearPath()
    x0, noise = gaussian_batch(4, 3, seed=12)
    t = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=F64)
    # The exact conditional velocity of the linear path (noise - x0) gives zero loss.
    loss = flow_matching_loss(lambda x, tt: noise - x0, x0, t=t, noise=noise, path=path)
    torch.testing.assert_close(loss, torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match=r"returned shape \(4, 2\)"):
        flow_matching_loss(lambda x, tt: x[:, :2], x0, t=t, noise=noise, path=path)
    with pytest.raises(ValueError, match="noise"):
        flow_matching_loss(lambda x, tt: x, x0, t=t, noise=noise[:, :2], path=path)


# =========================================================================== DDPM
def oracle_alphas_cumprod(k: int, num_steps=1000, b0=1e-4, b1=0.02) -> tuple[float, float]:
    betas = [b0 + (b1 - b0) * i / (num_steps - 1) for i in range(num_steps)]
    return math.prod(1 - b for b in betas[: k + 1]), betas[k]


def test_schedule_tables_against_python_floats():
    sch = DDPMSchedule()
    assert sch.num_steps == 1000 and sch.betas.dtype == F64
    assert float(sch.betas[0]) == pytest.approx(1e-4) and float(sch.betas[-1]) == 0.02
    for k in (0, 1, 500, 999):
        ac, beta = oracle_alphas_cumprod(k)
        assert float(sch.alphas_cumprod[k]) == pytest.approx(ac, rel=1e-12)
        assert float(sch.betas[k]) == pytest.approx(beta, rel=1e-12)
    assert bool((sch.alphas_cumprod[1:] < sch.alphas_cumprod[:-1]).all())  # noisier with k
    assert float(sch.alphas_cumprod_prev[0]) == 1.0
    torch.testing.assert_close(sch.alphas_cumprod_prev[1:], sch.alphas_cumprod[:-1])


def test_q_sample_statistics():
    sch = DDPMSchedule()
    n = 20000
    x0 = torch.full((n, 1), 0.8, dtype=F64)
    for k_val in (10, 400, 999):
        k = torch.full((n,), k_val, dtype=torch.long)
        x_k = sch.q_sample(x0, k, torch.randn(n, 1, generator=gen(k_val), dtype=F64))
        ac, _ = oracle_alphas_cumprod(k_val)
        sd = math.sqrt(1 - ac)
        assert abs(float(x_k.mean()) - math.sqrt(ac) * 0.8) < 5 * sd / math.sqrt(n)
        assert abs(float(x_k.std()) - sd) < 5 * sd / math.sqrt(2 * n)


def test_q_posterior_matches_gaussian_conditioning():
    # x_{k-1} = sqrt(abar_{k-1}) x0 + sqrt(1 - abar_{k-1}) e1, x_k = sqrt(alpha_k) x_{k-1} +
    # sqrt(beta_k) e2: condition the Gaussian x_{k-1} on the observation x_k (oracle).
    sch = DDPMSchedule()
    ks = [0, 1, 2, 50, 500, 999]
    g = gen(20)
    x0 = torch.randn(len(ks), 3, generator=g, dtype=F64)
    x_k = torch.randn(len(ks), 3, generator=g, dtype=F64)
    k = torch.tensor(ks)
    mean, var, log_var = sch.q_posterior(x0, x_k, k)
    for i, kv in enumerate(ks):
        beta = float(sch.betas[kv])
        if kv == 0:  # q(x_{-1} | x_0, x0) is a point mass at x0
            torch.testing.assert_close(mean[i], x0[i])
            assert float(var[i, 0]) == 0.0
            continue
        ac_prev, _ = oracle_alphas_cumprod(kv - 1)
        prior_var = 1 - ac_prev
        post_var = 1 / (1 / prior_var + (1 - beta) / beta)
        post_mean = post_var * (
            math.sqrt(ac_prev) * x0[i] / prior_var + math.sqrt(1 - beta) * x_k[i] / beta
        )
        torch.testing.assert_close(mean[i], post_mean, rtol=1e-9, atol=1e-12)
        assert float(var[i, 0]) == pytest.approx(post_var, rel=1e-9)
        assert float(log_var[i, 0]) == pytest.approx(math.log(post_var), rel=1e-9)
    # The clipped log variance at k = 0 takes the k = 1 value.
    assert float(log_var[0, 0]) == pytest.approx(float(sch.posterior_variance[1].log()))


def test_eps_x0_conversions_invert():
    sch = DDPMSchedule()
    g = gen(21)
    x0, eps = torch.randn(5, 2, 3, generator=g, dtype=F64), torch.randn(5, 2, 3, generator=g)
    eps = eps.to(F64)
    k = torch.tensor([0, 3, 100, 700, 999])
    x_k = sch.q_sample(x0, k, eps)
    torch.testing.assert_close(sch.predict_x0_from_eps(x_k, k, eps), x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sch.predict_eps_from_x0(x_k, k, x0), eps, rtol=1e-8, atol=1e-8)


def test_learned_range_endpoints():
    sch = DDPMSchedule()
    x_k = torch.zeros(3, 2, 4, dtype=F64)
    k = torch.tensor([0, 10, 999])
    for v, table in ((1.0, sch.betas.log()), (-1.0, sch.posterior_log_variance_clipped)):
        out = torch.cat([torch.zeros_like(x_k), torch.full_like(x_k, v)], dim=1)
        lv = sch.p_mean_variance(out, x_k, k)["log_var"]
        torch.testing.assert_close(lv, table[k].reshape(3, 1, 1).expand_as(x_k))
    with pytest.raises(ValueError, match="2C"):
        sch.p_mean_variance(torch.zeros_like(x_k), x_k, k)


def test_vb_term_is_the_analytic_kl():
    sch = DDPMSchedule()
    g = gen(22)
    b = 4
    x0, x_k = torch.randn(b, 3, generator=g, dtype=F64), torch.randn(b, 3, generator=g, dtype=F64)
    mean = torch.randn(b, 3, generator=g, dtype=F64)
    log_var = -3 + torch.randn(b, 3, generator=g, dtype=F64)
    k = torch.tensor([1, 5, 300, 999])
    vb = sch.vb_terms(x0, x_k, k, mean=mean, log_var=log_var)
    true_mean, true_var, _ = sch.q_posterior(x0, x_k, k)
    p = torch.distributions.Normal(true_mean, true_var.sqrt())
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    oracle = torch.distributions.kl_divergence(p, q).mean(dim=1) / math.log(2)
    torch.testing.assert_close(vb, oracle, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        normal_kl(mean, log_var, mean, log_var), torch.zeros_like(mean), atol=1e-12, rtol=0
    )


def test_ddpm_loss_is_zero_for_the_true_eps_and_posterior_variance():
    sch = DDPMSchedule()
    g = gen(23)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=F64).clamp(-1, 1)
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    k = torch.tensor([1, 2, 50, 400])
    # eps = the true noise, v = -1 (log var = the exact posterior log variance for k >= 1).
    perfect = lambda x, kk: torch.cat([noise, -torch.ones_like(noise)], dim=1)
    loss = ddpm_loss(perfect, x0, k=k, noise=noise, schedule=sch)
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, torch.zeros(4, dtype=F64), atol=1e-9, rtol=0)
    # A wrong variance makes the vb term positive.
    wrong = lambda x, kk: torch.cat([noise, torch.zeros_like(noise)], dim=1)
    assert bool((ddpm_loss(wrong, x0, k=k, noise=noise, schedule=sch) > 1e-8).all())


def test_ddpm_vb_term_trains_only_the_variance():
    sch = DDPMSchedule(num_steps=50)
    g = gen(24)
    x0 = torch.randn(3, 2, 4, generator=g, dtype=F64)
    noise = torch.randn(3, 2, 4, generator=g, dtype=F64)
    k = torch.tensor([0, 7, 49])
    out = torch.randn(3, 4, 4, generator=g, dtype=F64, requires_grad=True)
    loss = ddpm_loss(lambda x, kk: out, x0, k=k, noise=noise, schedule=sch)
    (grad,) = torch.autograd.grad(loss.sum(), out)
    # The eps channels see only the MSE: d/d eps mean((eps - noise)^2) = 2 (eps - noise) / D.
    torch.testing.assert_close(grad[:, :2], 2 * (out[:, :2].detach() - noise) / 8)
    assert float(grad[:, 2:].abs().sum()) > 0  # the variance channels get the vb gradient
    mse_only = ddpm_loss(
        lambda x, kk: out[:, :2], x0, k=k, noise=noise, schedule=sch, learn_sigma=False
    )
    assert bool((loss - mse_only).abs().gt(0).all())


def test_ddpm_loss_at_k0_is_the_decoder_nll():
    sch = DDPMSchedule(num_steps=20)
    x0 = torch.tensor([[-1.0, -0.2, 0.5, 1.0]], dtype=F64)
    noise = torch.tensor([[0.3, -0.1, 0.2, 0.0]], dtype=F64)
    k = torch.tensor([0])
    out = torch.cat([noise, torch.full_like(noise, 0.4)], dim=1)
    loss = ddpm_loss(lambda x, kk: out, x0, k=k, noise=noise, schedule=sch)
    pmv = sch.p_mean_variance(out, sch.q_sample(x0, k, noise), k)
    m, sd = pmv["mean"][0].tolist(), pmv["var"][0].sqrt().tolist()
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    nll = []
    for x, mi, si in zip(x0[0].tolist(), m, sd, strict=True):
        hi = 1.0 if x > 0.999 else cdf((x + 1 / 255 - mi) / si)
        lo = 0.0 if x < -0.999 else cdf((x - 1 / 255 - mi) / si)
        nll.append(-math.log(hi - lo))
    # mse = 0 (eps is exact); the vb term is weighted by K / 1000.
    assert float(loss[0]) == pytest.approx(sum(nll) / 4 / math.log(2) * 20 / 1000, rel=1e-6)


def test_discretized_gaussian_likelihood_sums_to_one_over_the_bins():
    x = torch.linspace(-1, 1, 256, dtype=F64)
    for mean, log_scale in ((0.1, -2.0), (-0.9, -4.0), (0.0, 0.5)):
        ll = discretized_gaussian_log_likelihood(
            x, means=torch.tensor(mean, dtype=F64), log_scales=torch.tensor(log_scale, dtype=F64)
        )
        assert float(ll.exp().sum()) == pytest.approx(1.0, abs=1e-9)


def test_respace_keeps_alphas_cumprod_and_original_indices():
    sch = DDPMSchedule()
    torch.testing.assert_close(sch.respace(1000).betas, sch.betas, rtol=1e-9, atol=0)
    r = sch.respace(25)
    assert r.num_steps == 25 and int(r.timesteps[0]) == 0 and int(r.timesteps[-1]) == 999
    torch.testing.assert_close(
        r.alphas_cumprod, sch.alphas_cumprod[r.timesteps], rtol=1e-12, atol=0
    )
    r2 = sch.respace([999, 0, 500])
    assert r2.timesteps.tolist() == [0, 500, 999]
    assert r2.respace(2).timesteps.tolist() == [0, 999]  # composes back to original indices
    assert sch.respace(1).timesteps.tolist() == [999]
    # The model sees the original step indices as floats.
    seen = []
    x0 = torch.zeros(2, 1, 2)
    ddpm_loss(
        lambda x, kk: seen.append(kk) or torch.zeros(2, 2, 2),
        x0,
        k=torch.tensor([0, 2]),
        noise=torch.zeros_like(x0),
        schedule=r2,
    )
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [0.0, 999.0]
    with pytest.raises(ValueError, match="steps"):
        sch.respace(0)


def test_schedule_validates_steps():
    sch = DDPMSchedule(num_steps=10)
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="integer tensor"):
        sch.q_sample(x, torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        sch.q_sample(x, torch.tensor([0, 10]), x)
    with pytest.raises(ValueError, match="beta_start"):
        DDPMSchedule(beta_start=0.1, beta_end=0.01)


def test_schedule_reads_nothing_back_from_a_device_k():
    # Off the CPU, the tables are indexed where k lives and k's range is not checked on the
    # host (a sync per lookup, many per step): on the meta device any read-back would raise.
    sch = DDPMSchedule(num_steps=10)
    k, x = torch.tensor([0, 9, 4]), torch.randn(3, 2, 5)
    out = sch.q_sample(x.to("meta"), k.to("meta"), x.to("meta"))
    assert out.device.type == "meta" and out.shape == x.shape
    coef = sch.gather(sch.sqrt_alphas_cumprod, k.to("meta"), x.to("meta"))
    assert coef.shape == (3, 1, 1) and coef.dtype == x.dtype
    # On the CPU the same lookups, checked: the values of the float64 tables in x's dtype.
    want = sch.sqrt_alphas_cumprod[k].float().reshape(3, 1, 1)
    assert torch.equal(sch.gather(sch.sqrt_alphas_cumprod, k, x), want)


def test_schedule_copies_its_tables_to_a_device_once():
    # A copy per lookup would be a host-to-device transfer per gather (several per step on a
    # GPU); the meta device stands in for one. Count the float64 copies that reach it.
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
                if out.device.type == "meta" and out.dtype == torch.float64:
                    self.n += 1
            return out

    sch = DDPMSchedule(num_steps=10)
    k, x = torch.tensor([0, 9, 4]).to("meta"), torch.randn(3, 2, 5).to("meta")
    counts = []
    for _ in range(3):
        with CountCopies() as mode:
            sch.q_sample(x, k, x)  # two tables
        counts.append(mode.n)
    assert counts == [2, 0, 0]
    # A caller's own table is not kept (it may be a temporary): copied on every call.
    mine = torch.linspace(0.0, 1.0, 10, dtype=torch.float64)
    with CountCopies() as mode:
        sch.gather(mine, k, x)
        sch.gather(mine, k, x)
    assert mode.n == 2
    # A table replaced on the schedule is not served from the old copy.
    sch.sqrt_alphas_cumprod = sch.sqrt_alphas_cumprod * 0.5
    with CountCopies() as mode:
        sch.q_sample(x, k, x)
    assert mode.n == 1


def test_schedule_variance_tables_match_their_definitions():
    sch = DDPMSchedule(num_steps=10)
    assert torch.equal(sch.log_betas, sch.betas.log())
    large = sch.posterior_log_variance_large
    assert large[0] == math.log(sch.posterior_variance[1]) and torch.equal(
        large[1:], sch.betas[1:].log()
    )
    # The fixed variances p_mean_variance decodes with are these tables at k.
    k, x = torch.tensor([0, 3, 9]), torch.randn(3, 2, 4, dtype=torch.float64)
    for fixed_var, table in (("large", large), ("small", sch.posterior_log_variance_clipped)):
        out = sch.p_mean_variance(x, x, k, learn_sigma=False, fixed_var=fixed_var)
        assert torch.equal(out["log_var"][:, 0, 0], table[k])
    # Learned range at v = +1: the upper end, log beta_k.
    out = sch.p_mean_variance(torch.cat([x, torch.ones_like(x)], 1), x, k)
    assert torch.allclose(out["log_var"][:, 0, 0], sch.betas[k].log(), rtol=0, atol=1e-12)
    one = DDPMSchedule(betas=[0.3])
    assert torch.equal(one.posterior_log_variance_large, one.betas.log())


# =========================================================================== MeanFlow
def marginal(t: torch.Tensor):
    """Mean and std of z_t = (1 - t) x0 + t e for x0 ~ N(MU, S^2)."""
    return (1 - t) * MU, torch.sqrt((1 - t) ** 2 * S * S + t**2)


def v_star(z, t):
    """The marginal velocity E[e - x0 | z_t]: the linear-path closed form."""
    tt = expand_like(t, z)
    m, sd = marginal(tt)
    return -MU + ((tt - (1 - tt) * S * S) / sd**2) * (z - m)


def u_exact(z, t, h, y=None):
    """Average velocity over [r, t]: (z_t - z_r) / h, z_r the affine ODE transport (h > 0)."""
    tt, hh = expand_like(t, z), expand_like(h, z)
    m_t, sd_t = marginal(tt)
    m_r, sd_r = marginal(tt - hh)
    z_r = m_r + sd_r / sd_t * (z - m_t)
    return (z - z_r) / hh


def test_exact_average_velocity_satisfies_the_meanflow_identity():
    g = gen(30)
    n = 64
    t = 0.2 + 0.8 * torch.rand(n, generator=g, dtype=F64)
    h = t * (0.05 + 0.95 * torch.rand(n, generator=g, dtype=F64))
    z = torch.randn(n, 3, generator=g, dtype=F64)
    # Sanity of the oracle: u -> v* as h -> 0.
    torch.testing.assert_close(
        u_exact(z, t, torch.full_like(h, 1e-7)), v_star(z, t), atol=1e-5, rtol=0
    )
    u, u_tgt = meanflow_target(u_exact, z, t, h, v_star(z, t))
    torch.testing.assert_close(u_tgt, u, atol=1e-10, rtol=1e-10)
    # Control: the instantaneous velocity is not an average velocity for h > 0.
    u2, u2_tgt = meanflow_target(lambda z_, t_, h_, y: v_star(z_, t_), z, t, h, v_star(z, t))
    assert float((u2_tgt - u2).abs().max()) > 1e-2


def _stationarity_stats(u_fn, n=20000, seed=31):
    """Per-sample d loss / d (bias, scale) of u_fn + bias + scale * z at 0 (plain squared error)."""
    x0, noise = gaussian_batch(n, 2, seed=seed)
    t, r = sample_t_r(n, ratio_r_neq_t=1.0, dist="uniform", generator=gen(seed + 1), dtype=F64)
    t = 0.1 + 0.9 * t
    r = torch.minimum(r, t - 0.02)  # keep h >= 0.02 (the closed form divides by h)
    bias = torch.zeros(n, dtype=F64, requires_grad=True)
    scale = torch.zeros(n, dtype=F64, requires_grad=True)

    def model(z, t_, h_, y=None):
        return u_fn(z, t_, h_) + bias[:, None] + scale[:, None] * z

    loss, aux = meanflow_loss(model, x0, t=t, r=r, noise=noise, adaptive_p=0.0)
    assert aux is None
    gb, gs = torch.autograd.grad(loss.sum(), (bias, scale))
    return [(float(g_.mean()), float(g_.std()) / math.sqrt(n)) for g_ in (gb, gs)]


def test_exact_average_velocity_is_a_stationary_point_of_the_meanflow_loss():
    # E[u - u_tgt | z_t] = 0 for the exact u, so the expected gradient w.r.t. any perturbation
    # g(z_t) vanishes (the per-sample residual is not 0: the target uses the conditional v).
    for mean, se in _stationarity_stats(u_exact):
        assert abs(mean) < 5 * se
    # Control: the instantaneous velocity is far from stationary.
    stats = _stationarity_stats(lambda z, t, h: v_star(z, t))
    assert max(abs(mean) / se for mean, se in stats) > 10


class TinyMF(nn.Module):
    """u(z, t, h, y) for z (B, D): an MLP with a tappable hidden block."""

    def __init__(self, d=3, width=6, num_classes=0):
        super().__init__()
        self.inp = nn.Linear(d + 2, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.Tanh())])
        self.out = nn.Linear(width, d)
        self.emb = nn.Embedding(num_classes + 1, width) if num_classes else None

    def forward(self, z, t, h, y=None):
        x = torch.tanh(self.inp(torch.cat([z, t[:, None], h[:, None]], dim=1)))
        if self.emb is not None:
            x = x + self.emb(y)
        for blk in self.blocks:
            x = blk(x)
        return self.out(x)


@pytest.mark.parametrize("fused", [False, True])
def test_meanflow_gradient_matches_finite_differences(fused):
    torch.manual_seed(0)
    model = TinyMF().double()
    g = gen(32)
    b = 6
    x0, noise = torch.randn(b, 3, generator=g, dtype=F64), torch.randn(b, 3, generator=g, dtype=F64)
    t, r = sample_t_r(b, ratio_r_neq_t=0.5, generator=g, dtype=F64)
    p, eps = 1.0, 1e-3
    loss, _ = meanflow_loss(
        model, x0, t=t, r=r, noise=noise, adaptive_p=p, adaptive_eps=eps, fused=fused
    )
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss.sum(), list(params.values()))

    # Oracle: the target and the adaptive weight are constants (stop-gradient) at theta0.
    z_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    with torch.no_grad():
        _, u_tgt = meanflow_target(model, z_t, t, t - r, noise - x0)
        w = (((model(z_t, t, t - r) - u_tgt) ** 2).sum(1) + eps) ** p

    def objective(name, flat_index, delta):
        p0 = params[name].detach()
        shifted = p0.flatten().clone()
        shifted[flat_index] += delta
        with torch.no_grad():
            u = torch.func.functional_call(
                model, {**params, name: shifted.view_as(p0)}, (z_t, t, t - r)
            )
        return float((((u - u_tgt) ** 2).sum(1) / w).sum())

    step = 1e-6
    for (name, prm), grad in zip(params.items(), grads, strict=True):
        fd = torch.zeros_like(prm)
        for i in range(prm.numel()):
            fd.view(-1)[i] = (objective(name, i, step) - objective(name, i, -step)) / (2 * step)
        torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8, msg=name)
    # The forward value of the adaptive loss is L / (L + eps)^p.
    with torch.no_grad():
        sq = ((model(z_t, t, t - r) - u_tgt) ** 2).sum(1)
    torch.testing.assert_close(loss.detach(), sq / (sq + eps) ** p)


def test_meanflow_adaptive_p0_is_the_summed_squared_error():
    model = TinyMF().double()
    g = gen(33)
    x0, noise = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.full((4,), 0.5, dtype=F64)
    loss, _ = meanflow_loss(model, x0, t=t, r=t, noise=noise, adaptive_p=0.0)
    # r = t: plain flow matching on the linear path (h = 0, no jvp contribution).
    z_t = 0.5 * x0 + 0.5 * noise
    with torch.no_grad():
        ref = ((model(z_t, t, torch.zeros_like(t)) - (noise - x0)) ** 2).sum(1)
    torch.testing.assert_close(loss.detach(), ref)


def test_meanflow_adaptive_eps_reaches_the_weight_and_defaults_to_the_official_value():
    # loss = L / (L + eps)^p with L the summed squared error; the official ImageNet code's
    # norm_eps is 0.01 (and norm_p 1.0), the defaults here.
    model = TinyMF().double()
    g = gen(38)
    x0, noise = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t, r = sample_t_r(5, ratio_r_neq_t=1.0, generator=g, dtype=F64)
    with torch.no_grad():
        sq, _ = meanflow_loss(model, x0, t=t, r=r, noise=noise, adaptive_p=0.0)
        default, _ = meanflow_loss(model, x0, t=t, r=r, noise=noise)
        torch.testing.assert_close(default, sq / (sq + 0.01))
        for eps, p in ((0.5, 1.0), (3.0, 0.75), (1e-3, 0.5)):
            loss, _ = meanflow_loss(
                model, x0, t=t, r=r, noise=noise, adaptive_eps=eps, adaptive_p=p
            )
            torch.testing.assert_close(loss, sq / (sq + eps) ** p)
    params = inspect.signature(meanflow_loss).parameters
    assert params["adaptive_eps"].default == 0.01 and params["adaptive_p"].default == 1.0


def test_guided_velocity_formula_interval_and_null_label():
    calls = []

    def fn(z, t, h, y):
        calls.append(z.shape[0])
        assert bool((h == 0).all())
        return z * (1.0 + y[:, None].to(z.dtype)) + t[:, None]

    g = gen(34)
    z, v = torch.randn(4, 2, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64)
    t = torch.tensor([0.1, 0.5, 0.9, 0.5], dtype=F64)
    y = torch.tensor([0, 1, 2, 3])  # 3 = null label
    assert meanflow_guided_velocity(fn, z, t, v, y=y) is v and calls == []  # omega=1, kappa=0
    omega, kappa = 1.5, 0.3
    out = meanflow_guided_velocity(
        fn, z, t, v, y=y, omega=omega, kappa=kappa, t_interval=(0.2, 0.95), null_y=3
    )
    u_c = z * (1.0 + y[:, None]) + t[:, None]
    u_n = z * 4.0 + t[:, None]
    guided = omega * v + kappa * u_c + (1 - omega - kappa) * u_n
    torch.testing.assert_close(out[1:3], guided[1:3])
    torch.testing.assert_close(out[0], v[0])  # t outside the interval
    torch.testing.assert_close(out[3], v[3])  # null label: unconditional target
    with pytest.raises(ValueError, match="null_y"):
        meanflow_guided_velocity(fn, z, t, v, y=y, omega=2.0)


def test_meanflow_loss_uses_the_guided_velocity_as_target_and_tangent():
    torch.manual_seed(1)
    model = TinyMF(num_classes=3).double()
    g = gen(35)
    x0, noise = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t, r = sample_t_r(5, ratio_r_neq_t=1.0, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1])
    kw = dict(cfg_omega=1.2, cfg_kappa=0.4, cfg_t_interval=(0.0, 1.0), null_y=3)
    loss, _ = meanflow_loss(model, x0, t=t, r=r, noise=noise, y=y, adaptive_p=0.0, **kw)
    z_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    with torch.no_grad():
        vt = meanflow_guided_velocity(
            model, z_t, t, noise - x0, y=y, omega=1.2, kappa=0.4, null_y=3
        )
        u, u_tgt = meanflow_target(model, z_t, t, t - r, vt, y=y)
    torch.testing.assert_close(loss.detach(), ((u - u_tgt) ** 2).sum(1))
    unguided, _ = meanflow_loss(model, x0, t=t, r=r, noise=noise, y=y, adaptive_p=0.0)
    assert not torch.allclose(loss, unguided)


def test_meanflow_tap_aux_is_the_gradient_forward_activation():
    from dispersive import FeatureTap

    torch.manual_seed(2)
    model = TinyMF()
    tap = FeatureTap(model, "blocks.0")
    g = gen(36)
    x0, noise = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t, r = sample_t_r(4, ratio_r_neq_t=0.5, generator=g)
    model(x0, t, t - r)  # a stale record that must not leak into the aux
    z_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    auxes, grads = [], []
    for fused in (False, True):
        model.zero_grad()
        loss, aux = meanflow_loss(model, x0, t=t, r=r, noise=noise, tap=tap, fused=fused)
        assert isinstance(aux, torch.Tensor) and aux.shape == (4, 6) and aux.requires_grad
        (loss.mean() + aux.square().mean()).backward()
        auxes.append(aux.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        with pytest.raises(RuntimeError, match="nothing recorded"):
            tap.pop()  # the jvp forwards left nothing behind
    model(z_t, t, t - r)
    expected = tap.pop().detach()
    for aux in auxes:
        torch.testing.assert_close(aux, expected)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_meanflow_on_a_real_tiny_model():
    models = pytest.importorskip("dispersive.models")
    from dispersive import FeatureTap

    torch.manual_seed(3)
    model = models.build("MF-XS/4", input_size=8, in_channels=1, num_classes=3, attn="math")
    tap = FeatureTap(model, model.block_names[1])
    g = gen(37)
    x0, noise = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t, r = sample_t_r(2, ratio_r_neq_t=1.0, generator=g)
    y = torch.tensor([0, 3])
    grads = []
    for fused in (False, True):
        model.zero_grad()
        loss, aux = meanflow_loss(
            model, x0, t=t, r=r, noise=noise, y=y, tap=tap, fused=fused, cfg_omega=2.0, null_y=3
        )
        assert loss.shape == (2,) and bool(torch.isfinite(loss).all()) and aux.shape[0] == 2
        loss.sum().backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_meanflow_fused_and_unfused_paths_agree_in_float64():
    # Same loss, aux and parameter gradients (with the dispersive term on the aux) on the real
    # model, with the presets' guidance (kappa > 0: the guidance forwards run in both paths).
    models = pytest.importorskip("dispersive.models")
    from dispersive import FeatureTap, dispersive_loss

    torch.manual_seed(4)
    model = models.build("MF-XS/4", input_size=8, in_channels=1, num_classes=3, attn="math")
    model = model.double()
    with torch.no_grad():  # leave adaLN-Zero's start, so that every parameter gets a gradient
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0.0, 0.05)
    tap = FeatureTap(model, model.block_names[0])
    g = gen(39)
    x0 = torch.randn(4, 1, 8, 8, generator=g, dtype=F64)
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=F64)
    t, r = sample_t_r(4, ratio_r_neq_t=0.5, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 3, 2])
    kw = dict(cfg_omega=1.0, cfg_kappa=0.5, null_y=3, adaptive_eps=0.01)
    out = []
    for fused in (False, True):
        model.zero_grad()
        loss, aux = meanflow_loss(model, x0, t=t, r=r, noise=noise, y=y, tap=tap, fused=fused, **kw)
        (loss.mean() + 0.5 * dispersive_loss(aux, tau=0.5)).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        out.append((loss.detach(), aux.detach(), grads))
    (l0, a0, g0), (l1, a1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a1, a0, rtol=1e-12, atol=1e-12)
    assert all(float(gr.abs().max()) > 0 for gr in g0)
    for gr0, gr1 in zip(g0, g1, strict=True):
        torch.testing.assert_close(gr1, gr0, rtol=1e-9, atol=1e-12)


def test_meanflow_input_errors():
    model = TinyMF()
    x0 = torch.zeros(3, 3)
    t = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match=r"r must be a tensor of shape \(3,\)"):
        meanflow_loss(model, x0, t=t, r=t[:2], noise=x0)
    with pytest.raises(ValueError, match="adaptive"):
        meanflow_loss(model, x0, t=t, r=t, noise=x0, adaptive_eps=0.0)


# =========================================================================== two views
def test_two_view_restricted_stays_within_the_gap():
    t = torch.cat([torch.zeros(2000), torch.ones(2000), torch.full((2000,), 0.5)])
    t2 = two_view_t(t, mode="restricted", max_gap=0.005, generator=gen(40))
    assert bool(((t2 - t).abs() <= 0.005 + 1e-7).all())
    assert 0 <= float(t2.min()) and float(t2.max()) <= 1
    # Uniform on the clipped window: mean 0.0025 at t = 0, 0.5 at t = 0.5, no mass at the edge.
    assert abs(float(t2[:2000].mean()) - 0.0025) < 1e-4
    assert abs(float(t2[4000:].mean()) - 0.5) < 1e-4
    assert float((t2[:2000] == 0).float().mean()) < 0.01


def test_two_view_independent_follows_the_given_distribution():
    t = torch.full((20000,), 0.3, dtype=F64)
    t2 = two_view_t(t, mode="independent", generator=gen(41))
    assert t2.dtype == F64 and abs(float(t2.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 20000)
    t3 = two_view_t(t, mode="independent", dist="logit_normal", mean=1.0, generator=gen(41))
    assert abs(float(torch.logit(t3).mean()) - 1.0) < 0.05
    torch.testing.assert_close(t2, two_view_t(t, mode="independent", generator=gen(41)))
    with pytest.raises(ValueError, match="valid modes"):
        two_view_t(t, mode="same")


# =========================================================================== DDP
DDP_WORLD = 2


def _ddp_problem():
    torch.manual_seed(5)
    model = TinyMF().double()
    g = gen(50)
    x0, noise = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)
    t, r = sample_t_r(8, ratio_r_neq_t=0.5, generator=g, dtype=F64)
    return model, x0, noise, t, r


def _ddp_objective(model_fn, tap, x0, noise, t, r, fused=False):
    loss, aux = meanflow_loss(model_fn, x0, t=t, r=r, noise=noise, tap=tap, fused=fused)
    return loss.mean() + 0.1 * aux.square().mean()


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dispersive import FeatureTap

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=DDP_WORLD
    )
    try:
        model, x0, noise, t, r = _ddp_problem()
        ddp = DistributedDataParallel(model)
        tap = FeatureTap(ddp, "blocks.0")
        rows = slice(4 * rank, 4 * rank + 4)
        # model_fn is the DDP wrapper: the jvp runs on ddp.module, the gradient forward on ddp.
        _ddp_objective(ddp, tap, x0[rows], noise[rows], t[rows], r[rows]).backward()
        out = {n: p.grad for n, p in model.named_parameters()}
        try:
            _ddp_objective(ddp, tap, x0[rows], noise[rows], t[rows], r[rows], fused=True)
            out["fused_refused"] = torch.tensor(False)
        except ValueError:
            out["fused_refused"] = torch.tensor(True)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        retire_process_group()  # the group outlives the DDP reducer (see its docstring)


@pytest.mark.distributed
def test_meanflow_under_ddp_matches_one_process(tmp_path):
    from dispersive import FeatureTap

    # The one-process reference first: it also warms torch.func up before the fork.
    model, x0, noise, t, r = _ddp_problem()
    tap = FeatureTap(model, "blocks.0")
    # Equal halves: the mean of the two ranks' objectives is the full-batch objective.
    halves = [slice(0, 4), slice(4, 8)]
    sum(_ddp_objective(model, tap, x0[s], noise[s], t[s], r[s]) for s in halves).div(2).backward()
    run_ranks(_ddp_worker, (str(tmp_path / "init"), str(tmp_path)), DDP_WORLD)
    for rank in range(DDP_WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert bool(out.pop("fused_refused"))
        for name, p in model.named_parameters():
            torch.testing.assert_close(out[name], p.grad, msg=f"rank {rank}: {name}")
