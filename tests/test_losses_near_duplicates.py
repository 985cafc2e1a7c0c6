"""Near-duplicate and duplicate samples: float32 value and gradient against float64 oracles.

The Gram form of the squared distance, n_i + n_j - 2 G_ij, rounds to ~eps * (n_i + n_j); for
near-duplicate pairs that is the whole distance, and its push-apart gradient was lost (issue 12,
item 3). The oracles here are written independently of the implementation: explicit pairwise
differences in float64 (the authors' pdist form), differentiated by autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dispersive import losses
from dispersive.losses import VARIANTS, contrastive_loss, dispersive_loss

RTOL = 1e-5  # the goal: within 1e-5 of float64, gradients relative to their largest entry
COV_EPS = 1e-5  # the documented relative variance floor of the covariance variant


def pdist_sq(z: torch.Tensor) -> torch.Tensor:
    """(B, B) squared l2 distances from explicit differences (float64 oracle)."""
    return (z[:, None, :] - z[None, :, :]).square().sum(-1)


def neg_cos(z: torch.Tensor) -> torch.Tensor:
    u = z / torch.linalg.vector_norm(z, dim=1, keepdim=True)
    d = -(u[:, None, :] * u[None, :, :]).sum(-1)
    return torch.where(torch.eye(z.shape[0], dtype=torch.bool), -1.0, d)


def standardize(z: torch.Tensor) -> torch.Tensor:
    zc = z - z.mean(0)
    var = zc.square().sum(0) / (z.shape[0] - 1)
    return zc / torch.sqrt(var + COV_EPS * var.mean())


def oracle(z, variant, tau, margin, diag, normalize_by_dim):
    b, dim = z.shape
    if variant == "covariance":
        zn = standardize(z)
        total = (zn.T @ zn / (b - 1)).square().sum()  # the D x D matrix (small D)
        return total / dim**2 if normalize_by_dim else total
    if variant == "infonce_cosine":
        d = neg_cos(z)
    else:
        d = pdist_sq(z) / (dim if normalize_by_dim else 1)
    mask = torch.ones(b, b, dtype=torch.bool) if diag else ~torch.eye(b, dtype=torch.bool)
    if variant == "hinge":
        return torch.relu(margin - d[mask]).square().mean()
    return torch.logsumexp(-d[mask] / tau, 0) - math.log(int(mask.sum()))


def oracle_contrastive(z, zp, variant, tau, margin, diag, normalize_by_dim, w):
    b, dim = z.shape
    if variant == "covariance":
        cross = standardize(z).T @ standardize(zp) / (b - 1)
        on = cross.diagonal()
        total = (1 - on).square().sum() + w * (cross.square().sum() - on.square().sum())
        return total / dim**2 if normalize_by_dim else total
    if variant == "infonce_cosine":
        pos = (
            -(z * zp).sum(1)
            / torch.linalg.vector_norm(z, dim=1)
            / torch.linalg.vector_norm(zp, dim=1)
        )
    else:
        pos = (z - zp).square().sum(1) / (dim if normalize_by_dim else 1)
    pos_term = pos.square().mean() if variant == "hinge" else pos.mean() / tau
    return pos_term + oracle(z, variant, tau, margin, diag, normalize_by_dim)


def assert_close_to_oracle(got, want, grads, want_grads, *, floor, value_atol=1e-6):
    """Value within RTOL relative (+ value_atol: lse - log N cancels near collapse), gradients
    within RTOL of their largest entry (+ ``floor``: the float64 oracle's own rounding, which
    is all there is when the true gradient is 0, e.g. every pair an exact duplicate)."""
    got, want = float(got.detach()), float(want.detach())
    assert math.isfinite(want)
    assert abs(got - want) <= RTOL * abs(want) + value_atol, (got, want)
    scale = max(float(x.abs().max()) for x in want_grads)
    for g, w in zip(grads, want_grads):
        err = float((g.double() - w).abs().max())
        assert err <= RTOL * scale + floor, (err, scale, err / max(scale, 1e-300))


def oracle_floor(tau: float, *zs: torch.Tensor) -> float:
    """1e-12 of the size of one pair's gradient term (|z| / tau for l2, 1 / (tau |z|) cosine);
    far below any error that matters, above float64 rounding. Also covers all-far batches
    whose float64 weights lie below float32's range (~1e-38)."""
    big = max(float(z.abs().max()) for z in zs)
    small = min(float(torch.linalg.vector_norm(z, dim=1).min()) for z in zs)
    return 1e-12 / tau * (big + 1 / max(small, 1e-30)) + 1e-30


