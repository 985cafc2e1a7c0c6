"""Checkpoints: atomic writes, weights_only loading, RNG round trips, load_model; and the EMA."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from dispersive.errors import UserError
from dispersive.train import checkpoint as ck
from dispersive.train.ema import EMA, unwrap_model

TINY_MODEL = dict(name="SiT-XS/4", input_size=8, in_channels=1, num_classes=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(step: int) -> dict:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "step": step,
        "model": model.state_dict(),
        "ema": {"shadow": model.state_dict(), "decay": 0.9, "warmup": False, "num_updates": 1},
        "optimizer": opt.state_dict(),
        "rng": ck.capture_rng_state({"noise": torch.Generator().manual_seed(3)}),
        "data_state": {"epoch": 1, "position": 16},
        "config": {"train": {"steps": 10, "betas": [0.9, 0.95]}, "model": {"overrides": {}}},
    }


def test_save_is_loadable_with_weights_only_and_round_trips(tmp_path):
    state = _state(7)
    path = ck.save_checkpoint(state, ck.checkpoint_path(tmp_path, 7))
    assert path.name == "ckpt-0000007.pt"
    raw = torch.load(path, weights_only=True)  # no pickled classes anywhere
    assert raw["step"] == 7 and raw["data_state"] == state["data_state"]
    assert raw["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(raw["model"][k], v)
    # The optimizer state restores into a fresh optimizer.
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(raw["optimizer"])
    assert int(opt.state_dict()["state"][0]["step"]) == 1
    assert ck.load_checkpoint(tmp_path)["step"] == 7  # a run dir resolves to its latest


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = ck.checkpoint_path(tmp_path, 3)
    ck.save_checkpoint(_state(3), path)
    before = path.read_bytes()

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(_state(3), path)
    assert path.read_bytes() == before  # the old file was never touched
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_list_latest_prune_ignore_temporaries(tmp_path):
    for step in (2, 10, 4, 6):
        ck.save_checkpoint({"step": step, "model": {}}, ck.checkpoint_path(tmp_path, step))
    d = tmp_path / ck.CKPT_DIRNAME
    (d / ".ckpt-0000099.pt.123.tmp").write_bytes(b"torn")  # a write killed mid-way
    (d / "notes.txt").write_text("x")
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 4, 6, 10]
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-0000010.pt"
    removed = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["ckpt-0000002.pt", "ckpt-0000004.pt"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [6, 10]
    assert [p.name for p in ck.remove_stale_temporaries(tmp_path)] == [".ckpt-0000099.pt.123.tmp"]
    assert sorted(p.name for p in d.iterdir()) == [
        "ckpt-0000006.pt",
        "ckpt-0000010.pt",
        "notes.txt",
    ]


def test_rng_state_round_trip_through_a_file(tmp_path):
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    path = ck.save_checkpoint(
        {"step": 0, "model": {}, "rng": ck.capture_rng_state({"noise": g})}, tmp_path / "c.pt"
    )

    def draw():
        return (torch.rand(3), np.random.randn(3), random.random(), torch.rand(3, generator=g))

    first = draw()
    torch.manual_seed(99), np.random.seed(99), random.seed(99), g.manual_seed(99)
    ck.restore_rng_state(torch.load(path, weights_only=True)["rng"], {"noise": g})
    second = draw()
    assert torch.equal(first[0], second[0]) and torch.equal(first[3], second[3])
    assert np.array_equal(first[1], second[1]) and first[2] == second[2]
    with pytest.raises(UserError, match="'data' random generator"):
        ck.restore_rng_state(ck.capture_rng_state({}), {"data": g})


def test_load_model_rebuilds_raw_and_ema_weights(tmp_path):
    from dispersive.models import build

    torch.manual_seed(0)
    model = build(**TINY_MODEL)
    ema_model = build(**TINY_MODEL)
    with torch.no_grad():
        for p in ema_model.parameters():
            p.add_(1.0)  # make EMA and raw weights distinguishable
    state = {
        "step": 5,
        "model": model.state_dict(),
        "ema": {"shadow": ema_model.state_dict(), "decay": 0.9, "warmup": False, "num_updates": 5},
        "config": {"model": {**TINY_MODEL, "overrides": {}}},
        "model_config": dict(model.config),
    }
    ck.save_checkpoint(state, ck.checkpoint_path(tmp_path, 5))
    loaded, cfg, step = ck.load_model(tmp_path)
    assert step == 5 and cfg["model"]["name"] == "SiT-XS/4"
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for (n, a), b in zip(loaded.state_dict().items(), ema_model.state_dict().values()):
        assert torch.equal(a, b), n
    raw, _, _ = ck.load_model(ck.checkpoint_path(tmp_path, 5), ema=False)
    for a, b in zip(raw.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_unreadable_or_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path)
    bad = ck.checkpoint_path(tmp_path, 1)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ck.load_checkpoint(bad)


# ----------------------------------------------------------------------------------------------
# EMA


def test_ema_matches_float64_oracle_with_and_without_warmup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    for warmup in (False, True):
        ema = EMA(model, decay=0.9, warmup=warmup)
        oracle = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        for n_upd in range(6):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
                model[1].running_mean.add_(1.0)
            ema.update(model, n_upd)
            d = min(0.9, (1 + n_upd) / (10 + n_upd)) if warmup else 0.9
            for n, p in model.named_parameters():
                oracle[n] = d * oracle[n] + (1 - d) * p.detach().double()
        for n, p in ema.model.named_parameters():
            torch.testing.assert_close(p.double(), oracle[n], rtol=1e-6, atol=1e-6)
            assert not p.requires_grad
        # Buffers are copied, not averaged.
        assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    assert EMA(model, 0.9999, warmup=True).current_decay(0) == pytest.approx(0.1)


def test_ema_state_dict_round_trip_and_unwrap():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    assert torch.equal(other.model.weight, ema.model.weight)

    class Compiled(nn.Module):  # what torch.compile's OptimizedModule looks like
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert unwrap_model(Compiled(model)) is model
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
