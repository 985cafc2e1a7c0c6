"""The dispersive loss family against float64 brute-force oracles, properties and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dispersive import losses
from dispersive.losses import (
    VARIANTS,
    DispersiveLoss,
    contrastive_loss,
    dispersion_stats,
    dispersive_loss,
)

COV_EPS = 1e-5  # the documented relative variance floor of the covariance variant
RTOL = 1e-5  # the spec: float32 result within 1e-5 relative of the float64 formula


# --------------------------------------------------------------------------------------------
# Independent float64 oracles (numpy, explicit broadcasting / loops, D x D where needed)
# --------------------------------------------------------------------------------------------


def _np(z: torch.Tensor) -> np.ndarray:
    return z.detach().reshape(z.shape[0], -1).double().numpy()


def oracle_dissimilarity(z: np.ndarray, variant: str, normalize_by_dim: bool) -> np.ndarray:
    b, dim = z.shape
    if variant == "infonce_cosine":
        zh = z / np.linalg.norm(z, axis=1, keepdims=True)
        d = -(zh[:, None, :] * zh[None, :, :]).sum(-1)
        np.fill_diagonal(d, -1.0)
        return d
    d = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)  # B x B x D: fine at small D
    return d / dim if normalize_by_dim else d


def oracle_standardize(z: np.ndarray) -> np.ndarray:
    b = z.shape[0]
    zc = z - z.mean(0)
    var = (zc**2).sum(0) / (b - 1)
    return zc / np.sqrt(var + COV_EPS * var.mean())


def oracle_reduce(d: np.ndarray, variant: str, tau: float, margin: float, diag: bool) -> float:
    b = d.shape[0]
    mask = np.ones((b, b), bool) if diag else ~np.eye(b, dtype=bool)
    if variant == "hinge":
        return float((np.maximum(0.0, margin - d) ** 2)[mask].mean())
    x = -d[mask] / tau
    top = x.max()
    return float(top + math.log(np.exp(x - top).mean()))


def oracle(z, variant, *, tau=0.5, margin=1.0, normalize_by_dim=True, include_diagonal=True):
    z = _np(z)
    b, dim = z.shape
    if variant == "covariance":
        zn = oracle_standardize(z)
        cov = zn.T @ zn / (b - 1)  # the D x D matrix, small D only
        total = float((cov**2).sum())
        return total / dim**2 if normalize_by_dim else total
    d = oracle_dissimilarity(z, variant, normalize_by_dim)
    return oracle_reduce(d, variant, tau, margin, include_diagonal)


def assert_rel(actual: torch.Tensor | float, expected: float, rtol: float = RTOL, atol=0.0):
    a = float(actual.detach() if isinstance(actual, torch.Tensor) else actual)
    assert math.isfinite(a)
    assert abs(a - expected) <= rtol * abs(expected) + atol, (a, expected, abs(a - expected))


def naive_torch(z: torch.Tensor, variant: str, tau: float, margin: float, diag: bool):
    """A direct differentiable float64 implementation for gradient comparisons."""
    z = z.reshape(z.shape[0], -1).double()
    b, dim = z.shape
    if variant == "covariance":
        zc = z - z.mean(0)
        var = zc.square().sum(0) / (b - 1)
        zn = zc / torch.sqrt(var + COV_EPS * var.mean())
        return (zn.T @ zn / (b - 1)).square().sum() / dim**2
    if variant == "infonce_cosine":
        zh = z / z.norm(dim=1, keepdim=True)
        d = -(zh @ zh.T)
        d = torch.where(torch.eye(b, dtype=torch.bool), -1.0, d)
    else:
        d = (z[:, None, :] - z[None, :, :]).square().sum(-1) / dim
    mask = torch.ones(b, b, dtype=torch.bool) if diag else ~torch.eye(b, dtype=torch.bool)
    if variant == "hinge":
        return torch.relu(margin - d)[mask].square().mean()
    return torch.logsumexp(-d[mask] / tau, 0) - math.log(int(mask.sum()))


# --------------------------------------------------------------------------------------------
# Values against the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("include_diagonal", [True, False])
@pytest.mark.parametrize("shape", [(2, 7), (5, 3, 4, 4), (33, 40)])
def test_matches_float64_oracle(variant, include_diagonal, shape):
    g = torch.Generator().manual_seed(hash((variant, include_diagonal, shape)) % 2**31)
    z = 0.4 * torch.randn(shape, generator=g) + torch.rand(shape[1:], generator=g)
    kw = dict(tau=0.7, margin=2.5, include_diagonal=include_diagonal)
    assert_rel(dispersive_loss(z, variant=variant, **kw), oracle(z, variant, **kw))


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge", "covariance"])
def test_matches_oracle_without_dim_normalisation(variant):
    z = 0.05 * torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    kw = dict(tau=0.3, margin=1.5, normalize_by_dim=False)
    assert_rel(dispersive_loss(z, variant=variant, **kw), oracle(z, variant, **kw))


def test_large_batch_b512():
    z = torch.randn(512, 6, generator=torch.Generator().manual_seed(2))
    for variant in VARIANTS:
        for diag in (True, False):
            kw = dict(tau=0.5, margin=3.0, include_diagonal=diag)
            assert_rel(dispersive_loss(z, variant=variant, **kw), oracle(z, variant, **kw))


def test_large_dim_300k():
    b, dim = 4, 300_000
    z = torch.randn(b, dim, generator=torch.Generator().manual_seed(3)) + 0.5
    zd = _np(z)
    # Pair loops in float64 instead of a B x B x D broadcast.
    sq = np.array([[((zd[i] - zd[j]) ** 2).sum() for j in range(b)] for i in range(b)])
    unit = zd / np.linalg.norm(zd, axis=1, keepdims=True)
    neg_cos = -np.array([[unit[i] @ unit[j] for j in range(b)] for i in range(b)])
    np.fill_diagonal(neg_cos, -1.0)
    for diag, tau in ((True, 0.5), (False, 2.0)):
        assert_rel(
            dispersive_loss(z, tau=tau, include_diagonal=diag),
            oracle_reduce(sq / dim, "infonce_l2", tau, 1.0, diag),
        )
        assert_rel(
            dispersive_loss(z, variant="infonce_cosine", tau=tau, include_diagonal=diag),
            oracle_reduce(neg_cos, "infonce_cosine", tau, 1.0, diag),
        )
        assert_rel(
            dispersive_loss(z, variant="hinge", margin=2.5, include_diagonal=diag),
            oracle_reduce(sq / dim, "hinge", 0.5, 2.5, diag),
        )
    # Covariance: sum_{m,n} Cov_mn^2 = sum of the 4th powers of Zn's singular values / (B-1)^2
    # (an SVD, not the implementation's Gram identity; the D x D matrix is out of reach here).
    s = np.linalg.svd(oracle_standardize(zd), compute_uv=False)
    assert_rel(dispersive_loss(z, variant="covariance"), (s**4).sum() / (b - 1) ** 2 / dim**2)


def test_near_duplicate_large_norm_features_are_exact():
    # An uncentred Gram matrix would lose every digit here: |z|^2 ~ 1e10, distances ~ 1e-2.
    g = torch.Generator().manual_seed(4)
    z = 1e3 * torch.ones(16, 500) + 1e-2 * torch.randn(16, 500, generator=g)
    z64 = 1e3 * torch.ones(16, 500, dtype=torch.float64) + (z.double() - 1e3)
    for diag in (True, False):
        expected = oracle(z64, "infonce_l2", tau=1e-4, include_diagonal=diag)
        assert_rel(dispersive_loss(z, tau=1e-4, include_diagonal=diag), expected)


def test_chunked_gram_matches_unchunked(monkeypatch):
    z = torch.randn(4, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = {v: dispersive_loss(z, variant=v) for v in VARIANTS}
    monkeypatch.setattr(losses, "_SMALL_ELEMS", 0)  # the chunked path even for this small z
    monkeypatch.setattr(losses, "_CHUNK_ELEMS", 4 * 3)  # 3-column chunks, the last one short
    assert len(losses._column_chunks(4, 20)) == 7
    for v in VARIANTS:
        zz = z.clone().requires_grad_(True)
        torch.testing.assert_close(dispersive_loss(zz, variant=v), ref[v], rtol=1e-12, atol=0)
        assert torch.autograd.gradcheck(lambda x, v=v: dispersive_loss(x, variant=v), (zz,))


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("include_diagonal", [True, False])
def test_gradcheck_float64(variant, include_diagonal):
    z = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    z.requires_grad_(True)
    fn = lambda x: dispersive_loss(
        x, variant=variant, tau=0.8, margin=4.0, include_diagonal=include_diagonal
    )
    assert torch.autograd.gradcheck(fn, (z,))


@pytest.mark.parametrize(
    ("variant", "shape", "group"),
    [
        ("infonce_l2", (6, 40), 0),  # pdist path
        ("infonce_l2", (8, 40_000), 0),  # pdist path, Laplacian backward
        ("infonce_l2", (40, 30), 0),  # Gram path
        ("infonce_l2", (32, 30), 8),  # grouped pdist node
        ("infonce_cosine", (40, 30), 0),
        ("hinge", (40, 30), 0),
        ("covariance", (32, 30), 8),  # grouped covariance node
    ],
)
def test_first_order_backward_and_the_double_backward_error(variant, shape, group):
    # The custom backwards skip torch's once_differentiable wrapper on the usual first-order
    # path; under create_graph=True the wrapper must still be there: the same gradient, and
    # an error (not a silently wrong second derivative) when differentiated again.
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) + 0.3
    loss_fn = DispersiveLoss(variant=variant, tau=0.5, group_size=group)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    (ga,) = torch.autograd.grad(loss_fn(za), za)
    (gb,) = torch.autograd.grad(loss_fn(zb), zb, create_graph=True)
    assert torch.equal(ga, gb)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        gb.square().sum().backward()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("include_diagonal", [True, False])
def test_float32_gradient_matches_naive_float64_autograd(variant, include_diagonal):
    z = torch.randn(9, 30, generator=torch.Generator().manual_seed(7)) + 0.3
    z32 = z.clone().requires_grad_(True)
    dispersive_loss(
        z32, variant=variant, tau=0.6, margin=3.0, include_diagonal=include_diagonal
    ).backward()
    z64 = z.double().requires_grad_(True)
    naive_torch(z64, variant, 0.6, 3.0, include_diagonal).backward()
    torch.testing.assert_close(
        z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-6 * z64.grad.abs().max()
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("include_diagonal", [True, False])
@pytest.mark.parametrize(
    "case", ["scale_1e-6", "scale_1e4", "identical_rows", "zeros", "tau_1e-3", "bf16_1e4"]
)
def test_finite_loss_and_gradient_for_extreme_finite_input(variant, include_diagonal, case):
    z = torch.randn(8, 3, 10, generator=torch.Generator().manual_seed(8))
    tau = 0.5
    if case == "scale_1e-6":
        z = z * 1e-6
    elif case == "scale_1e4":
        z = z * 1e4
    elif case == "identical_rows":
        z = z[:1].expand_as(z).clone() * 37.0
    elif case == "zeros":
        z = torch.zeros_like(z)
    elif case == "tau_1e-3":
        tau = 1e-3
    elif case == "bf16_1e4":
        z = (z * 1e4).bfloat16()
    z.requires_grad_(True)
    loss = dispersive_loss(z, variant=variant, tau=tau, include_diagonal=include_diagonal)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(z.grad).all()


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

_batch = st.integers(2, 12)
_dim = st.integers(1, 16)
_seed = st.integers(0, 2**31 - 1)


def _draw(b: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, dim, generator=g, dtype=dtype) * (0.2 + torch.rand(1, generator=g))


@settings(max_examples=30, deadline=None)
@given(b=_batch, dim=_dim, seed=_seed, variant=st.sampled_from(VARIANTS), diag=st.booleans())
def test_permutation_invariance(b, dim, seed, variant, diag):
    z = _draw(b, dim, seed)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    kw = dict(variant=variant, include_diagonal=diag, margin=2.0)
    torch.testing.assert_close(dispersive_loss(z[perm], **kw), dispersive_loss(z, **kw))


@settings(max_examples=30, deadline=None)
@given(
    b=_batch,
    dim=_dim,
    seed=_seed,
    variant=st.sampled_from(["infonce_l2", "hinge", "covariance"]),
    shift=st.floats(-100, 100),
)
def test_translation_invariance(b, dim, seed, variant, shift):
    z = _draw(b, dim, seed)
    offset = shift * torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1)).double()
    a, c = dispersive_loss(z + offset, variant=variant), dispersive_loss(z, variant=variant)
    torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(b=_batch, dim=st.integers(2, 16), seed=_seed, diag=st.booleans())
def test_cosine_per_sample_scale_invariance(b, dim, seed, diag):
    z = _draw(b, dim, seed)
    scale = torch.exp(3 * torch.randn(b, 1, generator=torch.Generator().manual_seed(seed + 2)))
    kw = dict(variant="infonce_cosine", include_diagonal=diag)
    torch.testing.assert_close(dispersive_loss(z * scale.double(), **kw), dispersive_loss(z, **kw))


@settings(max_examples=30, deadline=None)
@given(b=_batch, dim=_dim, seed=_seed, tau=st.floats(0.01, 10), spread=st.floats(1e-3, 1e3))
def test_infonce_l2_bounds_with_diagonal(b, dim, seed, tau, spread):
    z = (_draw(b, dim, seed) * spread).float()
    loss = float(dispersive_loss(z, tau=tau))
    assert -math.log(b) - 1e-6 <= loss <= 1e-6


@settings(max_examples=30, deadline=None)
@given(b=_batch, dim=_dim, seed=_seed, tau=st.floats(0.01, 10))
def test_collapse_gives_zero_and_far_apart_gives_floor(b, dim, seed, tau):
    row = _draw(1, dim, seed).float() * 50
    assert float(dispersive_loss(row.expand(b, dim), tau=tau)) == pytest.approx(0.0, abs=1e-6)
    far = 1e4 * torch.eye(b, max(b, dim))  # every pair at squared distance 2e8 / dim
    assert float(dispersive_loss(far, tau=tau)) == pytest.approx(-math.log(b), abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(3, 12), dim=st.integers(2, 16), seed=_seed)
def test_covariance_mean_lies_in_its_rank_bounds(b, dim, seed):
    # The eigenvalues of Cov sum to tr Cov and at most r = min(B - 1, dim) are non-zero, so
    # (tr Cov)^2 / r <= sum Cov_mn^2 <= (tr Cov)^2; tr Cov ~= dim (Cov_mm ~= 1).
    z = _draw(b, dim, seed)
    zc = _np(z) - _np(z).mean(0)
    var = (zc**2).sum(0) / (b - 1)
    tr = float((var / (var + COV_EPS * var.mean())).sum())
    loss = float(dispersive_loss(z, variant="covariance")) * dim**2
    r = min(b - 1, dim)
    assert tr**2 / r * (1 - 1e-9) <= loss <= tr**2 * (1 + 1e-9)


# --------------------------------------------------------------------------------------------
# Dtypes and autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_low_precision_input_is_computed_in_float32(dtype, variant):
    z = torch.randn(12, 4, 8, generator=torch.Generator().manual_seed(9)).to(dtype)
    z.requires_grad_(True)
    loss = dispersive_loss(z, variant=variant)
    assert loss.dtype == torch.float32
    assert_rel(loss, oracle(z.float(), variant))  # the upcast values, float64 formula
    loss.backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
    z32 = z.detach().float().requires_grad_(True)
    dispersive_loss(z32, variant=variant).backward()
    torch.testing.assert_close(
        z.grad.float(), z32.grad, rtol=1e-2, atol=1e-2 * z32.grad.abs().max()
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_does_not_lower_the_precision(variant):
    z = torch.randn(10, 24, generator=torch.Generator().manual_seed(10))
    ref = dispersive_loss(z, variant=variant)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dispersive_loss(z, variant=variant)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_float64_input_is_computed_in_float64():
    z = torch.randn(4, 5, dtype=torch.float64)
    assert dispersive_loss(z).dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Module, scope, bad input
# --------------------------------------------------------------------------------------------


def test_module_equals_function():
    z = torch.randn(6, 3, 4)
    m = DispersiveLoss(variant="hinge", tau=0.3, margin=2.0, include_diagonal=False)
    assert list(m.parameters()) == []
    torch.testing.assert_close(
        m(z), dispersive_loss(z, variant="hinge", tau=0.3, margin=2.0, include_diagonal=False)
    )
    assert "hinge" in repr(m) and "include_diagonal=False" in repr(m)


def test_module_groups_are_the_mean_of_the_group_losses():
    # The paper's 16 samples per device whatever the batch: B = k g -> mean of k group losses.
    z, zp = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    m = DispersiveLoss(tau=0.3, group_size=4)
    groups = (slice(0, 4), slice(4, 8), slice(8, 12))
    torch.testing.assert_close(m(z), sum(dispersive_loss(z[g], tau=0.3) for g in groups) / 3)
    want = sum(contrastive_loss(z[g], zp[g], tau=0.3) for g in groups) / 3
    torch.testing.assert_close(m.contrastive(z, zp), want)
    assert torch.equal(DispersiveLoss(group_size=12)(z), dispersive_loss(z))  # one group
    assert "group_size=4" in repr(m)
    with pytest.raises(ValueError, match="groups of 5"):
        DispersiveLoss(group_size=5)(z)
    for bad in (dict(group_size=1), dict(group_size=4, scope="global")):
        with pytest.raises(ValueError, match="group_size"):
            DispersiveLoss(**bad)


@pytest.mark.parametrize("normalize_by_dim", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grouped_covariance_is_the_mean_of_float64_group_oracles(dtype, normalize_by_dim):
    # The covariance variant's groups run in one fused node (its own backward); against the
    # definition written out in float64 per group (standardise each feature over the group,
    # ||Zn^T Zn||_F^2 / (g - 1)^2, the D x D covariance itself), differentiated by autograd.
    k, g, dim = 4, 16, 49 * 3
    gen = torch.Generator().manual_seed(6)
    z = 2.0 + torch.randn(k * g, 7, 21, generator=gen, dtype=torch.float64)
    z[5:8, 0, :4] = z[4, 0, :4]  # near-constant features in group 0
    zd = z.clone().requires_grad_(True)
    want = 0
    for zk in zd.reshape(k, g, dim):
        zc = zk - zk.mean(0)
        var = zc.square().sum(0) / (g - 1)
        zn = zc / torch.sqrt(var + 1e-5 * var.mean())
        cov = zn.T @ zn / (g - 1)
        want = want + cov.square().sum() / (dim**2 if normalize_by_dim else 1) / k
    want.backward()
    zt = z.to(dtype).requires_grad_(True)
    got = DispersiveLoss(variant="covariance", group_size=g, normalize_by_dim=normalize_by_dim)(zt)
    got.backward()
    assert type(got.grad_fn).__name__ == "_GroupedCovarianceBackward"  # one node, all groups
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert zt.grad.dtype == dtype
    # float64: rounding only; float32 / bf16 (computed in float32 from the rounded input): the
    # input's own rounding, amplified by the near-constant features' small variance.
    rtol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert abs(float(got.detach()) - float(want.detach())) <= rtol * float(want.detach())
    err = (zt.grad.double() - zd.grad).abs().max() / zd.grad.abs().max()
    assert err <= rtol, float(err)
    # Ungrouped (one group of all 64): the same node, also through dispersive_loss.
    one = dispersive_loss(z, variant="covariance", normalize_by_dim=normalize_by_dim)
    torch.testing.assert_close(
        DispersiveLoss(variant="covariance", normalize_by_dim=normalize_by_dim)(z), one
    )


def test_grouped_covariance_gradcheck_and_groups_apart():
    z = torch.randn(3 * 5, 6, dtype=torch.float64, requires_grad=True)
    m = DispersiveLoss(variant="covariance", group_size=5)
    assert torch.autograd.gradcheck(m, (z,))
    # Groups are independent: moving one group's samples leaves the others' gradient alone.
    m(z).backward()
    before = z.grad.clone()
    z2 = z.detach().clone()
    z2[:5] *= 3.0
    z2.requires_grad_(True)
    m(z2).backward()
    torch.testing.assert_close(z2.grad[5:], before[5:], rtol=1e-12, atol=0)
    assert not torch.allclose(z2.grad[:5], before[:5])


def test_global_scope_without_process_group_is_local():
    assert not torch.distributed.is_initialized()
    z = torch.randn(6, 10)
    for v in VARIANTS:
        torch.testing.assert_close(
            dispersive_loss(z, variant=v, scope="global"), dispersive_loss(z, variant=v)
        )


def test_batch_of_one_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"at least two samples per device \(got B=1\)") as e:
        dispersive_loss(torch.randn(1, 8))
    assert "constant" in str(e.value) and "batch size" in str(e.value)
    with pytest.raises(ValueError, match="at least two samples"):
        DispersiveLoss()(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="at least two samples"):
        dispersion_stats(torch.randn(1, 8))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_named(bad, variant, chunked, monkeypatch):
    # Detected through the non-finite loss (no separate pass over z): must hold for every
    # variant and both Gram paths.
    if chunked:
        monkeypatch.setattr(losses, "_SMALL_ELEMS", 0)
    z = torch.randn(4, 6)
    z[2, 3] = bad
    with pytest.raises(ValueError, match=r"non-finite values.*sample 2"):
        dispersive_loss(z, variant=variant)
    with pytest.raises(ValueError, match=r"z_pos contains non-finite"):
        contrastive_loss(torch.randn(4, 6), z, variant=variant)
    with pytest.raises(ValueError, match=r"z contains non-finite"):
        contrastive_loss(z, torch.randn(4, 6), variant=variant)


def test_wrong_rank_input_says_the_expected_shape():
    with pytest.raises(ValueError, match=r"shape \(B, \.\.\.\).*1-D tensor of shape \(8,\)"):
        dispersive_loss(torch.randn(8))
    with pytest.raises(ValueError, match=r"0-D"):
        dispersive_loss(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        dispersive_loss(torch.ones(4, 3, dtype=torch.long))


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown .*variant 'infonce'.*infonce_l2.*covariance"):
        dispersive_loss(torch.randn(4, 3), variant="infonce")
    with pytest.raises(ValueError, match=r"unknown .*variant.*hinge"):
        DispersiveLoss(variant="l2")
    with pytest.raises(ValueError, match=r"unknown scope 'world'.*local.*global"):
        dispersive_loss(torch.randn(4, 3), scope="world")
    with pytest.raises(ValueError, match="tau must be"):
        dispersive_loss(torch.randn(4, 3), tau=0.0)
    with pytest.raises(ValueError, match="margin must be"):
        dispersive_loss(torch.randn(4, 3), variant="hinge", margin=-1.0)


# --------------------------------------------------------------------------------------------
# Contrastive counterparts
# --------------------------------------------------------------------------------------------


def oracle_contrastive(z, zp, variant, *, tau, margin, include_diagonal, w):
    a, p = _np(z), _np(zp)
    b, dim = a.shape
    if variant == "covariance":
        cross = oracle_standardize(a).T @ oracle_standardize(p) / (b - 1)  # D x D
        on = np.diag(cross)
        off = (cross**2).sum() - (on**2).sum()
        return float(((1 - on) ** 2).sum() + w * off) / dim**2
    if variant == "infonce_cosine":
        pos = -np.array(
            [a[i] @ p[i] / np.linalg.norm(a[i]) / np.linalg.norm(p[i]) for i in range(b)]
        )
    else:
        pos = np.array([((a[i] - p[i]) ** 2).sum() / dim for i in range(b)])
    pos_term = (pos**2).mean() if variant == "hinge" else pos.mean() / tau
    disp = oracle(z, variant, tau=tau, margin=margin, include_diagonal=include_diagonal)
    return float(pos_term + disp)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("include_diagonal", [True, False])
def test_contrastive_matches_oracle(variant, include_diagonal):
    g = torch.Generator().manual_seed(11)
    z = torch.randn(7, 2, 5, generator=g)
    zp = z + 0.3 * torch.randn(7, 2, 5, generator=g)
    kw = dict(tau=0.4, margin=2.0, include_diagonal=include_diagonal)
    got = contrastive_loss(z, zp, variant=variant, off_diagonal_weight=0.3, **kw)
    assert_rel(got, oracle_contrastive(z, zp, variant, w=0.3, **kw))


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cosine", "hinge"])
def test_contrastive_is_dispersive_plus_positive_term(variant):
    g = torch.Generator().manual_seed(12)
    z = torch.randn(6, 9, dtype=torch.float64, generator=g)
    zp = torch.randn(6, 9, dtype=torch.float64, generator=g)
    kw = dict(variant=variant, tau=0.7, margin=2.0)
    gap = contrastive_loss(z, zp, **kw) - dispersive_loss(z, **kw)
    # With z_pos = z the positive term is its minimum: 0 (l2, hinge) or -1 / tau (cosine).
    same = contrastive_loss(z, z, **kw) - dispersive_loss(z, **kw)
    assert float(same) == pytest.approx(-1 / 0.7 if variant == "infonce_cosine" else 0.0)
    assert float(gap) > float(same)


def test_contrastive_covariance_with_identical_views_is_dispersive_plus_diagonal_term():
    z = torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    zn = torch.from_numpy(oracle_standardize(_np(z)))
    cov_mm = zn.square().sum(0) / 7
    for w in (1.0, 0.25):
        got = contrastive_loss(z, z, variant="covariance", off_diagonal_weight=w)
        expected = w * dispersive_loss(z, variant="covariance") + (
            ((1 - cov_mm) ** 2 - w * cov_mm**2).sum() / 12**2
        )
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_contrastive_gradcheck(variant):
    g = torch.Generator().manual_seed(14)
    z = torch.randn(5, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    zp = torch.randn(5, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    fn = lambda a, b: contrastive_loss(a, b, variant=variant, margin=3.0, off_diagonal_weight=0.5)
    assert torch.autograd.gradcheck(fn, (z, zp))


def test_contrastive_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(torch.randn(4, 6), torch.randn(4, 5))


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def test_dispersion_stats_against_oracle():
    g = torch.Generator().manual_seed(15)
    z = torch.randn(10, 3, 8, generator=g) * torch.linspace(0.1, 2, 10).view(10, 1, 1)
    z.requires_grad_(True)
    tau = 0.2
    stats = dispersion_stats(z, tau=tau)
    assert set(stats) == {"loss", "floor_gap", "mean_dist", "min_dist", "active_frac", "rep_norm"}
    assert all(isinstance(v, float) for v in stats.values())
    zd = _np(z)
    d = oracle_dissimilarity(zd, "infonce_l2", True)
    off = d[~np.eye(10, dtype=bool)]
    assert_rel(stats["loss"], oracle_reduce(d, "infonce_l2", tau, 1.0, True))
    assert_rel(stats["floor_gap"], stats["loss"] + math.log(10))
    assert_rel(stats["mean_dist"], off.mean())
    assert_rel(stats["min_dist"], off.min())
    assert stats["active_frac"] == pytest.approx((np.exp(-off / tau) > 1e-3).mean())
    assert 0 < stats["active_frac"] < 1  # the data was chosen to have both kinds of pairs
    assert_rel(stats["rep_norm"], np.linalg.norm(zd, axis=1).mean())
    assert z.grad is None
    # The distance half alone (what a training step logs beside its own loss): the same values.
    distances = losses.distance_stats(z, tau=tau)
    assert distances == {k: stats[k] for k in ("mean_dist", "min_dist", "active_frac", "rep_norm")}


def test_dispersion_stats_without_dim_normalisation():
    z = torch.randn(5, 7)
    stats = dispersion_stats(z, normalize_by_dim=False, tau=100.0)
    d = oracle_dissimilarity(_np(z), "infonce_l2", False)
    assert_rel(stats["mean_dist"], d[~np.eye(5, dtype=bool)].mean())
    assert_rel(stats["loss"], float(dispersive_loss(z, tau=100.0, normalize_by_dim=False)))
