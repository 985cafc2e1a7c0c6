"""The training loop in-process: exact resume, the baseline at weight 0, logs, NaN guard, kinds."""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from dispersive.errors import UserError
from dispersive.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from dispersive.train.config import config_to_dict, load_config
from dispersive.train.logging import read_metrics
from dispersive.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # gpu_check

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
# Small and fast whatever tiny.toml holds; every code path (dispersive on) still runs.
BASE = [
    'model.name="SiT-XS/4"',
    "model.overrides={depth=2, hidden_size=32, num_heads=2}",
    'data.name="synthetic"',
    "data.synthetic_size=64",
    "train.global_batch=8",
    "train.log_every=1",
    "train.ckpt_every=3",
    "train.keep_last=5",
    'train.device="cpu"',
    "dispersive.weight=0.5",
    'dispersive.layers=["blocks.0"]',
    "optim.lr=1e-3",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*extra: str):
    return load_config(TINY, [*BASE, *extra])


def _run(tmp_path: Path, name: str, *extra: str, resume: bool = False) -> Path:
    run_dir = tmp_path / name
    train(_cfg(*extra), run_dir=run_dir, resume=resume, progress=False)
    return run_dir


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("model",):
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), f"{key}.{n} differs"
    for n in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][n], b["ema"]["shadow"][n]), f"ema.{n} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"
    assert a["data_state"] == b["data_state"]
    assert torch.equal(a["rng"]["generators"]["noise"], b["rng"]["generators"]["noise"])


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = _run(tmp_path, "full", "train.steps=6", "optim.ema_warmup=true")
    part = _run(tmp_path, "part", "train.steps=3", "optim.ema_warmup=true")
    assert [s for s, _ in list_checkpoints(part)] == [3]
    _run(tmp_path, "part", "train.steps=6", "optim.ema_warmup=true", resume=True)

    m_full, m_part = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in m_part] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    for a, b in zip(m_full, m_part):
        for k in ("loss", "loss_diff", "loss_disp", "grad_norm", "rep_norm/blocks.1"):
            assert a[k] == b[k], (a["step"], k)
    _assert_same_state(load_checkpoint(full), load_checkpoint(part))
    assert json.loads((part / "done.json").read_text())["steps"] == 6
    # The resumed run's config.toml holds the overridden value.
    saved = tomllib.loads((part / "config.toml").read_text())
    assert saved["train"]["steps"] == 6


def test_weight_zero_is_the_baseline_whatever_layer_is_tapped(tmp_path):
    a = _run(
        tmp_path, "a", "train.steps=2", "dispersive.weight=0.0", 'dispersive.layers=["blocks.0"]'
    )
    b = _run(
        tmp_path, "b", "train.steps=2", "dispersive.weight=0.0", 'dispersive.layers=["blocks.1"]'
    )
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    for n in ca["model"]:
        assert torch.equal(ca["model"][n], cb["model"][n]), n
    for rec in read_metrics(a):
        assert rec["loss"] == rec["loss_diff"]  # no dispersive term in the loss
        # ... but its statistics are still measured, with the floor gap against log B.
        assert -math.log(8) - 1e-5 <= rec["loss_disp"] <= 1e-6
        assert rec["floor_gap"] == pytest.approx(rec["loss_disp"] + math.log(8), abs=1e-6)
    # With the term on, the loss is the weighted sum.
    c = _run(tmp_path, "c", "train.steps=1")
    rec = read_metrics(c)[0]
    assert rec["loss"] == pytest.approx(rec["loss_diff"] + 0.5 * rec["loss_disp"], rel=1e-6)


@pytest.mark.parametrize("variant", ["hinge", "covariance", "infonce_cosine"])
def test_floor_gap_is_infonce_l2s_whatever_the_trained_variant(tmp_path, variant):
    # Only InfoNCE-l2 (with the diagonal) has the floor -log B; the gap of the other variants'
    # own values to it means nothing, so every arm logs InfoNCE-l2's gap at its tau.
    run = _run(
        tmp_path, variant, "train.steps=2", "dispersive.group_size=4",
        f'dispersive.variant="{variant}"',
    )  # fmt: skip
    for r in read_metrics(run):
        assert 0.0 <= r["floor_gap"] <= math.log(4) + 1e-6, r
        if variant == "hinge":
            assert r["loss_disp"] >= 0.0  # the trained term is the hinge's own value


