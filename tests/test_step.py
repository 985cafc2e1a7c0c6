"""The dispersive term of a training step (train/step.py) and the grouped loss it uses.

The Fashion-MNIST preset evaluates InfoNCE-l2 on 4 groups of 16 every step; the groups run in
one autograd node (losses._GroupedInfoNCEFromPdist) whose value and gradient must be those of
one dispersive_loss per group bit for bit (same pdist kernels, same elementwise operations in
the same order), and a diverged step must still give a NaN term (the loop then skips it).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dispersive.losses import DispersiveLoss, NonFiniteInputError, _group_mean, dispersive_loss
from dispersive.train.step import DispersiveTerm


def _per_group(m: DispersiveLoss, z: torch.Tensor) -> torch.Tensor:
    """The reference: one dispersive_loss per group, averaged (the path before fusing)."""
    return _group_mean(lambda g: dispersive_loss(g, **m._options()), m.group_size, z)


@pytest.mark.parametrize("diag", [True, False])
@pytest.mark.parametrize("normalize_by_dim", [True, False])
@pytest.mark.parametrize(
    ("b", "g", "shape", "dtype"),
    [
        (64, 16, (49, 64), torch.float32),  # the Fashion-MNIST preset: SiT-XS/4 blocks.0
        (48, 8, (3136,), torch.float32),
        (24, 8, (7, 7, 8), torch.float64),
        (32, 16, (49, 64), torch.bfloat16),
    ],
)
def test_grouped_path_is_the_per_group_mean_bit_for_bit(b, g, shape, dtype, diag,
                                                       normalize_by_dim):  # fmt: skip
    torch.manual_seed(0)
    m = DispersiveLoss(tau=0.5, group_size=g, include_diagonal=diag,
                       normalize_by_dim=normalize_by_dim)  # fmt: skip
    z0 = (3 * torch.randn(b, *shape) + 1).to(dtype)
    za, zb = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    la, lb = m(za), _per_group(m, zb)
    assert type(la.grad_fn).__name__ == "_GroupedInfoNCEFromPdistBackward"  # the fused path ran
    (0.7 * la).backward()
    (0.7 * lb).backward()
    assert torch.equal(la, lb)
    assert torch.equal(za.grad, zb.grad)


@pytest.mark.parametrize("diag", [True, False])
def test_grouped_path_keeps_bit_equality_where_groups_take_the_laplacian(diag, monkeypatch):
    # Groups of 8 x 16,384 (28 pairs x 16,384 >= losses._LAPLACIAN_MIN_WORK): each group's
    # backward is one matmul with its Laplacian, except the group holding a near-duplicate
    # pair, which keeps pdist's backward; the fused node must choose per group as the
    # reference does.
    import dispersive.losses as losses

    seen = []
    real = losses._pdist_laplacian
    monkeypatch.setattr(
        losses, "_pdist_laplacian", lambda *a: seen.append(real(*a) is not None) or real(*a)
    )
    torch.manual_seed(3)
    z0 = torch.randn(24, 16_384) + 0.5
    z0[9] = z0[8] + 1e-4  # a near pair in the second group
    m = DispersiveLoss(tau=0.5, group_size=8, include_diagonal=diag)
    za, zb = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    la = m(za)
    assert seen == [True, False, True]  # the fused node's choice, per group
    lb = _per_group(m, zb)
    assert seen[3:] == [True, False, True]  # the reference's
    (0.7 * la).backward()
    (0.7 * lb).backward()
    assert torch.equal(la, lb)
    assert torch.equal(za.grad, zb.grad)


def test_grouped_gradient_matches_a_float64_oracle():
    torch.manual_seed(5)
    z0 = 2 + torch.randn(64, 49, 64)
    m = DispersiveLoss(tau=0.5, group_size=16)
    za, z64 = z0.clone().requires_grad_(), z0.double().requires_grad_()
    m(za).backward()
    ref = torch.stack([
        torch.logsumexp(-torch.cdist(zg, zg).square().flatten() / 3136 / 0.5, 0)
        for zg in z64.reshape(64, -1).split(16)
    ]).mean()  # fmt: skip
    ref.backward()
    err = (za.grad.double() - z64.grad).abs().max() / z64.grad.abs().max()
    assert err < 1e-5


def test_grouped_path_under_bf16_autocast_and_on_a_non_contiguous_batch():
    torch.manual_seed(1)
    m = DispersiveLoss(tau=0.5, group_size=8)
    z0 = torch.randn(40, 32).t()  # (32, 40), not contiguous
    za, zb = z0.clone().t().t().requires_grad_(), z0.detach().clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        la, lb = m(za), _per_group(m, zb)
    la.backward()
    lb.backward()
    assert la.dtype == torch.float32
    assert torch.equal(la, lb)
    assert torch.equal(za.grad, zb.grad)


def test_grouped_path_matches_a_float64_oracle():
    """Independent of the implementation: the paper's formula per group, in float64."""
    torch.manual_seed(2)
    z = torch.randn(32, 200)
    m = DispersiveLoss(tau=0.5, group_size=16)
    ref = torch.stack([
        torch.logsumexp(-torch.cdist(zg, zg).square().flatten() / 200 / 0.5, 0) - math.log(256)
        for zg in z.double().split(16)
    ]).mean()  # fmt: skip
    assert m(z).item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_grouped_path_names_non_finite_input(bad):
    z = torch.randn(32, 10)
    z[20, 3] = bad
    with pytest.raises(NonFiniteInputError, match="non-finite values"):
        DispersiveLoss(group_size=16)(z)


