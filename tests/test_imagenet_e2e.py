"""The ImageNet path once, end to end, at micro scale on CPU (issue 12, item 8).

    image folder (JPEG + PNG, two classes)
      -> `dispersive extract-latents` with a tiny random diffusers AutoencoderKL (saved here),
         under torchrun on 2 nodes of 1 process (the ranks share the shards)
      -> `dispersive train` of the ImageNet preset (SiT + Dispersive Loss, scope "global",
         shrunk by --set) under torchrun: 2 processes on one node, and 2 nodes of 1 process
         each (`--nnodes 2 --node-rank {0,1}`, static rendezvous on 127.0.0.1)
      -> `dispersive sample` decoding the latents to pixels into an ADM-layout .npz
      -> `dispersive eval` against an ADM-layout reference batch of the same images.

Nothing is downloaded: the VAE has random weights, and the Inception network of `eval` is
replaced by a fixed random feature map (the real one is a 100 MB file); the rest of `eval`
(reading, statistics, Fréchet distance, IS, KID, precision/recall) runs as it does on ImageNet.

Oracles: the shards equal each image encoded on its own; the multi-node run must equal the
single-node run (same global batch, seed and rank slices, so the same numbers; a rank that
used LOCAL_RANK where RANK is meant would see another slice of the data and noise); the
samples must be the decoder's output for the latents the sampler produced (not clamped); the
FID must equal a float64 computation from the features.
A rank that hangs at exit (seen before train/distributed.py kept the process group referenced
until exit) fails the test after TIMEOUT instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import save_tiny_vae

pytest.importorskip("diffusers")

from dispersive.cli import main  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "imagenet256-sit-b2-disp.toml"
SIZE = 16  # pixels; the tiny VAE downsamples by 2 -> 4x8x8 latents
CLASSES = {"n01440764": 6, "n01443537": 6}  # ImageNet-style synset folder names
STEPS = 3
TIMEOUT = 200  # a rank that hangs at exit fails the test instead of the suite


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(var, None)
    env.pop("MASTER_PORT", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Images, the VAE and the extracted latents, shared by every test of the module."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet-e2e")
    rng = np.random.default_rng(0)
    for c, (synset, n) in enumerate(CLASSES.items()):
        (root / "train" / synset).mkdir(parents=True)
        for i in range(n):
            # Smooth colour ramps (JPEG-friendly), non-square sizes: the ADM centre crop runs.
            h, w = SIZE + 2 * i, SIZE + 3 + i
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            base = rng.uniform(0, 1, 3)
            img = 255 * np.clip(base + 0.5 * np.stack([yy, xx, (c - 0.5) * yy * xx], -1), 0, 1)
            ext = "JPEG" if i % 2 == 0 else "png"  # ImageNet files are .JPEG
            Image.fromarray(img.astype(np.uint8)).save(root / "train" / synset / f"{i}.{ext}")

    save_tiny_vae(root / "vae", SIZE)

    # Extraction on 2 node ranks: 3 shards of 4 images, dealt round-robin (0, 2 | 1).
    argv = ["-m", "dispersive", "extract-latents", str(root / "train"), str(root / "latents")]
    argv += ["--vae", str(root / "vae"), "--image-size", str(SIZE), "--shard-size", "4"]
    argv += ["--batch-size", "4", "--device", "auto"]
    out = _torchrun({k: [*node, *argv] for k, node in _two_nodes().items()}, cwd=root)
    (root / "extract-node-0.log").write_text(out["node-0"])
    (root / "extract-node-1.log").write_text(out["node-1"])
    return root


def _two_nodes() -> dict[str, list[str]]:
    """torchrun arguments of 2 nodes x 1 process: static rendezvous on a free local port."""
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "static"]
    common += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return {f"node-{r}": [*common, "--node-rank", str(r)] for r in (0, 1)}


def _torchrun(cmds: dict[str, list[str]], cwd: Path) -> dict[str, str]:
    """Run torchrun commands at the same time; their stdout, after checking they succeeded."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    procs = {
        k: subprocess.Popen(
            [*run, *c], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=cwd,
        )
        for k, c in cmds.items()
    }  # fmt: skip
    out = {}
    try:
        for k, p in procs.items():
            out[k] = p.communicate(timeout=TIMEOUT)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for k, p in procs.items():
        assert p.returncode == 0, f"{k}:\n{out[k][1][-3000:]}"
    return {k: o[0] for k, o in out.items()}