def test_run_directory_and_metrics(tmp_path):
    run = _run(
        tmp_path, "r", "train.steps=4", "optim.warmup_steps=4", "dispersive.group_size=4",
        "train.keep_last=1", "train.ckpt_every=2",
    )  # fmt: skip
    cfg = _cfg("train.steps=4", "optim.warmup_steps=4", "dispersive.group_size=4")
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["optim"] == config_to_dict(cfg)["optim"]
    assert [p.name for _, p in list_checkpoints(run)] == ["ckpt-0000004.pt"]  # keep_last=1
    assert any((run / "tb").iterdir())
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in ("loss_diff", "loss_disp", "floor_gap", "active_frac", "grad_norm",
                    "steps_per_s", "images_per_s", "data_wait_frac",
                    "rep_norm/blocks.0", "rep_norm/blocks.1"):  # fmt: skip
            assert key in r and math.isfinite(r[key]), key
        # Groups of 4 samples: the floor is -log 4, and the gap is measured against it.
        assert r["floor_gap"] == pytest.approx(r["loss_disp"] + math.log(4), abs=1e-6)
        assert r["lr"] == pytest.approx(1e-3 * r["step"] / 4)  # linear warm-up
        assert r["images_per_s"] == pytest.approx(8 * r["steps_per_s"])
        assert 0.0 <= r["active_frac"] <= 1.0 and 0.0 <= r["data_wait_frac"] < 1.0
    done = json.loads((run / "done.json").read_text())
    assert done["steps"] == 4 and done["final"]["step"] == 4


def _poison(monkeypatch, bad_calls):
    """Make the dataset return NaN images on the given get_batch calls (0-based)."""
    import dispersive.data.datasets as data
    from gpu_check import poisoned_build_dataset  # the GPU check poisons batches the same way

    monkeypatch.setattr(data, "build_dataset", poisoned_build_dataset(bad_calls))


def test_nonfinite_steps_are_skipped_then_training_stops(tmp_path, monkeypatch):
    _poison(monkeypatch, bad_calls={1})
    run = _run(tmp_path, "one", "train.steps=3", "train.max_nonfinite=2")
    records = read_metrics(run)
    assert [r["nonfinite_skipped"] for r in records] == [0, 1, 1]
    assert all(math.isfinite(p.float().sum()) for p in load_checkpoint(run)["model"].values())

    _poison(monkeypatch, bad_calls=set(range(100)))
    with pytest.raises(UserError, match="2 steps in a row had a non-finite loss"):
        _run(tmp_path, "all", "train.steps=5", "train.max_nonfinite=2")
    assert latest_checkpoint(tmp_path / "all") is None


def _fused_adamw(monkeypatch):
    """The loop's AdamW fused on the CPU too (the device-side guard's optimizer)."""
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, fused=None, **k: real(*a, fused=True, **k))


def test_device_side_guard_skips_exactly_like_the_host_side_one(tmp_path, monkeypatch, capsys):
    # The accelerator guard (train/guard.py) forced onto the CPU: no value read back per step,
    # the skip through fused AdamW's found_inf and a weight-0 EMA update. Against the host-side
    # skip with the same fused AdamW: the same model, EMA, optimizer state and counts, bit for bit.
    import dispersive.train.loop as loop

    _fused_adamw(monkeypatch)
    extra = ("train.steps=6", "train.max_nonfinite=3", "train.ckpt_every=6", "train.log_every=2")
    _poison(monkeypatch, bad_calls={1, 3, 4})
    host = _run(tmp_path, "host", *extra)
    monkeypatch.setattr(loop, "_DEFERRED", ("cpu",))
    _poison(monkeypatch, bad_calls={1, 3, 4})
    dev = _run(tmp_path, "device", *extra)
    a, b = load_checkpoint(host), load_checkpoint(dev)
    _assert_same_state(a, b)
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 3
    assert [r["nonfinite_skipped"] for r in read_metrics(dev)] == [1, 2, 3]
    assert [r["nonfinite_skipped"] for r in read_metrics(host)] == [1, 2, 3]
    log = capsys.readouterr().err
    assert "steps up to 2: 1 with a non-finite loss or gradient skipped (the last at step 1)" in log

    # Every step bad: stopped at the first settle after max_nonfinite in a row, nothing saved.
    _poison(monkeypatch, bad_calls=set(range(100)))
    with pytest.raises(UserError, match="3 steps in a row had a non-finite loss"):
        _run(tmp_path, "all", "train.steps=9", "train.max_nonfinite=3", "train.log_every=5")
    assert latest_checkpoint(tmp_path / "all") is None


@pytest.mark.parametrize(
    "extra",
    [
        ('model.name="DiT-XS/4"', 'objective.kind="ddpm"', 'sample.sampler="ddpm"'),
        (
            'model.name="MF-XS/4"', 'objective.kind="meanflow"', 'sample.sampler="meanflow"',
            'model.overrides={depth=2, hidden_size=32, num_heads=2, attn="math"}',
        ),
        ('objective.two_view="restricted"', "dispersive.contrastive=true"),
    ],
    ids=["ddpm", "meanflow", "contrastive"],
)  # fmt: skip
def test_other_objectives_train(tmp_path, extra):
    run = _run(tmp_path, "k", "train.steps=2", *extra)
    records = read_metrics(run)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    assert "loss_disp" in records[-1]
    assert json.loads((run / "done.json").read_text())["steps"] == 2