def hinge_floor(margin: float, z: torch.Tensor) -> float:
    """A pair just inside the margin has gradient 4 (m - d) (z_i - z_j) / N_pairs, and float32
    knows m - d only to ~eps * m: when the active pairs all sit near the kink that is all of
    the gradient. Hinge gradients are judged against that rounding of m - d."""
    b = z.shape[0]
    return 1e-6 * 4 * margin * 2 * float(z.abs().max()) / (b * (b - 1))


def batch_with_duplicates(b, dim, seed, sigma, offset, dups):
    """float32 (B, dim): Gaussian rows (scale sigma around a common offset), then rows replaced
    by copies of others plus noise of relative size eps (0: exact duplicates)."""
    g = torch.Generator().manual_seed(seed)
    z = offset * torch.randn(dim, generator=g) + sigma * torch.randn(b, dim, generator=g)
    for k, eps in enumerate(dups):
        i, j = (2 * k) % b, (2 * k + 1) % b
        if i != j:
            z[j] = z[i] + eps * sigma * torch.randn(dim, generator=g)
    return z


_dups = st.lists(st.one_of(st.just(0.0), st.floats(1e-7, 1e-1)), min_size=1, max_size=4)
# What both properties draw alike: the batch's seed and duplicates, the variant, the diagonal.
_shared = {
    "seed": st.integers(0, 2**31 - 1),
    "dups": _dups,
    "variant": st.sampled_from(VARIANTS),
    "diag": st.booleans(),
}


@settings(max_examples=150, deadline=None)
@given(
    b=st.integers(2, 10),
    dim=st.integers(1, 40),
    log_sigma=st.floats(-2, 1.5),
    offset=st.sampled_from([0.0, 1.0, 30.0]),
    tau=st.sampled_from([0.05, 0.1, 0.5, 1.0, 2.0]),
    normalize_by_dim=st.booleans(),
    path=st.sampled_from(["auto", "gram", "chunked"]),
    **_shared,
)
def test_value_and_gradient_match_float64_with_duplicates(
    b, dim, seed, log_sigma, offset, dups, variant, tau, diag, normalize_by_dim, path
):
    sigma = 10.0**log_sigma
    z = batch_with_duplicates(b, dim, seed, sigma, offset * sigma, dups)
    # Margin at about the typical pair distance, so pairs on both sides of it.
    margin = 2 * sigma**2 * (1 if normalize_by_dim else dim) * (0.5 + seed % 3)
    kw = dict(tau=tau, margin=margin, include_diagonal=diag, normalize_by_dim=normalize_by_dim)
    z64 = z.double().requires_grad_(True)
    want = oracle(z64, variant, tau, margin, diag, normalize_by_dim)
    if not torch.isfinite(want):  # covariance with every feature constant (all rows equal)
        return
    # At dim 1 the cosine is +-1 for every pair: a constant whose true gradient is 0.
    assume(dim > 1 or variant != "infonce_cosine")
    if variant == "covariance":
        # No pair distances here. A constant (Cov_11 = 1 / (1 + eps)) at dim 1; with fewer
        # than 3 distinct rows the features are constant up to the duplicates' noise, whose
        # variance float32 cannot centre (a conditioning limit of any float32 standardisation).
        assume(dim > 1 and b - len(dups) >= 3)
    want.backward()
    z32 = z.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        if path != "auto":  # the Gram path (not pdist) for InfoNCE-l2 of small batches
            mp.setattr(losses, "_PDIST_MAX_B", 0)
        if path == "chunked":  # the column-chunked Gram path of large z, on this small z
            mp.setattr(losses, "_SMALL_ELEMS", 0)
            mp.setattr(losses, "_CHUNK_ELEMS", 3 * b)
        got = dispersive_loss(z32, variant=variant, **kw)
        got.backward()
    floor = oracle_floor(tau, z)
    if variant == "hinge":
        floor += hinge_floor(margin, z)
    if variant == "covariance":
        # Its gradient has no pair terms; when duplicates leave the centred batch rank 1
        # (B = 3, or two duplicate pairs at B = 4) the loss is stationary up to the 1e-5
        # variance floor and the true gradient is ~1e-2 of its natural scale, loss / std.
        # float32 rounding is then judged against that scale (the same before the fix).
        std = z.double().std(dim=0)
        floor += 1e-6 * abs(float(want.detach())) / float(std[std > 0].min())
    assert_close_to_oracle(got, want, [z32.grad], [z64.grad], floor=floor)


