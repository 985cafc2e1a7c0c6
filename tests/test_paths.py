"""The time convention of dispersive.paths: t=0 data, t=1 noise, v = d x_t / d t."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dispersive.paths import (
    PATHS,
    GVPPath,
    LinearPath,
    expand_like,
    from_sit_time,
    get_path,
    to_sit_time,
)

F64 = torch.float64
PATH_NAMES = sorted(PATHS)


def _batch(n=6, shape=(3, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g, dtype=F64)
    noise = torch.randn(n, *shape, generator=g, dtype=F64)
    return x0, noise, g


@pytest.mark.parametrize("name", PATH_NAMES)
def test_t0_is_data_and_t1_is_noise(name):
    path = get_path(name)
    x0, noise, _ = _batch()
    zeros, ones = torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64)
    torch.testing.assert_close(path.interpolate(x0, noise, zeros), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(path.interpolate(x0, noise, ones), noise, atol=1e-12, rtol=0)
    assert float(path.alpha(torch.tensor(0.0, dtype=F64))) == pytest.approx(1.0)
    assert float(path.sigma(torch.tensor(1.0, dtype=F64))) == pytest.approx(1.0)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_velocity_is_the_time_derivative(name):
    path = get_path(name)
    x0, noise, g = _batch()
    t = 0.05 + 0.9 * torch.rand(6, generator=g, dtype=F64)
    v = path.velocity(x0, noise, t)
    # Forward-mode autograd in t.
    _, dxdt = torch.func.jvp(
        lambda tt: path.interpolate(x0, noise, tt), (t,), (torch.ones_like(t),)
    )
    torch.testing.assert_close(v, dxdt, atol=1e-12, rtol=1e-12)
    # Central finite differences (an oracle independent of autograd).
    eps = 1e-6
    fd = (path.interpolate(x0, noise, t + eps) - path.interpolate(x0, noise, t - eps)) / (2 * eps)
    torch.testing.assert_close(v, fd, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_coefficient_derivatives_match_autograd(name):
    path = get_path(name)
    t = torch.linspace(0.0, 1.0, 11, dtype=F64, requires_grad=True)
    (da,) = torch.autograd.grad(path.alpha(t).sum(), t)
    (ds,) = torch.autograd.grad(path.sigma(t).sum(), t)
    torch.testing.assert_close(path.d_alpha(t.detach()), da, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(path.d_sigma(t.detach()), ds, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", PATH_NAMES)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t0=st.floats(0.01, 0.99))
def test_velocity_conversions_invert(name, seed, t0):
    path = get_path(name)
    x0, noise, _ = _batch(n=4, seed=seed)
    t = torch.full((4,), t0, dtype=F64)
    x_t = path.interpolate(x0, noise, t)
    v = path.velocity(x0, noise, t)
    torch.testing.assert_close(path.velocity_to_x0(v, x_t, t), x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(path.velocity_to_noise(v, x_t, t), noise, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", PATH_NAMES)
def test_score_of_gaussian_data_from_optimal_velocity(name):
    # x0 ~ N(mu, s^2): x_t ~ N(a mu, a^2 s^2 + sigma^2), whose score is known; the optimal
    # velocity E[v | x_t] is affine in x_t (Gaussian conditioning).
    path = get_path(name)
    mu, s2 = 0.7, 0.3**2
    t = torch.tensor([0.1, 0.4, 0.8, 0.99], dtype=F64)
    x = torch.linspace(-2, 2, 4, dtype=F64).reshape(4, 1).expand(4, 5).clone()
    tt = expand_like(t, x)
    a, s, da, ds = path.alpha(tt), path.sigma(tt), path.d_alpha(tt), path.d_sigma(tt)
    var_x = a**2 * s2 + s**2
    v_opt = da * mu + (da * a * s2 + ds * s) / var_x * (x - a * mu)
    score = -(x - a * mu) / var_x
    torch.testing.assert_close(path.velocity_to_score(v_opt, x, t), score, atol=1e-10, rtol=1e-10)
    p, q = path.score_coefficients(x, t)  # the same score as p x + q v, per-sample p and q
    assert p.shape == q.shape == (4, 1)
    torch.testing.assert_close(p * x + q * v_opt, score, atol=1e-10, rtol=1e-10)


def test_linear_and_gvp_coefficients():
    t = torch.linspace(0, 1, 7, dtype=F64)
    lin, gvp = LinearPath(), GVPPath()
    torch.testing.assert_close(lin.alpha(t), 1 - t)
    torch.testing.assert_close(lin.sigma(t), t)
    # GVP is variance preserving: alpha^2 + sigma^2 = 1.
    torch.testing.assert_close(gvp.alpha(t) ** 2 + gvp.sigma(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(gvp.sigma(t), torch.sin(math.pi * t / 2))


@pytest.mark.parametrize("name", PATH_NAMES)
def test_sit_time_mapping(name):
    # SiT puts data at t_sit = 1: x_sit(t_sit) = alpha_sit(t_sit) x0 + sigma_sit(t_sit) noise with
    # linear alpha_sit = t_sit, sigma_sit = 1 - t_sit; GVP alpha_sit = sin(pi t_sit / 2),
    # sigma_sit = cos(pi t_sit / 2). Same point in space, opposite velocity.
    sit = {
        "linear": (lambda u: u, lambda u: 1 - u),
        "gvp": (lambda u: torch.sin(math.pi * u / 2), lambda u: torch.cos(math.pi * u / 2)),
    }[name]
    path = get_path(name)
    x0, noise, g = _batch()
    t = torch.rand(6, generator=g, dtype=F64)
    t_sit = to_sit_time(t)
    torch.testing.assert_close(from_sit_time(t_sit), t)

    def x_sit(u):
        uu = expand_like(u, x0)
        return sit[0](uu) * x0 + sit[1](uu) * noise

    torch.testing.assert_close(x_sit(t_sit), path.interpolate(x0, noise, t), atol=1e-12, rtol=0)
    _, v_sit = torch.func.jvp(x_sit, (t_sit,), (torch.ones_like(t_sit),))
    torch.testing.assert_close(v_sit, -path.velocity(x0, noise, t), atol=1e-12, rtol=1e-12)


def test_expand_like_and_errors():
    x = torch.zeros(3, 2, 4)
    assert expand_like(torch.tensor([0.1, 0.2, 0.3]), x).shape == (3, 1, 1)
    assert expand_like(torch.tensor(0.5), x).shape == (3, 1, 1)
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        expand_like(torch.zeros(2), x)
    with pytest.raises(ValueError, match="valid paths"):
        get_path("cosine")