def test_proxy_fid_of_the_ema_model_is_logged_with_its_sampler_spec(tmp_path):
    run = _run(
        tmp_path, "fid", "train.steps=3", "model.input_size=28", 'model.overrides={depth=2, '
        'hidden_size=32, num_heads=2, patch_size=7}', "eval.every=2", "eval.num_samples=8",
        'sample.sampler="euler"', "sample.steps=2",
    )  # fmt: skip
    evals = [r for r in read_metrics(run) if "proxy_fid" in r]
    # Every eval.every steps, and at the last step so that the final number always exists.
    assert [r["step"] for r in evals] == [2, 3]
    assert math.isfinite(evals[0]["proxy_fid"]) and evals[0]["proxy_fid"] > 0
    assert 0 <= evals[0]["proxy_acc"] <= 1 and evals[0]["num_samples"] == 8
    assert "proxy" in evals[0]["proxy_fid_note"]
    assert evals[0]["sampler_spec"]["steps"] == 2
    with pytest.raises(UserError, match="eval.every = 1"):
        _run(tmp_path, "bad", "train.steps=1", "eval.every=1")  # 8x8 images: no proxy FID


def test_a_run_stopped_during_an_evaluation_measures_it_again_on_resume(tmp_path, monkeypatch):
    import dispersive.train.loop as loop

    calls = []

    def fake_proxy_fid(cfg, ema_model, step, device):
        calls.append(step)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the step-2 samples are drawn
        return {"step": step, "proxy_fid": 1.0}

    monkeypatch.setattr(loop, "_proxy_fid", fake_proxy_fid)
    extra = ("train.steps=4", "train.ckpt_every=1", "model.input_size=28", "eval.every=2",
             'model.overrides={depth=2, hidden_size=32, num_heads=2, patch_size=7}')  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "r", *extra)
    # The checkpoint of step 2 comes after its evaluation, so the run resumes before it.
    assert [s for s, _ in list_checkpoints(tmp_path / "r")][-1] == 1
    _run(tmp_path, "r", *extra, resume=True)
    assert calls == [2, 2, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "r") if "proxy_fid" in r] == [2, 4]


def test_grouped_loss_is_the_mean_over_consecutive_groups():
    from dispersive import losses
    from dispersive.train.loop import grouped_mean

    z, zp = torch.randn(12, 3, 5, dtype=torch.float64), torch.randn(12, 3, 5, dtype=torch.float64)
    got = grouped_mean(losses.contrastive_loss, 4, z, zp)
    want = sum(losses.contrastive_loss(z[i : i + 4], zp[i : i + 4]) for i in (0, 4, 8)) / 3
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        grouped_mean(losses.dispersive_loss, 12, z), losses.dispersive_loss(z)
    )


def test_contrastive_runs_use_the_loss_groups(tmp_path):
    sets = ('objective.two_view="restricted"', "dispersive.contrastive=true", "train.steps=1")
    whole = read_metrics(_run(tmp_path, "whole", *sets))[-1]["loss_disp"]
    grouped = read_metrics(_run(tmp_path, "grouped", *sets, "dispersive.group_size=4"))[-1]
    # Same weights, data and noise: only the grouping differs (the floor -log 4 vs -log 8).
    assert math.isfinite(grouped["loss_disp"]) and grouped["loss_disp"] != pytest.approx(whole)


def test_meanflow_objective_keys_reach_the_loss(tmp_path, monkeypatch):
    # objective.adaptive_eps and the guidance keys are passed to the MeanFlow loss as set.
    from dispersive import objectives

    seen = []
    real = objectives.meanflow_loss

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives, "meanflow_loss", spy)
    _run(
        tmp_path, "mf", "train.steps=1", 'model.name="MF-XS/4"', 'objective.kind="meanflow"',
        'sample.sampler="meanflow"', "objective.adaptive_eps=0.37", "objective.adaptive_p=0.75",
        "objective.cfg_omega=1.0", "objective.cfg_kappa=0.5", "objective.cfg_t_max=0.8",
        'model.overrides={depth=2, hidden_size=32, num_heads=2, attn="math"}',
    )  # fmt: skip
    assert seen and all(
        (kw["adaptive_eps"], kw["adaptive_p"], kw["cfg_omega"], kw["cfg_kappa"])
        == (0.37, 0.75, 1.0, 0.5)
        and tuple(kw["cfg_t_interval"]) == (0.0, 0.8)
        for kw in seen
    )
    assert _cfg().objective.adaptive_eps == 0.01  # the official default
    with pytest.raises(UserError, match="adaptive_eps"):
        _cfg("objective.adaptive_eps=0.0")
