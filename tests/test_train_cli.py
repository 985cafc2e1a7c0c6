"""``dispersive train`` end to end: a real subprocess (train, kill -9, resume) and bad inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dispersive.cli import main
from dispersive.train.checkpoint import list_checkpoints
from dispersive.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
SMALL = [
    'model.name="SiT-XS/4"',
    "model.overrides={depth=2, hidden_size=32, num_heads=2}",
    'data.name="synthetic"',
    "train.global_batch=8",
    'train.device="cpu"',
    "dispersive.weight=0.5",
    'dispersive.layers=["blocks.0"]',
]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # shared test machine: no OpenMP oversubscription
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DISPERSIVE_DEBUG"):
        env.pop(var, None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dispersive", "train", *args]


def test_cli_train_kill9_resume(tmp_path):
    # Train far past what we wait for, with a checkpoint every 2 steps.
    run_dir = tmp_path / "tiny"
    sets = [*SMALL, "train.steps=100000", "train.ckpt_every=2", "train.keep_last=3"]
    sets += ["train.log_every=1"]
    proc = subprocess.Popen(
        _cli(str(TINY), "--outdir", str(tmp_path), "--no-progress", "--set", *sets),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(run_dir)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert (run_dir / "config.toml").is_file()
    assert (run_dir / "train.lock").is_file()  # left by the killed run: must not block the resume

    # Everything named ckpt-*.pt is complete and loads with weights_only=True.
    ckpts = list_checkpoints(run_dir)
    for step, path in ckpts:
        state = torch.load(path, weights_only=True)
        assert state["step"] == step and state["model"] and state["optimizer"]
    last = ckpts[-1][0]
    logged = max(r["step"] for r in read_metrics(run_dir))
    assert logged - last <= 2  # at most one checkpoint interval lost

    # Resume with a --set override of the saved config: it finishes at the new step count.
    out = subprocess.run(
        _cli("--resume", str(run_dir), "--no-progress", "--set", f"train.steps={last + 3}"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"from ckpt-{last:07d}.pt" in out.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, last + 4))
    assert list_checkpoints(run_dir)[-1][0] == last + 3
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert (run_dir / "done.json").is_file()

    # A bad input in a real process: one line on stderr, exit status 2, no traceback.
    bad = subprocess.run(
        _cli("--resume", str(tmp_path / "missing")), env=_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: --resume")


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path, capsys):
    rc = main(["train", str(TINY), "--dry-run", "--outdir", str(tmp_path), "--set", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[dispersive]" in out and 'layers = [\n    "blocks.0",\n]' in out
    assert str(tmp_path / "tiny") in out
    assert list(tmp_path.iterdir()) == []


# Configs the training loop refused only after its process group was up; the one preflight
# (shared by --dry-run, the experiment runner and the loop) now refuses them before any work.
LOOP_CHECKS = {
    "inception proxy": (["eval.every=10", 'eval.features="inception"'], "eval.every = 10"),
    "ddpm contrastive": (
        [
            'model.name="DiT-XS/4"',
            'objective.kind="ddpm"',
            'sample.sampler="ddpm"',
            'objective.two_view="restricted"',
            "dispersive.contrastive=true",
        ],
        "dispersive.contrastive = true is implemented for objective.kind = 'flow'",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(LOOP_CHECKS))
def test_dry_run_refuses_what_the_loop_refuses(case, tmp_path, capsys):
    sets, expected = LOOP_CHECKS[case]
    argv = [str(TINY), "--outdir", str(tmp_path), "--set", *SMALL, *sets]
    assert main(["train", *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
def test_the_train_command_validates_once(dry_run, tmp_path, capsys, monkeypatch):
    # One preflight per entry point: not in load_config and again in the loop.
    import dispersive.train.config as config_module

    calls = []
    validate = config_module.validate
    monkeypatch.setattr(
        config_module, "validate", lambda *a, **k: calls.append(k) or validate(*a, **k)
    )
    argv = ["train", str(TINY), "--outdir", str(tmp_path), "--no-progress"]
    argv += ["--set", *SMALL, "train.steps=2", "train.ckpt_every=2"]
    assert main([*argv, "--dry-run"] if dry_run else argv) == 0, capsys.readouterr().err
    assert len(calls) == 1 and calls[0]["model"] is not None, calls
    assert (tmp_path / "tiny" / "done.json").exists() != dry_run


def _bad_config(tmp_path: Path) -> str:
    p = tmp_path / "bad.toml"
    p.write_text(f'extends = "{TINY.as_posix()}"\n[train]\nstpes = 3\n')
    return str(p)


BAD_INPUTS = {
    "unknown config key": (lambda tmp: [_bad_config(tmp)], "unknown key 'train.stpes'"),
    "wrong type": (lambda tmp: [str(TINY), "--set", 'train.steps="six"'], "train.steps must be"),
    "missing data files": (
        lambda tmp: [
            str(TINY),
            "--outdir",
            str(tmp),
            "--set",
            *SMALL,
            'data.name="fashion-mnist"',
            f'data.path="{tmp / "nowhere"}"',
            "model.input_size=28",
            "model.num_classes=10",
        ],  # fmt: skip
        "nowhere",
    ),
    "unknown layer name": (
        lambda tmp: [str(TINY), "--set", *SMALL, 'dispersive.layers=["blocks.9"]'],
        "dispersive.layers",
    ),
    "batch of 1 per device": (
        lambda tmp: [str(TINY), "--set", *SMALL, "train.global_batch=1"],
        "at least 2 samples",
    ),
    "batch not divisible": (
        lambda tmp: [str(TINY), "--set", *SMALL, "train.global_batch=8"],
        "does not divide by the world size 3",
    ),
    "missing resume dir": (lambda tmp: ["--resume", str(tmp / "gone")], "no such run directory"),
    "config and resume": (lambda tmp: [str(TINY), "--resume", str(tmp)], "not both"),
    "no config": (lambda tmp: [], "needs a CONFIG"),
    "config after --set": (lambda tmp: ["--set", "train.steps=3", str(TINY)], "CONFIG before"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_errors(case, tmp_path, capsys, monkeypatch):
    make_args, expected = BAD_INPUTS[case]
    monkeypatch.delenv("DISPERSIVE_DEBUG", raising=False)
    if case == "batch not divisible":
        monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun would set it
        monkeypatch.setenv("RANK", "0")
    rc = main(["train", *make_args(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    ckpt_dir = tmp_path / "tiny" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "ckpt-0000002.pt").write_bytes(b"")
    rc = main(["train", str(TINY), "--outdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "already holds a run" in err
