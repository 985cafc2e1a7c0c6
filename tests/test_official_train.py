"""``model.init``: fine-tuning from an official checkpoint (or one of this package) in the loop.

The official-layout weights come from ``test_official.official_state`` (published key names and
shapes, random values); the loop runs the tiny config on synthetic 8x8x1 data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dispersive.errors import UserError
from dispersive.train.checkpoint import latest_checkpoint, load_checkpoint, load_model
from dispersive.train.config import load_config
from dispersive.train.loop import train
from test_official import official_state, oracle

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
BASE = [
    "model.overrides={depth=2, hidden_size=32, num_heads=2}",  # SiT-XS/4 at 8x8: 4 tokens
    "train.global_batch=8",
    "train.ckpt_every=3",
    "train.keep_last=5",
]
CONVENTIONS = {"pos_embed": "wh", "learn_sigma": True, "time_scale": 1.0, "time_origin": "noise"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _official(tmp_path: Path, seed: int = 0, **kw) -> Path:
    # SiT-XS/4 at 8x8x1 with 4 classes: hidden 32, depth 2, a 2x2 token grid.
    sd = official_state(hidden=32, depth=2, patch=4, channels=1, classes=4, grid=2, seed=seed, **kw)
    path = tmp_path / f"official-{seed}.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": None}, path)
    return path


def _run(tmp_path: Path, name: str, *extra: str, resume: bool = False) -> Path:
    run_dir = tmp_path / name
    train(load_config(TINY, [*BASE, *extra]), run_dir=run_dir, resume=resume, progress=False)
    return run_dir


def test_training_starts_from_the_official_weights_and_records_the_conventions(tmp_path):
    init = _official(tmp_path)
    run = _run(tmp_path, "ft", f'model.init="{init}"', "train.steps=1", "optim.lr=1e-12")
    ckpt = load_checkpoint(run)
    assert ckpt["model_config"]["overrides"] == {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 2,
        **CONVENTIONS,
    }
    # One step at lr 1e-12 leaves the official weights (up to 1e-11).
    sd = official_state(hidden=32, depth=2, patch=4, channels=1, classes=4, grid=2)
    for k, v in ckpt["model"].items():
        official = sd[k.replace("t_embedders.0.", "t_embedder.")]
        assert (v - official).abs().max() < 1e-9, k
    # The sample / diagnose path rebuilds the official network from the run's checkpoint.
    model, _, step = load_model(run)
    assert step == 1
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0, 3, 4])
    t_sit = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        v = model(x, (1 - t_sit).float(), y)
    ref = oracle(sd, x, t_sit, y, heads=2, sit=True)
    assert ((v.double() + ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_resume_of_a_fine_tuning_run_is_exact_without_the_init_file(tmp_path):
    init = _official(tmp_path, seed=1)
    full = _run(tmp_path, "full", f'model.init="{init}"', "train.steps=6")
    _run(tmp_path, "part", f'model.init="{init}"', "train.steps=3")
    init.unlink()  # the resumed run rebuilds from its own checkpoint's model_config
    part = _run(tmp_path, "part", f'model.init="{init}"', "train.steps=6", resume=True)
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a["model_config"] == b["model_config"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_init_from_a_run_of_this_package_takes_its_ema_and_conventions(tmp_path):
    init = _official(tmp_path, seed=2)
    first = _run(tmp_path, "first", f'model.init="{init}"', "train.steps=3")
    ema = load_checkpoint(first)["ema"]["shadow"]
    second = _run(tmp_path, "second", f'model.init="{first}"', "train.steps=1", "optim.lr=1e-12")
    ckpt = load_checkpoint(second)
    assert all(
        CONVENTIONS[k] == v
        for k, v in ckpt["model_config"]["overrides"].items()
        if k in CONVENTIONS
    )
    for k, v in ckpt["model"].items():
        assert (v - ema[k]).abs().max() < 1e-9, k


def test_bad_init_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="model.init = .* does not exist"):
        _run(tmp_path, "nope", f'model.init="{tmp_path / "nope.pt"}"')
    with pytest.raises(UserError, match="not a sha256"):
        load_config(TINY, [*BASE, f'model.init="{tmp_path}"', 'model.init_sha256="abc"'])
    with pytest.raises(UserError, match="init_weights"):
        load_config(TINY, [*BASE, 'model.init_weights="last"'])
    big = tmp_path / "big.pt"
    torch.save(official_state(hidden=64, depth=2, patch=4, channels=1, classes=4, grid=2), big)
    with pytest.raises(UserError, match=r"^model.init: the checkpoint is of another size") as e:
        _run(tmp_path, "big", f'model.init="{big}"', "train.steps=1")
    assert "\n" not in str(e.value)
    init = _official(tmp_path, seed=3)
    with pytest.raises(UserError, match="has sha256 .* expected 0+"):
        _run(tmp_path, "sum", f'model.init="{init}"', f'model.init_sha256="{"0" * 64}"')
    assert latest_checkpoint(tmp_path / "sum") is None


def test_sample_command_reads_an_official_checkpoint(tmp_path, capsys):
    import json

    import numpy as np

    from dispersive.cli import main

    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL  # the "latents" extra

    # SiT-XS/2 at 8x8x4 latents, 10 classes, and a tiny random VAE (no downsampling).
    path = tmp_path / "SiT-XS-2.pt"
    torch.save(official_state(hidden=64, depth=4, patch=2, channels=4, classes=10, grid=4), path)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    )
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "out"
    args = ["sample", "--ckpt", str(path), "--official", "SiT-XS/2", "--steps", "2"]
    args += ["--num", "4", "--grid", "0", "--device", "cpu", "--outdir", str(out)]
    assert main(args) == 2  # no --vae: a one-line error
    assert "give --vae" in capsys.readouterr().err
    assert main([*args, "--vae", str(tmp_path / "vae")]) == 0
    spec = json.loads((out / "spec.json").read_text())
    assert spec["official"] is True and spec["model"] == "SiT-XS/2" and spec["ema"] is True
    assert spec["vae"] == str(tmp_path / "vae") and spec["checkpoint_step"] is None
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 8, 8, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 1, 2, 3]