def _train_argv(work: Path, name: str) -> list[str]:
    sets = [
        # The preset's objective, optimiser, EMA, label dropout and Dispersive Loss, shrunk:
        'model.name="SiT-XS/2"',
        f"model.input_size={SIZE // 2}",
        f"model.num_classes={len(CLASSES)}",
        "model.overrides={depth=2, hidden_size=32, num_heads=2}",
        f"data.path={str(work / 'latents')!r}",
        'dispersive.scope="global"',
        "dispersive.group_size=0",
        'dispersive.layers=["blocks.0"]',
        f"train.steps={STEPS}",
        "train.global_batch=8",
        "train.log_every=1",
        f"train.ckpt_every={STEPS}",
        'train.device="cpu"',
        "train.dist_timeout_s=60",
        "optim.lr=1e-3",
        "sample.steps=2",
        f'train.run_name="{name}"',
    ]
    argv = ["-m", "dispersive", "train", str(PRESET), "--outdir", str(work / "runs")]
    return [*argv, "--no-progress", "--set", *sets]


@pytest.fixture(scope="module")
def runs(work) -> dict[str, Path]:
    """Train the same run under torchrun on 1 node x 2 processes and on 2 nodes x 1 process."""
    cmds = {"one-node": ["--standalone", "--nproc-per-node", "2", *_train_argv(work, "a")]}
    cmds |= {k: [*node, *_train_argv(work, "b")] for k, node in _two_nodes().items()}
    _torchrun(cmds, cwd=work)
    return {"one-node": work / "runs" / "a", "two-nodes": work / "runs" / "b"}


def test_two_nodes_extract_the_latents_of_one_process(work):
    from dispersive.data.datasets import load_image
    from dispersive.data.latents import LatentDataset, load_vae

    ds = LatentDataset(work / "latents")
    assert ds.meta["classes"] == list(CLASSES) and len(ds) == sum(CLASSES.values())
    assert ds.image_shape == (4, SIZE // 2, SIZE // 2) and ds.meta["complete"]
    # Each node wrote its own shards (rank 0: 1 and 3 of 3, rank 1: 2), and only rank 0 reports.
    log0, log1 = ((work / f"extract-node-{r}.log").read_text() for r in (0, 1))
    assert "shard 1/3" in log0 and "shard 3/3" in log0 and "shard 2/3" not in log0
    assert "shard 2/3 (4 images)" in log1 and "[rank 1]" in log1
    assert "3 shard(s) written by 2 ranks" in log0 and "written by" not in log1
    # Oracle: every image encoded on its own by the same VAE (posterior mean and std).
    shards = sorted((work / "latents").glob("shard-*"))
    assert [d.name for d in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    index = np.concatenate([np.load(d / "index.npy") for d in shards])
    mean = np.concatenate([np.load(d / "mean.npy") for d in shards])
    std = np.concatenate([np.load(d / "std.npy") for d in shards])
    assert index.tolist() == list(range(len(ds)))
    files = sorted((work / "train").glob("*/*"))
    x = torch.stack([torch.from_numpy(load_image(f, SIZE)).float() / 127.5 - 1 for f in files])
    with torch.no_grad():
        post = load_vae(str(work / "vae")).encode(x).latent_dist
    np.testing.assert_allclose(mean, post.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, post.std.numpy(), rtol=1e-4, atol=1e-5)


def test_two_nodes_train_exactly_like_one_node(runs):
    from dispersive.train.checkpoint import load_checkpoint
    from dispersive.train.logging import read_metrics

    a, b = (load_checkpoint(runs[k]) for k in ("one-node", "two-nodes"))
    assert a["step"] == b["step"] == STEPS
    for name, w in a["model"].items():
        torch.testing.assert_close(b["model"][name], w, rtol=0, atol=0, msg=name)
    ma, mb = read_metrics(runs["one-node"]), read_metrics(runs["two-nodes"])
    assert [r["step"] for r in mb] == list(range(1, STEPS + 1))
    for ra, rb in zip(ma, mb):
        for key in ("loss", "loss_diff", "loss_disp", "floor_gap", "grad_norm"):
            assert rb[key] == ra[key], key
    done = json.loads((runs["two-nodes"] / "done.json").read_text())
    assert done["world_size"] == 2 and done["global_batch"] == 8


class StubInception(torch.nn.Module):
    """Stands in for torch-fidelity's Inception-v3 (a 100 MB download): uint8 (N, 3, H, W) ->
    (features (N, F), logits (N, 1008)), a fixed random map of 4x4-pooled pixels. F = 256,
    not 2048: the Fréchet distance's matrix square root costs F^3 (45 s at 2048 here)."""

    def __init__(self, num_features: int = 256) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * 4 * 4, num_features, generator=g)
        self.head = torch.randn(num_features, 1008, generator=g) / num_features**0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8 and x.shape[1] == 3, (x.dtype, x.shape)
        f = torch.tanh(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1))
        f = torch.tanh(f @ self.proj)
        return f, f @ self.head


