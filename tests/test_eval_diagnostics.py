"""Block-norm diagnostics (paper Fig. 3) against a model whose block outputs are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dispersive.eval.diagnostics import block_norms, norms_table, plot_norms


class Scaled(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, h):
        return self.c * h


class ToyFlow(nn.Module):
    """blocks.0 outputs 2 x_t, blocks.1 outputs 6 x_t (flattened): norms known in closed form."""

    kind = "flow"
    num_classes = 0

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Scaled(2.0), Scaled(3.0)])
        self.block_names = ["blocks.0", "blocks.1"]
        self.seen_t = []

    def forward(self, x, t, y):
        self.seen_t.append(t.clone())
        h = x.flatten(1)
        for b in self.blocks:
            h = b(h)
        return h.view_as(x)


def test_block_norms_match_closed_form():
    model = ToyFlow()
    x0 = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = (0.0, 0.3, 1.0)
    norms = block_norms(model, x0, None, ts=ts, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).double()
    for t in ts:
        x_t = (1 - t) * x0 + t * noise  # linear path: t = 0 data, t = 1 noise
        base = x_t.flatten(1).norm(dim=1).mean().item()
        assert norms[t]["blocks.0"] == pytest.approx(2 * base, rel=1e-6)
        assert norms[t]["blocks.1"] == pytest.approx(6 * base, rel=1e-6)
    assert [float(t[0]) for t in model.seen_t] == list(ts)
    table = norms_table(norms, highlight=["blocks.1"])
    assert table.splitlines()[0] == "| block | t=0 | t=0.3 | t=1 |"
    assert "| blocks.1 * |" in table


def test_block_norms_on_a_real_model_restore_mode_and_reject_bad_t(tmp_path):
    from dispersive.models import build

    model = build(
        "SiT-XS/4", input_size=8, in_channels=1, num_classes=4, depth=2, hidden_size=32, num_heads=2
    )
    model.train()
    x0 = torch.randn(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    norms = block_norms(model, x0, y, ts=[0.5], generator=torch.Generator().manual_seed(0))
    assert list(norms[0.5]) == model.block_names and model.training
    plot_norms(norms, tmp_path / "n.png")
    assert (tmp_path / "n.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        block_norms(model, x0, y, ts=[1.5])


@pytest.mark.parametrize("name", ["DiT-XS/4", "MF-XS/4"])
def test_block_norms_runs_for_every_model_kind(name):
    from dispersive.models import build

    model = build(
        name, input_size=8, in_channels=1, num_classes=4, depth=2, hidden_size=32, num_heads=2
    )
    norms = block_norms(
        model,
        torch.randn(2, 1, 8, 8),
        None,
        ts=[0.1, 0.9],
        generator=torch.Generator().manual_seed(0),
    )
    assert set(norms) == {0.1, 0.9}
    assert all(v > 0 and v == v for per in norms.values() for v in per.values())