@settings(max_examples=80, deadline=None)
@given(
    b=st.integers(2, 8),
    dim=st.integers(1, 24),
    log_sigma=st.floats(-1, 1),
    log_view_gap=st.floats(-7, -1),
    tau=st.sampled_from([0.1, 0.5, 1.0]),
    **_shared,
)
def test_contrastive_matches_float64_with_nearly_equal_views(
    b, dim, seed, log_sigma, dups, log_view_gap, variant, tau, diag
):
    assume(dim > 1 or variant != "infonce_cosine")  # as above
    assume(variant != "covariance" or (dim > 1 and b - len(dups) >= 3))
    sigma = 10.0**log_sigma
    z = batch_with_duplicates(b, dim, seed, sigma, 0.5 * sigma, dups)
    g = torch.Generator().manual_seed(seed + 1)
    zp = z + 10.0**log_view_gap * sigma * torch.randn(b, dim, generator=g)  # nearly equal views
    kw = dict(tau=tau, margin=2 * sigma**2, include_diagonal=diag, normalize_by_dim=True)
    z64, p64 = z.double().requires_grad_(True), zp.double().requires_grad_(True)
    want = oracle_contrastive(z64, p64, variant, tau, 2 * sigma**2, diag, True, 0.3)
    if not torch.isfinite(want):
        return
    want.backward()
    z32, p32 = z.clone().requires_grad_(True), zp.clone().requires_grad_(True)
    got = contrastive_loss(z32, p32, variant=variant, off_diagonal_weight=0.3, **kw)
    got.backward()
    grads, want_grads = [z32.grad, p32.grad], [z64.grad, p64.grad]
    # The value is a sum of two terms (~1 / tau each for cosine) that can nearly cancel:
    # float32 rounds it to ~1e-7 of the terms, not of the sum.
    with torch.no_grad():
        disp = float(oracle(z64, variant, tau, 2 * sigma**2, diag, True))
    atol = 1e-6 * (1 + abs(disp) + abs(float(want.detach()) - disp))
    floor = oracle_floor(tau, z, zp)
    if variant == "hinge":  # its dispersive part, on z, as in the test above
        floor += hinge_floor(2 * sigma**2, z)
    assert_close_to_oracle(got, want, grads, want_grads, floor=floor, value_atol=atol)


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge"])
def test_isolated_near_duplicate_pair_in_a_spread_batch_keeps_its_gradient(variant):
    # The case: sigma 10, one pair 1e-3 apart (rms): every other pair is so far away
    # that its weight underflows, so the pair's push-apart gradient is the whole gradient. The
    # Gram form rounded its distance to <= 0 and returned exactly zero for both rows.
    g = torch.Generator().manual_seed(0)
    z = 10 * torch.randn(16, 3136, generator=g)
    z[1] = z[0] + 1e-3 * torch.randn(3136, generator=g)
    kw = dict(tau=1.0, margin=1.0, diag=True, normalize_by_dim=True)
    z64 = z.double().requires_grad_(True)
    oracle(z64, variant, **kw).backward()
    z32 = z.clone().requires_grad_(True)
    dispersive_loss(z32, variant=variant, tau=1.0, margin=1.0).backward()
    assert float(z32.grad[:2].abs().max()) > 0
    err = (z32.grad.double() - z64.grad).abs().max() / z64.grad.abs().max()
    assert float(err) <= RTOL
    # Push apart: the gradient step moves each row of the pair away from the other.
    assert float((z32.grad[0] * (z[0] - z[1])).sum()) < 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_duplicates_at_large_dim_chunked(variant):
    # Large dim takes the column-chunked path; duplicates and near-duplicates at 2.5e5 features.
    b, dim = 6, 250_000
    g = torch.Generator().manual_seed(1)
    z = torch.randn(b, dim, generator=g) + 2.0
    z[1] = z[0]
    z[3] = z[2] + 1e-4 * torch.randn(dim, generator=g)
    z64 = z.double().requires_grad_(True)
    # Pair loops instead of the B x B x D broadcast of the oracle above.
    sq = torch.stack(
        [torch.stack([(z64[i] - z64[j]).square().sum() for j in range(b)]) for i in range(b)]
    )
    unit = z64 / torch.linalg.vector_norm(z64, dim=1, keepdim=True)
    if variant == "infonce_l2":
        want = torch.logsumexp((-sq / dim / 0.5).reshape(-1), 0) - math.log(b * b)
    elif variant == "hinge":
        want = torch.relu(2.0 - sq / dim).square().mean()
    elif variant == "infonce_cosine":
        want = torch.logsumexp((unit @ unit.T / 0.5).reshape(-1), 0) - math.log(b * b)
    else:
        zn = standardize(z64)
        want = (zn @ zn.T).square().sum() / (b - 1) ** 2 / dim**2  # ||Zn^T Zn||_F = ||Zn Zn^T||_F
    want.backward()
    z32 = z.clone().requires_grad_(True)
    got = dispersive_loss(z32, variant=variant, tau=0.5, margin=2.0)
    got.backward()
    assert_close_to_oracle(got, want, [z32.grad], [z64.grad], floor=oracle_floor(0.5, z))


