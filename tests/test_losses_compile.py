"""torch.compile of the losses (issue 14): no graph break, eager values and gradients.

Graph breaks are counted with ``torch._dynamo.explain`` (the mechanism
``benchmarks/gpu_check.py`` uses too); the compiled functions run with ``fullgraph=True``
(a break would raise) on the ``aot_eager`` backend, which traces forward and backward like
inductor but needs no C++ compiler.
"""

from __future__ import annotations

import pytest
import torch

from dispersive import DispersiveLoss, FeatureTap, contrastive_loss, dispersive_loss
from dispersive.losses import VARIANTS, NonFiniteInputError

BACKEND = "aot_eager"
# (B, D) reaching each path: pdist (B <= 8; B <= 16 with D <= 4096), the one-matmul Gram
# path, and the column-chunked Gram path (B * D > 2^18).
SIZES = [(4, 64), (16, 300), (24, 100), (32, 9000)]


def graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


def compiled_matches_eager(fn, *zs: torch.Tensor) -> None:
    """fn compiled with fullgraph=True gives eager's value and gradients (up to rounding: the
    compiled backward scales the gradient of the loss by the incoming one afterwards)."""
    torch._dynamo.reset()
    cf = torch.compile(fn, fullgraph=True, backend=BACKEND)
    got = [z.detach().clone().requires_grad_(True) for z in zs]
    want = [z.detach().clone().requires_grad_(True) for z in zs]
    vc, ve = cf(*got), fn(*want)
    vc.backward()
    ve.backward()
    torch.testing.assert_close(vc, ve, rtol=1e-6, atol=1e-7)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-5, atol=1e-7 * float(w.grad.abs().max()))


def _batch(b: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(d, generator=g) + torch.randn(b, d, generator=g)
    z[1] = z[0] + 1e-4 * torch.randn(d, generator=g)  # a near-duplicate pair: its exact path
    return z


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("diag", [True, False])
def test_every_variant_compiles_without_graph_breaks_and_matches_eager(variant, diag):
    sizes = SIZES if variant == "infonce_l2" else [SIZES[0], SIZES[-1]]
    for b, d in sizes:
        z = _batch(b, d)
        margin = 2.0 * float((z[2] - z[3]).square().mean())  # pairs on both sides of it

        def fn(z, margin=margin):
            kw = dict(variant=variant, tau=0.3, margin=margin, include_diagonal=diag)
            return 0.5 * dispersive_loss(z, **kw)

        assert graph_breaks(fn, z) == 0, (variant, diag, b, d)
        compiled_matches_eager(fn, z)


def test_contrastive_and_grouped_module_compile_without_graph_breaks():
    z = _batch(32, 300)
    zp = z + 0.1 * torch.randn_like(z)
    for variant in VARIANTS:
        fn = lambda a, b, v=variant: contrastive_loss(a, b, variant=v, tau=0.5)  # noqa: E731
        assert graph_breaks(fn, z, zp) == 0, variant
        compiled_matches_eager(fn, z, zp)
    for module in (DispersiveLoss(group_size=16), DispersiveLoss(group_size=8, variant="hinge")):
        assert graph_breaks(module, z) == 0
        compiled_matches_eager(module, z)
        fn = lambda a, b, m=module: m.contrastive(a, b)  # noqa: E731
        assert graph_breaks(fn, z, zp) == 0
        compiled_matches_eager(fn, z, zp)


def test_compiled_loss_keeps_dtype_no_grad_and_the_non_finite_error():
    torch._dynamo.reset()
    cf = torch.compile(lambda z: dispersive_loss(z), fullgraph=True, backend=BACKEND)
    z = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    loss = cf(z)
    loss.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    with torch.no_grad():
        assert cf(z.detach()).item() == pytest.approx(loss.item())
    bad = torch.randn(16, 64)
    bad[3, 5] = float("nan")
    with pytest.raises(NonFiniteInputError, match="sample 3"):
        cf(bad)


def test_feature_tap_and_loss_in_one_compiled_graph():
    from dispersive.models import build

    torch.manual_seed(0)
    model = build("SiT-XS/4", input_size=8, in_channels=1, num_classes=10,
                  overrides={"depth": 2})  # fmt: skip
    tap = FeatureTap(model, "blocks.0")
    loss = DispersiveLoss(group_size=4)
    x, t, y = torch.randn(8, 1, 8, 8), torch.rand(8), torch.randint(0, 10, (8,))

    def step(x, t, y):
        return model(x, t, y).square().mean() + 0.5 * loss(tap.pop())

    assert graph_breaks(step, x, t, y) == 0
