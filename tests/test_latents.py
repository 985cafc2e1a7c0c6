"""Latent extraction with a tiny random AutoencoderKL: shards, resume, dataset, CLI errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import save_tiny_vae

pytest.importorskip("diffusers")

from dispersive.cli import main  # noqa: E402
from dispersive.data.datasets import build_dataset, load_image  # noqa: E402
from dispersive.data.latents import (  # noqa: E402
    SD_VAE_SCALE,
    LatentDataset,
    decode_latents,
    extract_latents,
    load_vae,
    load_vae_from_meta,
    read_meta,
)
from dispersive.errors import UserError  # noqa: E402
from dispersive.train.config import Config, apply_overrides  # noqa: E402

SIZE = 16  # pixels; the tiny VAE downsamples by 2 -> 8x8x4 latents


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), SIZE)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls, n in (("a", 6), ("b", 4)):
        (root / cls).mkdir()
        for i in range(n):
            arr = rng.integers(0, 256, (18, 21, 3), dtype=np.uint8)  # cropped to 16x16
            Image.fromarray(arr).save(root / cls / f"{i:02d}.png")
    return root


def extract(image_dir, out, vae_dir, **kw):
    args = dict(vae=str(vae_dir), image_size=SIZE, batch_size=3, shard_size=4, progress=False)
    return extract_latents(image_dir, out, **{**args, **kw})


def read_shards(out: Path) -> dict[str, np.ndarray]:
    out_arrays: dict[str, list] = {}
    for d in sorted(out.glob("shard-*")):
        for f in sorted(d.glob("*.npy")):
            out_arrays.setdefault(f.stem, []).append(np.load(f, allow_pickle=False))
    return {k: np.concatenate(v) for k, v in out_arrays.items()}


def test_extract_matches_direct_encoding(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    res = extract(image_dir, out, vae_dir)
    assert res == {"written": [0, 1, 2], "skipped": [], "num_shards": 3, "complete": True}
    meta = read_meta(out)
    assert meta["vae"] == str(vae_dir) and meta["scale"] == SD_VAE_SCALE
    assert meta["latent_shape"] == [4, SIZE // 2, SIZE // 2] and meta["complete"] is True
    assert meta["classes"] == ["a", "b"] and meta["num_images"] == 10
    assert not list(out.glob("*.tmp"))
    arrays = read_shards(out)
    assert arrays["labels"].tolist() == [0] * 6 + [1] * 4
    assert arrays["index"].tolist() == list(range(10))
    # Oracle: encode each image on its own (batching must not change the posterior).
    vae = load_vae(str(vae_dir))
    files = sorted(image_dir.glob("*/*.png"))
    x = torch.stack([torch.from_numpy(load_image(f, SIZE)).float() / 127.5 - 1 for f in files])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    np.testing.assert_allclose(arrays["mean"], dist.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arrays["std"], dist.std.numpy(), rtol=1e-4, atol=1e-5)
    assert np.all(arrays["std"] > 0)


def test_resume_skips_finished_shards_and_replaces_partial(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    extract(image_dir, out, vae_dir)
    before = read_shards(out)
    mtimes = {d.name: d.stat().st_mtime_ns for d in out.glob("shard-*")}
    again = extract(image_dir, out, vae_dir)
    assert again["written"] == [] and again["skipped"] == [0, 1, 2]
    assert {d.name: d.stat().st_mtime_ns for d in out.glob("shard-*")} == mtimes

    # Simulate a kill while shard 1 was being written: its final folder is absent and a
    # half-written temporary folder is left behind.
    shutil.rmtree(out / "shard-00001")
    partial = out / "shard-00001.tmp"
    partial.mkdir()
    (partial / "mean.npy").write_bytes(b"\x93NUMPY garbage")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(UserError, match="incomplete"):
        LatentDataset(out)
    res = extract(image_dir, out, vae_dir)
    assert res["written"] == [1] and res["skipped"] == [0, 2] and res["complete"]
    assert not partial.exists()
    after = read_shards(out)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    assert len(LatentDataset(out)) == 10


def test_partial_run_and_settings_mismatch(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    res = extract(image_dir, out, vae_dir, max_shards=1)
    assert res["written"] == [0] and not res["complete"] and not read_meta(out)["complete"]
    with pytest.raises(UserError, match="shard_size"):
        extract(image_dir, out, vae_dir, shard_size=5)
    assert extract(image_dir, out, vae_dir)["written"] == [1, 2]


def test_latent_dataset_samples_the_posterior(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    extract(image_dir, out, vae_dir, hflip=True)
    arrays = read_shards(out)
    ds = LatentDataset(out)
    assert ds.image_shape == (4, 8, 8) and ds.num_classes == 2 and len(ds) == 10
    idx = np.array([9, 0, 5, 4])
    z, y = ds.get_batch(idx, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expect = SD_VAE_SCALE * (
        torch.from_numpy(arrays["mean"][idx]) + torch.from_numpy(arrays["std"][idx]) * eps
    )
    torch.testing.assert_close(z, expect)
    assert y.tolist() == arrays["labels"][idx].tolist()

    # With hflip: the flip draws come first, then eps; flipped samples use the flipped latents.
    flipped = LatentDataset(out, hflip=True)
    g = torch.Generator().manual_seed(2)
    z2, _ = flipped.get_batch(idx, generator=g)
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(4, generator=g) < 0.5).numpy()
    eps = torch.randn(4, 4, 8, 8, generator=g)
    mean = np.where(mask[:, None, None, None], arrays["mean_flip"][idx], arrays["mean"][idx])
    std = np.where(mask[:, None, None, None], arrays["std_flip"][idx], arrays["std"][idx])
    torch.testing.assert_close(
        z2, SD_VAE_SCALE * (torch.from_numpy(mean) + torch.from_numpy(std) * eps)
    )

    # Through the config and build_dataset, with a shape check against the model.
    cfg = apply_overrides(
        Config(),
        [
            "data.name='latents'",
            f"data.path={str(out)!r}",
            "model.input_size=8",
            "model.in_channels=4",
            "model.num_classes=2",
        ],
    )
    assert len(build_dataset(cfg.data, model_cfg=cfg.model)) == 10
    bad = apply_overrides(cfg, ["model.in_channels=3"])
    with pytest.raises(UserError, match="model.in_channels = 4"):
        build_dataset(bad.data, model_cfg=bad.model)

    # Decoding inverts the scale: the VAE from meta.json decodes z / scale.
    vae, scale = load_vae_from_meta(out)
    imgs = decode_latents(vae, z[:2], scale=scale)
    assert imgs.shape == (2, 3, SIZE, SIZE) and imgs.abs().max() <= 1


def test_hflip_needs_flipped_latents(tmp_path, image_dir, vae_dir):
    out = tmp_path / "lat"
    extract(image_dir, out, vae_dir)
    with pytest.raises(UserError, match="--hflip"):
        LatentDataset(out, hflip=True)


def test_missing_latents_names_the_command(tmp_path):
    with pytest.raises(UserError, match="dispersive extract-latents"):
        LatentDataset(tmp_path)


def test_unknown_vae_id_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        load_vae("nobody/no-such-vae")
    msg = str(info.value)
    assert "huggingface-cli download nobody/no-such-vae" in msg and "\n" not in msg


def test_cli(tmp_path, image_dir, vae_dir, capsys):
    out = tmp_path / "lat"
    argv = ["extract-latents", str(image_dir), str(out), "--vae", str(vae_dir)]
    argv += ["--image-size", str(SIZE), "--shard-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    assert "2 shard(s) written" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 shard(s) written, 2 already done" in capsys.readouterr().out
    bad = ["extract-latents", str(image_dir), str(tmp_path / "x"), "--vae", str(tmp_path)]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "config.json" in err and "\n" not in err
