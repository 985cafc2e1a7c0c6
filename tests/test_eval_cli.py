"""`dispersive eval | sample | diagnose | train-classifier` end to end; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dispersive.cli import main
from dispersive.eval.features import INCEPTION_FILENAME, INCEPTION_SHA256
from dispersive.eval.io import save_image_folder, save_npz

ROOT = Path(__file__).resolve().parents[1]
DATA = "/usr/share/datasets/fashion-mnist"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DISPERSIVE_DEBUG"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def fmnist_npz(tmp_path_factory):
    try:
        from dispersive.data.datasets import load_fashion_mnist

        x, _ = load_fashion_mnist(DATA, train=False)
    except Exception as e:  # noqa: BLE001 - any failure means: no data on this machine
        pytest.skip(f"Fashion-MNIST unavailable: {e}")
    d = tmp_path_factory.mktemp("fm")
    save_npz(d / "test.npz", x[:1200, :, :, None])
    save_image_folder(d / "ref", x[1200:1600, :, :, None])
    return d


def test_inception_missing_and_corrupt_weights_are_one_line_errors(
    tmp_path, fmnist_npz, capsys, monkeypatch
):
    # In-process (a subprocess costs seconds of imports): main's return code is the exit
    # status, and any exception but the one-line errors would escape it with its traceback.
    monkeypatch.delenv("DISPERSIVE_DEBUG", raising=False)
    samples = str(fmnist_npz / "test.npz")
    weights = tmp_path / INCEPTION_FILENAME
    args = ["eval", "--samples", samples, "--ref", samples, "--features", "inception"]
    args += ["--inception-weights", str(weights)]
    for what in ("not found", "has sha256"):
        if what == "has sha256":
            weights.write_bytes(b"\0" * 4096)
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert INCEPTION_FILENAME in lines[0] and INCEPTION_SHA256 in lines[0] and what in lines[0]
        assert "Traceback" not in err


def test_eval_end_to_end_json_last_line(fmnist_npz, tmp_path, capsys):
    # In-process (a subprocess costs seconds of imports): images vs an image folder.
    stats = tmp_path / "s.npz"
    rc = main(
        [
            "eval",
            "--samples",
            str(fmnist_npz / "test.npz"),
            "--ref",
            str(fmnist_npz / "ref"),
            "--kid-subsets",
            "5",
            "--save-stats",
            str(stats),
        ]
    )
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    for key in ("fid", "is", "kid", "precision", "recall", "features", "library"):
        assert key in res, key
    # The metric registry names every number evaluate() reports (tables read it from there).
    from dispersive.eval.metrics import EVAL_KEYS, METRIC_INFO

    assert {k for k, v in res.items() if isinstance(v, float) and k in EVAL_KEYS} == set(EVAL_KEYS)
    assert set(EVAL_KEYS) <= set(METRIC_INFO) and METRIC_INFO["is"].higher_is_better
    assert res["num_samples"] == 1200 and res["num_ref"] == 400
    assert 0 <= res["precision"] <= 1 and 1 <= res["is"] <= 10
    # Against saved statistics: FID only (plus IS), the rest is reported as skipped.
    rc = main(["eval", "--samples", str(fmnist_npz / "test.npz"), "--ref", str(stats)])
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and abs(res2["fid"]) < 1e-6  # the same images
    assert "kid" not in res2 and "skipped" in res2
    # The default reference: the shipped training-set statistics.
    rc = main(["eval", "--samples", str(fmnist_npz / "test.npz"), "--metrics", "fid"])
    res3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and 0 < res3["fid"] < res["fid"] + 50


def test_eval_bad_inputs_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 28, 28, 1), np.float32))
    assert main(["eval", "--samples", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "uint8" in err[0]
    assert main(["eval", "--samples", str(tmp_path / "nope.npz")]) == 2
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# sample and diagnose on a tiny checkpoint
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from dispersive.models import build
    from dispersive.train.checkpoint import checkpoint_path, save_checkpoint
    from dispersive.train.config import config_to_dict, load_config

    cfg = load_config(
        ROOT / "configs" / "tiny.toml",
        ["model.overrides={depth=2, hidden_size=32, num_heads=2}", "sample.steps=2"],
    )
    conf = config_to_dict(cfg)
    m = conf["model"]
    torch.manual_seed(0)
    model = build(
        m["name"],
        input_size=m["input_size"],
        in_channels=m["in_channels"],
        num_classes=m["num_classes"],
        **m["overrides"],
    )
    run_dir = tmp_path_factory.mktemp("run")
    sd = model.state_dict()
    save_checkpoint(
        {
            "model": sd,
            "ema": {"shadow": sd, "decay": 0.99, "warmup": True, "num_updates": 3},
            "optimizer": {},
            "step": 3,
            "rng": {},
            "data_state": {},
            "config": conf,
        },
        checkpoint_path(run_dir, 3),
    )
    return run_dir


def test_sample_writes_npz_grid_and_spec(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    args = [
        "sample",
        "--ckpt",
        str(tiny_ckpt),
        "--num",
        "10",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--seed",
        "7",
        "--cfg-scale",
        "2",
        "--cfg-channels",
        "1",
        "--outdir",
        str(out),
    ]
    assert main(args) == 0
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(labels, np.arange(10) % 4)  # class-balanced
    spec = json.loads((out / "spec.json").read_text())
    for key in (
        "method",
        "steps",
        "nfe",
        "cfg_scale",
        "cfg_interval",
        "seed",
        "checkpoint_step",
        "model",
    ):
        assert key in spec, key
    assert spec["steps"] == 2 and spec["seed"] == 7 and spec["checkpoint_step"] == 3
    assert spec["cfg_scale"] == 2.0 and spec["cfg_channels"] == 1
    assert (out / "grid.png").is_file() and not (out / "shards").exists()
    # Same seed, different output folder: identical samples (chunk seeding is deterministic).
    assert main([*args[:-1], str(tmp_path / "t")]) == 0
    with np.load(tmp_path / "t" / "samples.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["arr_0"], arr)
    capsys.readouterr()


def test_sample_dopri5_options_and_the_nfe_of_every_chunk(tiny_ckpt, tmp_path, capsys):
    pytest.importorskip("torchdiffeq")
    out = tmp_path / "d"
    common = ["sample", "--ckpt", str(tiny_ckpt), "--num", "6", "--batch-size", "4"]
    rc = main([*common, "--sampler", "dopri5", "--option", "rtol=1e-2", "--outdir", str(out)])
    assert rc == 0
    spec = json.loads((out / "spec.json").read_text())
    assert spec["method"] == "dopri5" and spec["steps"] is None
    assert spec["options"] == {"atol": 1e-6, "rtol": 1e-2}
    # Two chunks (4 + 2 samples), each with its own counted NFE; 2 + 6 per attempted step.
    per_batch = spec["nfe_per_batch"]
    assert len(per_batch) == 2 and all((n - 2) % 6 == 0 and n >= 8 for n in per_batch)
    assert spec["nfe"] == pytest.approx(sum(per_batch) / 2)
    assert not (out / "shards").exists()
    capsys.readouterr()
    for bad, msg in (("rtol", "must be KEY=VALUE"), ("eta=0.5", "valid options: ['atol', 'rtol']")):
        rc = main([*common, "--sampler", "dopri5", "--option", bad, "--outdir", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0], err


def test_diagnose_table_plot_json(tiny_ckpt, tmp_path, capsys):
    for source in ("data", "samples"):
        out = tmp_path / source
        rc = main(
            [
                "diagnose",
                "--ckpt",
                str(tiny_ckpt),
                "--t",
                "0.2",
                "0.8",
                "--num",
                "6",
                "--source",
                source,
                "--outdir",
                str(out),
            ]
        )
        assert rc == 0
        text = capsys.readouterr().out
        assert "| block | t=0.2 | t=0.8 |" in text and "| blocks.1 * |" in text
        res = json.loads((out / "block_norms.json").read_text())
        assert set(res["norms"]) == {"0.2", "0.8"}
        assert list(res["norms"]["0.2"]) == ["blocks.0", "blocks.1"]
        assert all(v > 0 for v in res["norms"]["0.8"].values())
        assert (out / "block_norms.png").stat().st_size > 0
        assert ("synthetic" in res["source"]) == (source == "data")


def test_train_classifier_refuses_a_weak_network(tmp_path, fmnist_npz, capsys, monkeypatch):
    # 256 images, one epoch: far below 90% -> refused, nothing written. Judged on the first
    # 1,000 test images (predicting all 10,000 was most of the test's time).
    from dispersive.commands import train_classifier

    load_split = train_classifier.load_split

    def first_test_images(path, *, train):
        x, y = load_split(path, train=train)
        return (x, y) if train else (x[:1000], y[:1000])

    monkeypatch.setattr(train_classifier, "load_split", first_test_images)
    rc = main(["train-classifier", "--limit", "256", "--epochs", "1", "--outdir", str(tmp_path)])
    assert rc == 2
    assert "below --min-accuracy" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.distributed
def test_sample_output_does_not_depend_on_the_number_of_ranks(tiny_ckpt, tmp_path, capsys):
    common = ["--ckpt", str(tiny_ckpt), "--num-samples", "10", "--batch-size", "4"]
    assert main(["sample", *common, "--outdir", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "dispersive",
            "sample",
            *common,
            "--outdir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    spec = json.loads((tmp_path / "two" / "spec.json").read_text())
    assert spec["world_size"] == 2
    with (
        np.load(tmp_path / "one" / "samples.npz", allow_pickle=False) as a,
        np.load(tmp_path / "two" / "samples.npz", allow_pickle=False) as b,
    ):
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_sample_decodes_latent_runs_through_the_recorded_vae(tmp_path, capsys, monkeypatch):
    # A tiny randomly initialised VAE saved locally (no download), latents 4x8x8 -> RGB 8x8.
    diffusers = pytest.importorskip("diffusers")
    from dispersive.models import build
    from dispersive.train.checkpoint import checkpoint_path, save_checkpoint
    from dispersive.train.config import config_to_dict, load_config

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    vae.save_pretrained(tmp_path / "vae")
    lat = tmp_path / "latents"
    lat.mkdir()
    meta = {
        "format": "dispersive-latents",
        "version": 1,
        "vae": str(tmp_path / "vae"),
        "scale": 0.5,
        "complete": True,
    }
    (lat / "meta.json").write_text(json.dumps(meta))
    cfg = load_config(
        ROOT / "configs" / "tiny.toml",
        [
            "model.in_channels=4",
            "model.overrides={depth=1, hidden_size=32, num_heads=2}",
            'data.name="latents"',
            f'data.path="{lat}"',
            "sample.steps=1",
        ],
    )
    conf = config_to_dict(cfg)
    m = conf["model"]
    model = build(
        m["name"], input_size=8, in_channels=4, num_classes=m["num_classes"], **m["overrides"]
    )
    sd = model.state_dict()
    save_checkpoint(
        {"model": sd, "ema": {"shadow": sd}, "step": 1, "config": conf},
        checkpoint_path(tmp_path / "run", 1),
    )
    # Record what reaches the VAE: the model is adaLN-zero initialised (velocity 0), so its
    # samples are the N(0, 1) noise itself, and a third of the values lie outside [-1, 1].
    seen = []
    decode = diffusers.AutoencoderKL.decode

    def spy(self, z, *args, **kwargs):
        seen.append(z.detach().clone())
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "decode", spy)
    out = tmp_path / "s"
    assert (
        main(["sample", "--ckpt", str(tmp_path / "run"), "--num", "3", "--outdir", str(out)]) == 0
    )
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        assert z["arr_0"].shape == (3, 8, 8, 3) and z["arr_0"].dtype == np.uint8
    spec = json.loads((out / "spec.json").read_text())
    assert spec["vae"] == str(tmp_path / "vae")
    assert spec["space"] == "latent" and spec["decoded"] and spec["clamp"] == "pixels"
    # Latents are not clamped before decoding (the decoder gets z / scale, scale 0.5).
    assert len(seen) == 1 and float(seen[0].abs().max()) > 2.0
    capsys.readouterr()
