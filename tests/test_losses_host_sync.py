"""Off the CPU the losses read nothing back to the host for their finiteness checks (issue 14).

CUDA is not needed to test the logic: ``losses._host_checks`` is what decides, and reading a
tensor back (``item``, ``bool``, ``int``, ``float``, ``tolist``) is made to fail.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from dispersive import DispersiveLoss, contrastive_loss, dispersive_loss, losses


def _read(self, *args, **kwargs):
    raise AssertionError("a value was read back to the host (a sync on an accelerator)")


@contextlib.contextmanager
def as_on_an_accelerator():
    """Deferred checks, as off the CPU, and any read back to the host raises."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(losses, "_host_checks", lambda device: False)
        for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
            mp.setattr(torch.Tensor, name, _read)
        yield


CASES = [
    ("pdist", lambda z: dispersive_loss(z), (8, 64)),
    ("pdist-16", lambda z: dispersive_loss(z, include_diagonal=False), (16, 300)),
    ("grouped-pdist", DispersiveLoss(group_size=4), (16, 64)),
    ("covariance", lambda z: dispersive_loss(z, variant="covariance"), (32, 100)),
    ("contrastive-l2", lambda z: contrastive_loss(z, z.flip(0) + 1), (8, 64)),
    ("contrastive-cov", lambda z: contrastive_loss(z, z.flip(0), variant="covariance"), (32, 100)),
]


@pytest.mark.parametrize("name, fn, shape", CASES, ids=[c[0] for c in CASES])
def test_no_host_read_and_the_same_values(name, fn, shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    want = fn(za)
    want.backward()
    with as_on_an_accelerator():
        got = fn(zb)
        got.backward()
    assert torch.equal(got.detach(), want.detach()) and torch.equal(zb.grad, za.grad)


@pytest.mark.parametrize("name, fn, shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_gives_nan_instead_of_the_error(name, fn, shape, bad):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    z[2, 3] = bad
    z.requires_grad_(True)
    with as_on_an_accelerator():
        loss = fn(z)
        loss.backward()
    assert math.isnan(loss.item())
    assert not torch.isfinite(z.grad).all()
    with pytest.raises(losses.NonFiniteInputError):  # on the CPU: the error, as always
        fn(z)
