"""Generative models: registry, parameter counts, contracts, taps, attention backends, jvp."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dispersive.models import MODELS, build, set_attn_backend
from dispersive.models.layers import attention, sincos_pos_embed_2d, timestep_embedding

# Paper Table 8 (SiT / DiT at 32x32x4 latents, 1000 classes), in parameters.
TABLE8 = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}

# Tiny configs of every family for CPU tests: (name, overrides, input_size, in_channels).
TINY = {
    "SiT": ("SiT-XS/4", dict(depth=2)),
    "DiT": ("DiT-XS/4", dict(depth=2)),
    "MF": ("MF-XS/4", dict(depth=2)),
    "UNet": ("UNet-T", dict(model_channels=16, num_res_blocks=1)),
}
SHAPES = [(28, 1), (32, 3), (32, 4)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    # The zero-initialised adaLN gates and output layers would make most checks vacuous.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def _tiny(family: str, input_size: int = 32, in_channels: int = 3, num_classes: int = 10, **kw):
    name, overrides = TINY[family]
    return build(
        name,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        **{**overrides, **kw},
    )


def _inputs(model: nn.Module, batch: int = 3, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s, c = model.input_size, model.in_channels
    x = torch.randn(batch, c, s, s, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    y = torch.randint(0, max(model.num_classes, 1), (batch,), generator=g)
    if model.kind == "ddpm":
        return (x, (t * 999).round(), y)
    if model.kind == "meanflow":
        return (x, t, t * torch.rand(batch, generator=g, dtype=dtype), y)
    return (x, t, y)


def _nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Registry and parameter counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["SiT", "DiT"])
@pytest.mark.parametrize("size", list(TABLE8))
def test_parameter_counts_match_table8(family, size):
    with torch.device("meta"):
        model = build(f"{family}-{size}/2", input_size=32, in_channels=4, num_classes=1000)
    assert abs(_nparams(model) / TABLE8[size] - 1) < 0.02, (size, _nparams(model))


def test_meanflow_adds_exactly_one_timestep_embedder():
    with torch.device("meta"):
        sit = build("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
        mf = build("MF-XL/2", input_size=32, in_channels=4, num_classes=1000)
    d = 1152
    embedder = (256 * d + d) + (d * d + d)
    assert _nparams(mf) - _nparams(sit) == embedder
    assert abs(_nparams(mf) / 676e6 - 1) < 0.02  # paper Table 7: MeanFlow-XL/2 676M


def test_block_parameter_count_is_analytic():
    # qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, adaLN 6D^2+6D  ->  18 D^2 + 15 D.
    with torch.device("meta"):
        model = build("SiT-B/4", input_size=32, in_channels=4, num_classes=1000)
    d = 768
    assert _nparams(model.blocks[0]) == 18 * d * d + 15 * d


def test_unet_cifar_parameter_count():
    with torch.device("meta"):
        model = build("UNet-CIFAR", input_size=32, in_channels=3, num_classes=0)
    assert abs(_nparams(model) / 55.7e6 - 1) < 0.005, _nparams(model)
    assert len(model.block_names) == 3 * 4 + 2 + 3 * 5


def test_every_registered_name_builds_with_contract_attributes():
    assert {"SiT-B/2", "DiT-XL/2", "MF-B/4", "UNet-CIFAR", "UNet-T", "SiT-T/4", "SiT-XS/7"} <= set(
        MODELS
    )
    kinds = {"SiT": "flow", "DiT": "ddpm", "MF": "meanflow", "UNet": "flow"}
    for name in MODELS:
        size = 28 if name.endswith("/7") else 32
        with torch.device("meta"):
            model = build(name, input_size=size, in_channels=4, num_classes=10)
        assert model.kind == kinds[name.split("-")[0]]
        assert model.in_channels == 4 and model.input_size == size and model.num_classes == 10
        assert model.out_channels == (8 if name.startswith("DiT") else 4)
        assert len(model.block_names) == model.depth > 0
        for block in model.block_names:
            model.get_submodule(block)  # every name resolves
        assert model.config == {
            "name": name,
            "input_size": size,
            "in_channels": 4,
            "num_classes": 10,
            "overrides": {},
        }


def test_transformer_block_names_and_cpu_sizes():
    with torch.device("meta"):
        t = build("SiT-T/4", input_size=32, in_channels=4, num_classes=0)
        xs = build("DiT-XS/2", input_size=32, in_channels=4, num_classes=0)
    assert (t.hidden_size, t.depth, t.num_heads) == (128, 6, 4)
    assert (xs.hidden_size, xs.depth, xs.num_heads) == (64, 4, 4)
    assert t.block_names == [f"blocks.{i}" for i in range(6)]
    assert isinstance(t.blocks, nn.ModuleList)


def test_build_config_round_trip():
    model = build("UNet-T", input_size=28, in_channels=1, num_classes=10, channel_mult=(1, 2))
    assert model.config["overrides"] == {"channel_mult": [1, 2]}  # plain lists, TOML-friendly
    again = build(**model.config)
    assert again.config == model.config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes


def test_unknown_names_and_overrides_are_clear_errors():
    with pytest.raises(ValueError, match=r"SiT-B/2"):  # close match suggested
        build("SiT-B2", input_size=32, in_channels=4, num_classes=0)
    with pytest.raises(ValueError, match=r"valid overrides.*hidden_size"):
        build("SiT-S/2", input_size=32, in_channels=4, num_classes=0, width=3)
    with pytest.raises(ValueError, match=r"learn_sigma"):  # SiT and DiT have it, MeanFlow not
        build("MF-S/2", input_size=32, in_channels=4, num_classes=0, learn_sigma=True)
    with pytest.raises(
        ValueError, match=r"patch_size=8 does not divide input_size=28.*\[1, 2, 4, 7"
    ):
        build("SiT-S/8", input_size=28, in_channels=1, num_classes=0)
    with pytest.raises(ValueError, match=r"attention backend"):
        build("SiT-XS/4", input_size=32, in_channels=3, num_classes=0, attn="flash")
    with pytest.raises(ValueError, match=r"downsampling factors"):
        build("UNet-T", input_size=32, in_channels=3, num_classes=0, attention_resolutions=[16])
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(levels-1\) = 4"):
        build("UNet-T", input_size=30, in_channels=3, num_classes=0)


# --------------------------------------------------------------------------------------------
# Forward contracts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(TINY))
def test_output_is_zero_at_initialisation(family):
    model = _tiny(family)
    out = model(*_inputs(model))
    assert out.abs().max() == 0  # adaLN-Zero / zero-initialised output layer


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("size,channels", SHAPES)
def test_output_shapes(family, size, channels):
    model = _tiny(family, size, channels)
    out = model(*_inputs(model, batch=2))
    factor = 2 if family == "DiT" else 1
    assert out.shape == (2, factor * channels, size, size)
    assert model.out_channels == factor * channels


def test_patch7_for_fashion_mnist_and_dit_without_sigma():
    model = build("SiT-XS/7", input_size=28, in_channels=1, num_classes=10, depth=1)
    assert model(*_inputs(model, batch=2)).shape == (2, 1, 28, 28)
    dit = build("DiT-XS/4", input_size=32, in_channels=3, num_classes=0, depth=1, learn_sigma=False)
    assert dit.out_channels == 3
    assert dit(*_inputs(dit, batch=2)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("family", list(TINY))
def test_forward_is_deterministic(family):
    model = _randomize(_tiny(family)).eval()
    inputs = _inputs(model)
    a, b = model(*inputs), model(*inputs)
    assert torch.equal(a, b)
    assert a.abs().max() > 0


@pytest.mark.parametrize("family", list(TINY))
def test_forward_hook_on_every_block_records_a_tensor(family):
    model = _randomize(_tiny(family)).eval()
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, out)
        )
        for name in model.block_names
    ]
    model(*_inputs(model, batch=2))
    for h in handles:
        h.remove()
    assert list(seen) == model.block_names  # every block, in forward order
    for z in seen.values():
        assert isinstance(z, torch.Tensor) and z.shape[0] == 2 and torch.isfinite(z).all()
    if family != "UNet":
        tokens = (model.input_size // model.patch_size) ** 2
        assert all(z.shape == (2, tokens, model.hidden_size) for z in seen.values())


@pytest.mark.parametrize("family", list(TINY))
def test_feature_tap_reads_every_block(family):
    from dispersive import FeatureTap

    model = _randomize(_tiny(family)).eval()
    names = [*model.block_names, "blocks.-1" if family != "UNet" else "resblocks.-1"]
    tap = FeatureTap(model, names)
    model(*_inputs(model, batch=2))
    got = tap.pop()
    assert set(got) == set(names)
    assert torch.equal(got[names[-1]], got[model.block_names[-1]])
    assert all(z.shape[0] == 2 for z in got.values())


@pytest.mark.parametrize("family", ["SiT", "DiT", "MF"])
def test_token_stream_is_contiguous_and_its_layout_does_not_change_values(family, monkeypatch):
    # PatchEmbed returns contiguous tokens so that the residual stream is (B, T, D) in memory:
    # the dispersive loss then flattens a tapped block with a view, not a copy. The layout the
    # transpose alone gives, (B, D, T) in memory, must give the same values bit for bit, forward
    # and backward with dispersive terms on two blocks (every reduction runs on a contiguous
    # copy either way, and the losses' gradients are new contiguous tensors in both layouts).
    from dispersive import DispersiveLoss, FeatureTap
    from dispersive.models import layers

    def run():
        model = _randomize(_tiny(family))
        tap = FeatureTap(model, model.block_names)
        out = model(*_inputs(model, batch=8))
        feats = tap.pop()
        z0, z1 = (feats[n] for n in model.block_names[:2])
        loss = DispersiveLoss(group_size=4)(z0) + DispersiveLoss(variant="covariance")(z1)
        (out.square().mean() + loss).backward()
        return out.detach(), feats, [p.grad for p in model.parameters()]

    out, feats, grads = run()
    assert all(z.is_contiguous() for z in feats.values())
    contiguous = layers.PatchEmbed.forward
    monkeypatch.setattr(
        layers.PatchEmbed,
        "forward",
        lambda self, x: contiguous(self, x).transpose(1, 2).contiguous().transpose(1, 2),
    )
    out2, feats2, grads2 = run()
    assert not any(z.is_contiguous() for z in feats2.values())  # the layout did change
    assert torch.equal(out, out2)
    assert all(torch.equal(feats[n], feats2[n]) for n in feats)
    assert all(torch.equal(g, g2) for g, g2 in zip(grads, grads2, strict=True))


def test_unet_residual_block_15_is_the_first_decoder_block():
    # Meta tensors propagate shapes without computing, so the 55.7M UNet costs nothing here.
    with torch.device("meta"):
        model = build("UNet-CIFAR", input_size=32, in_channels=3, num_classes=0)
        shapes = {}
        for name in model.block_names:
            model.get_submodule(name).register_forward_hook(
                lambda m, a, out, name=name: shapes.__setitem__(name, tuple(out.shape))
            )
        model(torch.empty(2, 3, 32, 32), torch.empty(2))
    block15 = model.block_names[14]
    assert block15 == "resblocks.14"
    assert shapes[block15] == (2, 256, 8, 8)
    # The first 14 blocks never read a skip connection; block 15 is the first that does.
    assert all(not isinstance(model.resblocks[i].skip, nn.Conv2d) for i in range(14))
    assert model.resblocks[14].in_layers[-1].in_channels == 512
    resolutions = [shapes[n][-1] for n in model.block_names]
    assert resolutions == [32] * 4 + [16] * 4 + [8] * 4 + [8] * 2 + [8] * 5 + [16] * 5 + [32] * 5


def test_unet_works_at_28_pixels():
    model = build("UNet-T", input_size=28, in_channels=1, num_classes=10, model_channels=16)
    model = _randomize(model)
    out = model(*_inputs(model, batch=2))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(TINY))
def test_null_label_handling(family):
    model = _randomize(_tiny(family, num_classes=10)).eval()
    x, *times, y = _inputs(model, batch=2)
    null = torch.full_like(y, 10)
    out_null = model(x, *times, null)  # the extra table row, not an error
    assert torch.isfinite(out_null).all()
    assert not torch.allclose(out_null, model(x, *times, y))  # the label matters
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, *times, torch.full_like(y, 11))
    with pytest.raises(ValueError, match=r"null"):
        model(x, *times, None)
    with pytest.raises(ValueError, match=r"integer"):
        model(x, *times, y.float())


@pytest.mark.parametrize("family", list(TINY))
def test_unconditional_model_ignores_labels(family):
    model = _randomize(_tiny(family, num_classes=0)).eval()
    x, *times, _ = _inputs(model, batch=2)
    assert torch.equal(model(x, *times, None), model(x, *times, torch.tensor([3, 5])))
    assert not any("y_embedder" in n or "label_emb" in n for n, _ in model.named_parameters())


def test_bad_input_shapes_are_clear_errors():
    model = _tiny("SiT", 32, 3)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model(torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(torch.zeros(2, 3, 32, 32), torch.zeros(3), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Attention backends and forward-mode AD
# --------------------------------------------------------------------------------------------


def test_attention_math_equals_float64_oracle():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(8), dim=-1)
    oracle = torch.einsum("bhij,bhjd->bhid", w, v)
    for backend in ("math", "sdpa"):
        assert torch.allclose(attention(q, k, v, backend), oracle, atol=1e-12)


@pytest.mark.parametrize("family", list(TINY))
def test_math_backend_equals_sdpa(family):
    model = _randomize(_tiny(family)).eval()
    inputs = _inputs(model)
    out_sdpa = model(*inputs)
    set_attn_backend(model, "math")
    assert model.config["overrides"]["attn"] == "math"
    out_math = model(*inputs)
    assert (out_math - out_sdpa).abs().max() < 1e-5
    assert out_sdpa.abs().max() > 1e-2  # attention actually contributed a non-trivial output


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
def test_meanflow_jvp_through_math_backend_matches_finite_differences():
    # MeanFlow's target needs du/dt along (v, 1, 0); float64 central differences are the oracle.
    model = build("MF-XS/4", input_size=16, in_channels=2, num_classes=10, depth=2, attn="math")
    model = _randomize(model).double().eval()
    x, t, h, y = _inputs(model, batch=2, dtype=torch.float64)
    v = torch.randn_like(x)
    dt, dh = torch.ones_like(t), torch.zeros_like(h)

    def fn(x_, t_, h_):
        return model(x_, t_, h_, y)

    u, du = torch.func.jvp(fn, (x, t, h), (v, dt, dh))
    assert torch.allclose(u, fn(x, t, h))
    eps = 1e-6
    fd = (fn(x + eps * v, t + eps, h) - fn(x - eps * v, t - eps, h)) / (2 * eps)
    assert (du - fd).abs().max() < 1e-6 * max(1.0, fd.abs().max().item())
    assert du.abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def test_timestep_embedding_is_analytic():
    t = torch.tensor([0.0, 0.5, 999.0], dtype=torch.float64)
    emb = timestep_embedding(t, 8)  # frequencies 10000^(-i/4), i = 0..3
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    assert torch.allclose(emb[:, :4], torch.cos(t[:, None] * freqs))
    assert torch.allclose(emb[:, 4:], torch.sin(t[:, None] * freqs))
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_flow_models_embed_1000_t_and_dit_embeds_steps():
    sit, dit = _tiny("SiT"), _tiny("DiT")
    assert sit.t_embedders[0].scale == 1000.0 and dit.t_embedders[0].scale == 1.0
    t = torch.tensor([0.25, 0.5])
    assert torch.equal(
        sit.t_embedders[0](t), sit.t_embedders[0].mlp(timestep_embedding(t * 1000, 256))
    )


def test_sincos_pos_embed_rows_and_columns():
    emb = sincos_pos_embed_2d(16, 4)  # (16 tokens, 16 dims), row-major tokens
    assert emb.shape == (16, 16)
    rows, cols = emb[:, :8], emb[:, 8:]
    # Tokens in the same row share the row half; tokens in the same column share the column half.
    assert torch.equal(rows[0], rows[3]) and not torch.equal(rows[0], rows[4])
    assert torch.equal(cols[1], cols[5]) and not torch.equal(cols[1], cols[2])
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert len({tuple(r.tolist()) for r in emb}) == 16  # every position distinct