@pytest.mark.parametrize("case", ["spread", "near pair", "common offset"])
@pytest.mark.parametrize("diag", [True, False])
def test_pdist_laplacian_backward_at_its_size(case, diag, monkeypatch):
    # B = 8, D = 2^16: InfoNCE-l2's pdist path takes its backward from one matmul with the
    # pairs' Laplacian when every pair is far (d_ij^2 > 1/4 (|z_i|^2 + |z_j|^2)), and from
    # pdist's exact backward otherwise. Through the matmul the isolated near-duplicate pair
    # (every other weight underflows, so its push-apart term is the whole gradient) measured
    # 3e-4 off the oracle; a common offset 300x the spread makes every row long against the
    # distances, so it falls back too.
    b, dim = 8, 1 << 16
    g = torch.Generator().manual_seed(3)
    z = torch.randn(b, dim, generator=g)
    normalize_by_dim = case != "near pair"
    if case == "near pair":
        z = 10 * z
        z[5] = z[2] + 1e-3 * torch.randn(dim, generator=g)
    if case == "common offset":
        z += 300.0 * torch.randn(dim, generator=g)
    calls = []
    real = losses._pdist_laplacian
    monkeypatch.setattr(losses, "_pdist_laplacian", lambda *a: calls.append(real(*a)) or calls[-1])
    z64 = z.double().requires_grad_(True)
    sq = torch.nn.functional.pdist(z64).square()  # explicit differences in float64
    sq = sq / dim if normalize_by_dim else sq
    logits = torch.cat([-sq, -sq] + ([torch.zeros(b, dtype=sq.dtype)] if diag else []))
    want = torch.logsumexp(logits, 0) - math.log(logits.numel())
    want.backward()
    z32 = z.clone().requires_grad_(True)
    got = dispersive_loss(z32, tau=1.0, include_diagonal=diag, normalize_by_dim=normalize_by_dim)
    got.backward()
    assert len(calls) == 1 and (calls[0] is None) == (case != "spread")
    assert_close_to_oracle(got, want, [z32.grad], [z64.grad], floor=oracle_floor(1.0, z))