def _disp_cfg(**kw):
    base = dict(weight=0.5, layers=["blocks.0"], contrastive=False, tau=0.5, margin=1.0,
                normalize_by_dim=True, scope="local", variant="infonce_l2",
                include_diagonal=True)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge", "infonce_cosine", "covariance"])
def test_term_is_nan_on_diverged_activations_and_finite_otherwise(variant):
    term = DispersiveTerm(_disp_cfg(variant=variant), 16)
    z = torch.randn(32, 7, 5, requires_grad=True)
    assert math.isfinite(term({"blocks.0": z}).item())
    bad = z.detach().clone()
    bad[3, 1, 2] = math.inf
    bad[5, 0, 0] = math.nan
    out = term({"blocks.0": bad.requires_grad_()})
    assert math.isnan(out.item())
    out.backward()  # still a graph: every rank runs the same backward


def test_term_statistics_are_the_same_with_and_without_the_term():
    """The baseline (weight 0) recomputes the loss for its log through the same grouped path."""
    torch.manual_seed(3)
    z = torch.randn(64, 49, 64)
    on, off = DispersiveTerm(_disp_cfg(), 16), DispersiveTerm(_disp_cfg(weight=0.0), 16)
    assert off({"blocks.0": z}) is None
    s_on = on.statistics({"blocks.0": z}, on({"blocks.0": z}))
    s_off = off.statistics({"blocks.0": z}, None)
    assert s_on.keys() == s_off.keys()
    for k in s_on:
        assert float(s_on[k]) == float(s_off[k]), k
    assert 0 <= float(s_on["floor_gap"]) <= math.log(16)


def test_the_study_preset_groups_keep_pdists_backward(monkeypatch):
    # Groups of 16 x 3,136 (the Fashion-MNIST preset) have more pair-columns than the
    # Laplacian's threshold, but batches above 8 keep pdist's backward: the kept study runs
    # are reproduced bit for bit by this code.
    import dispersive.losses as losses

    called = []
    monkeypatch.setattr(losses, "_pdist_laplacian", lambda *a: called.append(a) or None)
    z = torch.randn(64, 49, 64, requires_grad=True)
    DispersiveLoss(tau=0.5, group_size=16)(z).backward()
    dispersive_loss(z[:16]).backward()
    assert 120 * 3136 >= losses._LAPLACIAN_MIN_WORK and not called
    z8 = torch.randn(8, 16_384, requires_grad=True)
    dispersive_loss(z8).backward()
    assert len(called) == 1  # while a batch of 8 that size takes it
