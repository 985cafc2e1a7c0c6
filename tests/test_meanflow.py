"""The MeanFlow model's time embedding: the official (unscaled) one, the MeanFlow target it gives,
and checkpoints written when the model embedded 1000 t and 1000 h."""

from __future__ import annotations

import pytest
import torch

from dispersive.models import build
from dispersive.models.meanflow import LEGACY_TIME_SCALE
from dispersive.objectives import meanflow_target

F64 = torch.float64
ARCH = dict(input_size=8, in_channels=2, num_classes=3, depth=2, attn="math")


def _model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build("MF-XS/4", **{**ARCH, **kw}).double()
    # adaLN-Zero starts as a constant function of (t, h); random gates and output make the
    # network depend on the time embedding, so the checks below can fail.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0.0, 0.05)
    return model.eval()


def _batch(seed: int = 1, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 2, 8, 8, generator=g, dtype=F64)
    t = 0.2 + 0.8 * torch.rand(b, generator=g, dtype=F64)
    h = t * torch.rand(b, generator=g, dtype=F64)
    v = torch.randn(b, 2, 8, 8, generator=g, dtype=F64)
    return x, t, h, v, torch.tensor([0, 2, 3])


def test_default_embeds_raw_t_and_h_as_the_official_networks():
    official = _model()
    assert official.time_scale_value == 1.0 and float(official.time_scale) == 1.0
    assert [e.scale for e in official.t_embedders] == [1.0, 1.0]
    scaled = _model(time_scale=1000.0)
    scaled.load_state_dict({**official.state_dict(), "time_scale": torch.tensor(1000.0)})
    x, t, h, _, y = _batch()
    with torch.no_grad():
        # The official model at (t, h) is the 1000-scaled one at (t / 1000, h / 1000).
        torch.testing.assert_close(official(x, t, h, y), scaled(x, t / 1000, h / 1000, y))
        assert not torch.allclose(official(x, t, h, y), scaled(x, t, h, y))


def test_the_target_is_the_chain_rule_of_the_embedding():
    # A network defined through its embedding, N(z, tau, eta) = the unscaled model: the model
    # with time scale s is u(z, t, h) = N(z, s t, s h). The jvp differentiates the input t, so
    # its target equals the one of the function t -> N(z, s t, s h) computed from N directly,
    # and the time part of du/dt is s times N's derivative in its embedded times.
    s = LEGACY_TIME_SCALE
    net = _model()
    scaled = _model(time_scale=s)
    scaled.load_state_dict({**net.state_dict(), "time_scale": torch.tensor(s)})
    x, t, h, v, y = _batch()
    with torch.no_grad():
        u, tgt = meanflow_target(scaled, x, t, h, v, y=y)
        u_ref, tgt_ref = meanflow_target(
            lambda z, t_, h_, y_: net(z, s * t_, s * h_, y_), x, t, h, v, y=y
        )
        torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tgt, tgt_ref, rtol=1e-10, atol=1e-10)
        # The time part of du/dt (tangents dz = 0, dt = dh = 1): s times N's at (s t, s h).
        one = torch.ones_like(t)
        _, dudt_scaled = torch.func.jvp(lambda t_, h_: scaled(x, t_, h_, y), (t, h), (one, one))
        _, dndt = torch.func.jvp(lambda t_, h_: net(x, t_, h_, y), (s * t, s * h), (one, one))
        torch.testing.assert_close(dudt_scaled, s * dndt, rtol=1e-9, atol=1e-9)
        _, dz_only = torch.func.jvp(lambda z: scaled(z, t, h, y), (x,), (v,))
        torch.testing.assert_close(tgt, v - h[:, None, None, None] * (dz_only + dudt_scaled))
        assert float(dudt_scaled.abs().max()) > 0


def test_old_state_dicts_load_with_the_old_scale_and_are_recorded():
    old = _model(time_scale=LEGACY_TIME_SCALE)
    sd = old.state_dict()
    del sd["time_scale"]  # a checkpoint from before the scale was saved
    model = _model(seed=5)  # built with today's default
    model.load_state_dict(sd)
    assert model.time_scale_value == LEGACY_TIME_SCALE == float(model.time_scale)
    assert model.config["overrides"]["time_scale"] == LEGACY_TIME_SCALE
    x, t, h, _, y = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, h, y), old(x, t, h, y), rtol=0, atol=0)
    # Saved again, the scale is in the weights and in the config: both rebuild the same model.
    again = build(**model.config).double()
    assert again.time_scale_value == LEGACY_TIME_SCALE
    fresh = _model(seed=6)
    fresh.load_state_dict(model.state_dict())
    assert fresh.time_scale_value == LEGACY_TIME_SCALE
    # And a new state dict sets the new scale on a model built with the old one.
    new = _model(seed=7)
    old.load_state_dict(new.state_dict())
    assert old.time_scale_value == 1.0
    with torch.no_grad():
        torch.testing.assert_close(old(x, t, h, y), new(x, t, h, y), rtol=0, atol=0)


def test_checkpoints_without_the_scale_load_as_before(tmp_path):
    from dispersive.train.checkpoint import load_model, save_checkpoint
    from dispersive.train.ema import EMA

    old = _model(time_scale=LEGACY_TIME_SCALE).float()
    ema = EMA(old, 0.9)
    state = ema.state_dict()
    assert "time_scale" in state["shadow"]  # the EMA copy carries it too
    weights = {k: v for k, v in old.state_dict().items() if k != "time_scale"}
    state["shadow"] = {k: v for k, v in state["shadow"].items() if k != "time_scale"}
    config = {"name": "MF-XS/4", **{k: ARCH[k] for k in ("input_size", "in_channels")}}
    config |= {"num_classes": ARCH["num_classes"], "overrides": {"depth": 2, "attn": "math"}}
    save_checkpoint(
        {"step": 3, "model": weights, "ema": state, "config": {}, "model_config": config},
        tmp_path / "ckpt-0000003.pt",
    )
    for use_ema in (True, False):
        model, _, step = load_model(tmp_path / "ckpt-0000003.pt", ema=use_ema)
        assert step == 3 and model.time_scale_value == LEGACY_TIME_SCALE
        x = torch.randn(2, 2, 8, 8)
        t = torch.tensor([0.3, 0.9])
        y = torch.tensor([1, 3])
        with torch.no_grad():
            out = model(x, t, t / 2, y)
            torch.testing.assert_close(out, old(x, t, t / 2, y), rtol=0, atol=0)
            # ... which is not what the same weights give at today's default scale.
            model._set_time_scale(1.0)
            assert not torch.allclose(model(x, t, t / 2, y), out)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "1"])
def test_bad_time_scale_is_refused(bad):
    with pytest.raises(ValueError, match="time_scale must be a positive"):
        build("MF-XS/4", **ARCH, time_scale=bad)