@settings(max_examples=120, deadline=None)
@given(
    b=st.integers(2, 10),
    dim=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    log_sigma=st.floats(-2, 1.5),
    offset=st.sampled_from([0.0, 0.3, 1.0, 30.0]),
    tau=st.sampled_from([0.05, 0.5, 2.0]),
    diag=st.booleans(),
)
def test_pdist_laplacian_backward_as_accurate_as_pdists(b, dim, seed, log_sigma, offset, tau, diag):
    # The same switch at small sizes (thresholds lowered): Gaussian batches around a common
    # offset, from all pairs far (Laplacian matmul) to rows long against their distances
    # (pdist's backward). Judged against pdist's own backward, not RTOL alone: spread batches
    # at a small tau put float32 logits in the thousands, whose rounding (~1e-4 of the softmax
    # weights) is the same for both backwards.
    sigma = 10.0**log_sigma
    z = batch_with_duplicates(b, dim, seed, sigma, offset * sigma, [])
    z64 = z.double().requires_grad_(True)
    oracle(z64, "infonce_l2", tau, 1.0, diag, True).backward()
    grads = []
    for lowered in (False, True):
        z32 = z.clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as mp:
            if lowered:
                mp.setattr(losses, "_LAPLACIAN_MIN_B", 2)
                mp.setattr(losses, "_LAPLACIAN_MIN_WORK", 0)
            dispersive_loss(z32, tau=tau, include_diagonal=diag).backward()
        grads.append(z32.grad.double())
    scale = float(z64.grad.abs().max())
    err_pdist, err_lap = (float((g - z64.grad).abs().max()) for g in grads)
    assert err_lap <= max(2 * err_pdist, RTOL * scale) + oracle_floor(tau, z)


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge"])
@pytest.mark.parametrize(
    ("offset", "uncentred"), [(0.0, True), (1.0, True), (3.6, True), (4.5, False), (30.0, False)]
)
def test_chunked_l2_backward_skips_centring_only_for_a_modest_mean(
    variant, offset, uncentred, monkeypatch
):
    # Large z, where the l2 backward may multiply the Laplacian by z instead of the centred z:
    # R = B |mu|^2 / trace(Gc) is about B / (B - 1) * offset^2 here, so 3.6 -> 13.8 (<= 16,
    # uncentred) and 4.5 -> 21.6 (centred). Either way float32 stays within RTOL of float64,
    # duplicates and a near-duplicate pair included.
    b, dim = 16, 20_000
    z = batch_with_duplicates(b, dim, 3, 1.0, offset, [0.0, 1e-4])
    seen = []
    real = losses._gram_backward
    monkeypatch.setattr(
        losses,
        "_gram_backward",
        lambda q, zz, mu, zc, dt: seen.append(mu is None) or real(q, zz, mu, zc, dt),
    )
    kw = dict(tau=0.5, margin=2.0, diag=True, normalize_by_dim=True)
    z64 = z.double().requires_grad_(True)
    want = oracle(z64, variant, **kw)
    want.backward()
    z32 = z.clone().requires_grad_(True)
    got = dispersive_loss(z32, variant=variant, tau=0.5, margin=2.0)
    got.backward()
    assert seen == [uncentred]
    assert_close_to_oracle(got, want, [z32.grad], [z64.grad], floor=oracle_floor(0.5, z))