def _frechet_oracle(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID in float64 without a matrix square root: with centred X_i (n_i, F) and
    S_i = X_i^T X_i / (n_i - 1), tr (S1 S2)^(1/2) = ||X1 X2^T||_* / sqrt((n1 - 1)(n2 - 1))
    (the nonzero eigenvalues of S1 S2 are those of M M^T / c with M = X1 X2^T)."""
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1), len(f2)
    tr1, tr2 = (x1**2).sum() / (n1 - 1), (x2**2).sum() / (n2 - 1)
    cross = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + tr1 + tr2 - 2 * cross)


def test_sample_decodes_to_pixels_and_eval_scores_them(work, runs, monkeypatch, capsys):
    import dispersive.data.latents as latents
    import dispersive.eval.features as features
    from dispersive.data.datasets import load_image
    from dispersive.eval.io import load_npz, save_npz, to_uint8
    from dispersive.generate import generate
    from dispersive.train.checkpoint import load_model

    # What reaches the VAE decoder, recorded through the loader `dispersive sample` uses.
    fed: list[torch.Tensor] = []
    real_load = latents.load_vae

    def load_vae(*args, **kwargs):
        vae = real_load(*args, **kwargs)
        decode = vae.decode

        def recording_decode(z, *a, **kw):
            fed.append(z.detach().clone())
            return decode(z, *a, **kw)

        vae.decode = recording_decode
        return vae

    monkeypatch.setattr(latents, "load_vae", load_vae)
    num, out = 12, work / "samples"
    argv = ["sample", "--ckpt", str(runs["two-nodes"]), "--outdir", str(out), "--num", str(num)]
    argv += ["--sampler", "euler", "--steps", "2", "--batch-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()

    # ADM layout: arr_0 uint8 (N, H, W, 3), arr_1 the class labels (i mod num_classes).
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (num, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % len(CLASSES) for i in range(num)]
    spec = json.loads((out / "spec.json").read_text())
    assert spec["vae"] == str(work / "vae") and spec["checkpoint_step"] == STEPS
    assert (spec["space"], spec["decoded"], spec["clamp"]) == ("latent", True, "pixels")

    # The pixels are the decoder's output for the latents it was fed (two chunks: 8 + 4).
    assert [len(z) for z in fed] == [8, 4]
    vae = real_load(str(work / "vae"))
    with torch.no_grad():
        pixels = torch.cat([vae.decode(z).sample for z in fed]).clamp(-1, 1)
    np.testing.assert_array_equal(images, to_uint8(pixels))

    # ... and those latents are the sampler's, unclamped (divided by the VAE scale only): the
    # same chunks drawn again as latents (chunk c: generator seed * 1000003 + c, labels i mod K).
    model, _, _ = load_model(runs["two-nodes"])
    scale = latents.read_meta(work / "latents")["scale"]
    raw = []
    for c, z in enumerate(fed):
        lo = 8 * c
        x, _ = generate(
            model, num=len(z), sampler="euler", steps=2, labels=torch.arange(lo, lo + len(z)) % 2,
            generator=torch.Generator().manual_seed(c), batch_size=8, space="latent",
        )  # fmt: skip
        torch.testing.assert_close(z * scale, x)
        raw.append(x)
    assert float(torch.cat(raw).abs().max()) > 1.5  # a clamp to [-1, 1] would have cut these

    # `dispersive eval` against an ADM-style reference batch: the centre-cropped training images.
    files = sorted((work / "train").glob("*/*"))
    ref = np.stack([load_image(f, SIZE).transpose(1, 2, 0) for f in files])
    save_npz(work / "ref.npz", ref)
    stub = StubInception()
    monkeypatch.setattr(features, "load_inception", lambda *a, **k: stub)
    argv = ["eval", "--samples", str(out / "samples.npz"), "--ref", str(work / "ref.npz")]
    argv += ["--features", "inception", "--kid-subsets", "4", "--kid-subset-size", "8"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["num_samples"] == num and res["num_ref"] == len(files)

    def feats(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return stub(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())[0].double().numpy()

    f_fake, f_real = feats(load_npz(out / "samples.npz")), feats(ref)
    assert res["fid"] == pytest.approx(_frechet_oracle(f_fake, f_real), rel=1e-6)
    for key in ("is", "kid", "precision", "recall"):
        assert np.isfinite(res[key]), key
