"""Official DiT / SiT checkpoints: key mapping, conventions, and outputs against an oracle.

The oracle below is written here from the published model definitions (DiT and SiT
``models.py``, with timm's PatchEmbed / Attention / Mlp): a functional float64 forward that reads
the official state dict directly. Official-layout state dicts are built from the published key
names and shapes with random values; nothing of the official code is imported or copied.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dispersive.models import MODELS, build, load_official
from dispersive.models.layers import sincos_pos_embed_2d
from dispersive.models.official import convert_official, official_state_dict, read_checkpoint

FREQ_DIM = 256  # the official TimestepEmbedder's frequency_embedding_size


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Official layout and oracle (from the published definitions)
# --------------------------------------------------------------------------------------------


def mae_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D sin-cos table as the official code builds it: meshgrid(w, h), first half of
    the channels from the first grid (the column), each half [sin, cos] of pos * omega."""
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None].astype(np.float64) * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, w), one(dim // 2, h)], axis=1)


def official_shapes(
    hidden: int, depth: int, patch: int, channels: int, classes: int, grid: int, sigma: bool
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official DiT / SiT state dict (class_dropout_prob > 0)."""
    d, c_out = hidden, channels * (2 if sigma else 1)
    shapes = {
        "pos_embed": (1, grid * grid, d),
        "x_embedder.proj.weight": (d, channels, patch, patch),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, FREQ_DIM),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "mlp.fc1.weight": (4 * d, d),
                b + "mlp.fc1.bias": (4 * d,),
                b + "mlp.fc2.weight": (d, 4 * d),
                b + "mlp.fc2.bias": (d,),
                b + "adaLN_modulation.1.weight": (6 * d, d),
                b + "adaLN_modulation.1.bias": (6 * d,),
            }
        )
    shapes.update(
        {
            "final_layer.linear.weight": (patch * patch * c_out, d),
            "final_layer.linear.bias": (patch * patch * c_out,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d),
            "final_layer.adaLN_modulation.1.bias": (2 * d,),
        }
    )
    return shapes


def official_state(
    hidden=64, depth=2, patch=2, channels=4, classes=10, grid=4, sigma=True, seed=0
) -> dict[str, torch.Tensor]:
    """Random official-layout weights (float32), with the saved pos_embed of the official code."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_shapes(hidden, depth, patch, channels, classes, grid, sigma).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 10
        sd[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    sd["pos_embed"] = torch.from_numpy(mae_pos_embed(hidden, grid)).float()[None]
    return sd


def oracle(sd, x, t, y, *, heads: int, learn_sigma: bool = True, sit: bool = False):
    """The official DiT / SiT forward in float64, read off the published definitions."""
    p = {k: v.double() for k, v in sd.items()}
    x, t = x.double(), t.double()
    lin = lambda h, name: h @ p[name + ".weight"].T + p[name + ".bias"]  # noqa: E731
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)  # noqa: E731
    mod = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]  # noqa: E731

    w = p["x_embedder.proj.weight"]
    patch = w.shape[-1]
    h = F.conv2d(x, w, p["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    h = h + p["pos_embed"]  # (B, T, D)
    half = FREQ_DIM // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    cond = temb + p["y_embedder.embedding_table.weight"][y]
    B, T, D = h.shape
    depth = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        sm, cm, gm, sf, cf, gf = lin(F.silu(cond), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = lin(mod(ln(h), sm, cm), b + "attn.qkv").reshape(B, T, 3, heads, D // heads)
        q, k, v = a.permute(2, 0, 3, 1, 4)
        att = torch.softmax((q * (D // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
        h = h + gm[:, None] * lin((att @ v).transpose(1, 2).reshape(B, T, D), b + "attn.proj")
        m = F.gelu(lin(mod(ln(h), sf, cf), b + "mlp.fc1"), approximate="tanh")
        h = h + gf[:, None] * lin(m, b + "mlp.fc2")
    shift, scale = lin(F.silu(cond), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(mod(ln(h), shift, scale), "final_layer.linear")  # (B, T, p * p * C_out)
    c_out = out.shape[-1] // (patch * patch)
    g = int(round(T**0.5))
    img = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, patch, patch, c_out))
    img = img.reshape(B, c_out, g * patch, g * patch)
    if sit and learn_sigma:
        img = img[:, : c_out // 2]
    return img


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _inputs(batch=5, channels=4, size=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    y[-1] = classes  # the null label of classifier-free guidance
    return x, y


# --------------------------------------------------------------------------------------------
# The oracle's own premises
# --------------------------------------------------------------------------------------------


def test_wh_pos_embed_is_maes_construction_and_hw_swaps_its_halves():
    for dim, grid in [(64, 4), (1152, 16)]:
        mae = torch.from_numpy(mae_pos_embed(dim, grid)).float()
        wh, hw = sincos_pos_embed_2d(dim, grid, "wh"), sincos_pos_embed_2d(dim, grid, "hw")
        assert (wh - mae).abs().max() < 1e-6
        assert torch.equal(hw, torch.cat([wh[:, dim // 2 :], wh[:, : dim // 2]], dim=1))
    # Token 1 is row 0, column 1: the first half of "wh" encodes the column (sin(1) first).
    assert math.isclose(sincos_pos_embed_2d(16, 4, "wh")[1, 0].item(), math.sin(1), rel_tol=1e-6)
    assert sincos_pos_embed_2d(16, 4, "hw")[1, 0].item() == 0.0
    with pytest.raises(ValueError, match="pos_embed order"):
        sincos_pos_embed_2d(16, 4, "xy")


# --------------------------------------------------------------------------------------------
# Outputs equal the official model's (tiny size, float32 model vs float64 oracle)
# --------------------------------------------------------------------------------------------


def test_sit_outputs_are_the_official_velocity_in_this_packages_time():
    sd = official_state(sigma=True)
    model = load_official("SiT-XS/2", sd, depth=2)
    assert model.config["overrides"] == {
        "depth": 2,
        "pos_embed": "wh",
        "learn_sigma": True,
        "time_scale": 1.0,
        "time_origin": "noise",
    }
    assert (model.input_size, model.in_channels, model.num_classes) == (8, 4, 10)
    x, y = _inputs()
    t_sit = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)  # SiT: data at 1
    ref = oracle(sd, x, t_sit, y, heads=4, sit=True)  # d x / d t_sit, (B, C, H, W)
    with torch.no_grad():
        v = model(x, (1 - t_sit).float(), y)  # this package: data at 0
    assert v.shape == (5, 4, 8, 8)
    assert rel_err(v, -ref) < 1e-5
    # Not vacuous: the time map and the sign both matter.
    with torch.no_grad():
        assert rel_err(model(x, t_sit.float(), y), -ref) > 1e-2
    assert rel_err(v, ref) > 1


def test_sit_without_learn_sigma_and_dit_with_and_without_sigma():
    x, y = _inputs()
    t_sit = torch.rand(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sd = official_state(sigma=False, seed=2)
    sit = load_official("SiT-XS/2", sd, depth=2)
    assert sit.config["overrides"]["learn_sigma"] is False
    with torch.no_grad():
        assert rel_err(sit(x, (1 - t_sit).float(), y), -oracle(sd, x, t_sit, y, heads=4)) < 1e-5

    k = torch.tensor([0.0, 1.0, 250.0, 500.0, 999.0], dtype=torch.float64)
    for sigma in (True, False):
        sd = official_state(sigma=sigma, seed=4)
        dit = load_official("DiT-XS/2", sd, depth=2)
        assert dit.config["overrides"] == {"depth": 2, "pos_embed": "wh", "learn_sigma": sigma}
        with torch.no_grad():
            out = dit(x, k.float(), y)
        assert out.shape == (5, 8 if sigma else 4, 8, 8)
        assert rel_err(out, oracle(sd, x, k, y, heads=4)) < 1e-5


def test_another_patch_and_grid_and_the_math_backend():
    sd = official_state(hidden=64, depth=1, patch=4, grid=3, seed=5)  # input 12, patch 4
    model = load_official("DiT-XS/4", sd, depth=1, attn="math")
    x, y = _inputs(size=12)
    k = torch.tensor([3.0, 40.0, 400.0, 800.0, 990.0], dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x, k.float(), y), oracle(sd, x, k, y, heads=4)) < 1e-5


# --------------------------------------------------------------------------------------------
# Every DiT / SiT size: key and shape mapping only (meta device, no memory)
# --------------------------------------------------------------------------------------------

PAPER_NAMES = [
    n
    for n in MODELS
    if n.split("-")[0] in ("DiT", "SiT") and n.split("-")[1].split("/")[0] in ("S", "B", "L", "XL")
]


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_key_and_shape_mapping_of_every_paper_size(name):
    d = MODELS[name].defaults
    hidden, depth, patch = d["hidden_size"], d["depth"], d["patch_size"]
    for size in (32, 64) if name.endswith("XL/2") else (32,):  # 256 and 512 pixels
        shapes = official_shapes(hidden, depth, patch, 4, 1000, size // patch, True)
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        kwargs, converted = convert_official(name, sd)
        assert kwargs["input_size"] == size and kwargs["num_classes"] == 1000
        with torch.device("meta"):
            model = build(**kwargs)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == want
        assert set(shapes) - set(converted) == {"pos_embed", *(k for k in shapes if "t_emb" in k)}
        model.load_state_dict(converted, strict=True)  # meta: checks keys and shapes only
        assert model.pos_embed.shape == shapes["pos_embed"]


# --------------------------------------------------------------------------------------------
# Layouts, files, checksums
# --------------------------------------------------------------------------------------------


def test_training_checkpoint_file_picks_ema_by_default(tmp_path):
    ema, raw = official_state(seed=6), official_state(seed=7)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    args = argparse.Namespace(model="SiT-XS/2", image_size=64, num_classes=10, ckpt=None)
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": args}, path)
    x, y = _inputs()
    t = torch.full((5,), 0.3)
    with torch.no_grad():
        out = load_official("SiT-XS/2", path, depth=2)(x, t, y)
        out_raw = load_official("SiT-XS/2", path, depth=2, weights="model")(x, t, y)
        assert torch.equal(out, load_official("SiT-XS/2", ema, depth=2)(x, t, y))
        assert torch.equal(out_raw, load_official("SiT-XS/2", raw, depth=2)(x, t, y))
    assert not torch.equal(out, out_raw)
    # DDP-prefixed keys and an EMA-only training dict
    ddp = {"ema": {f"module.{k}": v for k, v in ema.items()}}
    sd, what = official_state_dict(ddp)
    assert set(sd) == set(ema) and what == "'ema' of a training checkpoint"
    with pytest.raises(ValueError, match="no 'model' weights.*weights='ema'"):
        official_state_dict(ddp, weights="model")


def test_checksum_is_verified_before_loading(tmp_path):
    from dispersive.models.official import sha256_file

    path = tmp_path / "SiT.pt"
    torch.save(official_state(), path)
    good = sha256_file(path)
    assert load_official("SiT-XS/2", path, depth=2, sha256=good.upper()).num_classes == 10
    with pytest.raises(ValueError, match="has sha256 .* expected 0+: the file is corrupt"):
        load_official("SiT-XS/2", path, depth=2, sha256="0" * 64)
    with pytest.raises(ValueError, match="64 hex digits"):
        read_checkpoint(path, sha256="abc")


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_inputs_are_one_line_errors(tmp_path):
    sd = official_state()
    # Another size: the error says which registry name the file fits.
    with pytest.raises(ValueError, match="another size") as e:
        load_official("SiT-B/2", sd)
    assert "fits 'SiT-XS/2'" not in _one_line(e)  # XS has depth 4; this file has depth 2
    with pytest.raises(ValueError, match=r"another size.*it fits 'SiT-XS/2'") as e:
        load_official("SiT-B/2", official_state(depth=4))
    _one_line(e)
    with pytest.raises(ValueError, match="input_size 8 .* not 32") as e:
        load_official("SiT-XS/2", sd, depth=2, input_size=32)
    _one_line(e)
    with pytest.raises(ValueError, match="in_channels=4, not 3"):
        load_official("SiT-XS/2", sd, depth=2, in_channels=3)
    with pytest.raises(ValueError, match="11 rows: 10 classes"):
        load_official("SiT-XS/2", sd, depth=2, num_classes=1000)
    with pytest.raises(ValueError, match="contradict the official"):
        load_official("SiT-XS/2", sd, depth=2, pos_embed="hw")
    with pytest.raises(ValueError, match="DiT and SiT families"):
        load_official("MF-XS/2", sd, depth=2)
    with pytest.raises(ValueError, match="unknown model 'SiT-XXL/2'"):
        load_official("SiT-XXL/2", sd)
    # Unknown layouts
    for bad, pattern in [
        ({"state": 1, "epoch": 3}, r"unknown checkpoint layout \(top-level keys"),
        ([1, 2], "not a dict"),
        ({"a.weight": torch.zeros(2)}, "unknown checkpoint layout: the plain state dict lacks"),
    ]:
        with pytest.raises(ValueError, match=pattern) as e:
            load_official("SiT-XS/2", bad, depth=2)
        _one_line(e)
    swapped = dict(sd, pos_embed=sincos_pos_embed_2d(64, 4, "hw")[None])
    with pytest.raises(ValueError, match="'hw' order"):
        load_official("SiT-XS/2", swapped, depth=2)
    extra = dict(sd, **{"blocks.0.attn.q_norm.weight": torch.ones(16)})
    with pytest.raises(ValueError, match="does not fit 'SiT-XS/2'.*q_norm") as e:
        load_official("SiT-XS/2", extra, depth=2)
    _one_line(e)
    # This package's own checkpoints go through dispersive.checkpoint.load_model
    ours = build("SiT-XS/2", input_size=8, in_channels=4, num_classes=10, depth=2)
    with pytest.raises(ValueError, match="checkpoint of this package"):
        load_official("SiT-XS/2", {"model": ours.state_dict(), "model_config": ours.config})
    with pytest.raises(ValueError, match="has t_embedders.0"):
        load_official("SiT-XS/2", ours.state_dict(), depth=2)
    # Files: missing, truncated, refused by weights_only
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official("SiT-XS/2", tmp_path / "nope.pt")
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint.*truncated") as e:
        load_official("SiT-XS/2", path, depth=2)
    _one_line(e)
    torch.save({"ema": sd, "args": _Foreign()}, path)
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as e:
        load_official("SiT-XS/2", path, depth=2)  # weights_only=True refuses the class
    _one_line(e)


class _Foreign:
    pass


# --------------------------------------------------------------------------------------------
# The conventions are saved with the model and rebuild it exactly
# --------------------------------------------------------------------------------------------


def test_conventions_round_trip_through_this_packages_checkpoint(tmp_path):
    from dispersive.train.checkpoint import load_model, save_checkpoint

    sd = official_state(seed=8)
    model = load_official("SiT-XS/2", sd, depth=2)
    ckpt = tmp_path / "ckpt-0000000.pt"
    save_checkpoint(
        {
            "format": 1,
            "step": 0,
            "model": model.state_dict(),
            "ema": {"shadow": model.state_dict(), "decay": 0.9999},
            "config": {"model": {"name": "SiT-XS/2"}},
            "model_config": model.config,
        },
        ckpt,
    )
    again, _, _ = load_model(ckpt)
    assert again.config == model.config
    assert (again.pos_embed_order, again.time_origin, again.learn_sigma) == ("wh", "noise", True)
    x, y = _inputs()
    t = torch.rand(5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(again(x, t, y), model(x, t, y))


def test_defaults_are_todays_behaviour():
    # A config without the new fields (an old checkpoint) builds the model as before.
    sit = build("SiT-XS/2", input_size=8, in_channels=4, num_classes=10)
    assert (sit.pos_embed_order, sit.time_origin, sit.learn_sigma) == ("hw", "data", False)
    assert sit.t_embedders[0].scale == 1000.0 and sit.out_channels == 4
    assert torch.equal(sit.pos_embed[0], sincos_pos_embed_2d(64, 4))
    with pytest.raises(ValueError, match="time_origin must be one of"):
        build("SiT-XS/2", input_size=8, in_channels=4, num_classes=10, time_origin="data1")
    with pytest.raises(ValueError, match="time_scale must be a positive number"):
        build("SiT-XS/2", input_size=8, in_channels=4, num_classes=10, time_scale=0)
