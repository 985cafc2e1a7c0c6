"""A UNet velocity model for small images (the flow-matching CIFAR-10 configuration).

Architecture (ADM-style): a 3x3 input convolution; per resolution level ``num_res_blocks``
residual blocks (each optionally followed by self-attention) and a 2x average-pool downsample;
a middle residual block -> attention -> residual block; a decoder mirroring the encoder with
``num_res_blocks + 1`` residual blocks per level that consume the encoder's skip activations,
with nearest-neighbour 2x upsampling; GroupNorm -> SiLU -> zero-initialised 3x3 output conv.
Residual blocks use scale-shift normalisation: GroupNorm(h) * (1 + scale) + shift, with
(scale, shift) regressed from the time (+ class) embedding.

Block names (what ``FeatureTap`` and the dispersive ``layers`` setting use): every residual
block lives in ONE ModuleList ``resblocks`` in forward order, encoder -> middle -> decoder, so

    "residual block n" of the paper (1-indexed)  ==  ``resblocks.{n-1}``  ==  ``block_names[n-1]``

and a tap records the block's output (B, C, h, w) before any attention that follows it.
For "UNet-CIFAR" (3 levels x 4 blocks): ``resblocks.0-11`` encoder (0-3 at 32x32, 4-7 at
16x16, 8-11 at 8x8), ``resblocks.12-13`` middle (8x8), ``resblocks.14-28`` decoder (14-18 at
8x8, 19-23 at 16x16, 24-28 at 32x32). The paper's residual block 15 (Appendix B.2) is thus
``resblocks.14``, the first decoder block. Attention modules are ``attn.{i}`` (after
``resblocks.{i}``).

Time: ``model(x, t, y)`` with t in [0, 1] (data at 0), embedded as 1000 * t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dispersive.models.layers import (
    FLOW_TIME_SCALE,
    attention,
    check_attn_backend,
    check_labels,
    check_time,
    timestep_embedding,
)

__all__ = ["UNet", "ResBlock", "AttnBlock", "UNET_SIZES", "UNET_PRESETS"]


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in ADM; fewer when the width is not a multiple of 32 (small CPU models).
    return nn.GroupNorm(math.gcd(32, channels), channels)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> scale-shift GN -> SiLU -> dropout -> conv3x3 (zero init), plus a
    skip path (1x1 conv when the width changes).

    Args:
        in_ch, out_ch: channels in and out.
        emb_dim: width of the conditioning embedding.
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            _norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.out_norm = _norm(out_ch)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, in_ch, h, w), emb (B, emb_dim) -> (B, out_ch, h, w)."""
        h = self.in_layers(x)  # (B, out_ch, h, w)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)  # (B, out_ch, 1, 1)
        h = torch.addcmul(shift, self.out_norm(h), 1 + scale)
        return self.skip(x) + self.out_layers(h)


class AttnBlock(nn.Module):
    """Self-attention over the h * w positions, residual, output projection zero-initialised."""

    def __init__(self, channels: int, num_heads: int, attn: str):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"UNet width {channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.backend = check_attn_backend(attn)
        self.norm = _norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, T, C)
        qkv = self.qkv(tokens).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, T, d)
        out = attention(q, k, v, self.backend).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """UNet velocity model: ``model(x, t, y) -> v`` (B, C, H, W), t (B,) in [0, 1].

    Args:
        input_size: H = W; must be divisible by 2 ** (len(channel_mult) - 1).
        in_channels: C of the input and output.
        num_classes: 0 = unconditional; otherwise a label table of num_classes + 1 rows
            (row num_classes = null label) added to the time embedding.
        model_channels: base width; level i has width model_channels * channel_mult[i].
        channel_mult: width multipliers, one per resolution level.
        num_res_blocks: residual blocks per level in the encoder (decoder: one more).
        attention_resolutions: downsampling factors (1 = full resolution, 2 = half, ...)
            at which residual blocks are followed by attention, as in ADM's UNetModel.
            None = the lowest resolution only. The middle block always has attention.
        dropout: dropout in the residual blocks.
        num_heads: attention heads.
        attn: attention backend, "sdpa" or "math".
    """

    kind = "flow"
    config: dict[str, Any] | None = None  # set by dispersive.models.build

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_res_blocks: int = 4,
        attention_resolutions: Sequence[int] | None = (2,),
        dropout: float = 0.0,
        num_heads: int = 1,
        attn: str = "sdpa",
    ):
        super().__init__()
        channel_mult = tuple(channel_mult)
        if attention_resolutions is None:
            attention_resolutions = (2 ** (len(channel_mult) - 1),)
        attention_resolutions = tuple(attention_resolutions)
        for name, value in [
            ("input_size", input_size),
            ("in_channels", in_channels),
            ("model_channels", model_channels),
            ("num_res_blocks", num_res_blocks),
            ("num_heads", num_heads),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                f"num_classes must be an integer >= 0 (0 = unconditional); got {num_classes!r}"
            )
        if not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult):
            raise ValueError(
                f"channel_mult must be a non-empty list of positive ints; got {channel_mult!r}"
            )
        factor = 2 ** (len(channel_mult) - 1)
        if input_size % factor:
            raise ValueError(
                f"input_size={input_size} must be divisible by 2**(levels-1) = {factor} for "
                f"channel_mult={list(channel_mult)}; use fewer levels or pad the input"
            )
        levels = [2**i for i in range(len(channel_mult))]
        bad = [a for a in attention_resolutions if a not in levels]
        if bad:
            raise ValueError(
                f"attention_resolutions are downsampling factors; {bad} is not one of this "
                f"UNet's levels {levels} (e.g. 2 = attention at {input_size // 2} pixels)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        check_attn_backend(attn)

        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_classes = num_classes
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        emb_dim = 4 * model_channels

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        ch = model_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        resblocks: list[ResBlock] = []
        attn_blocks: dict[str, AttnBlock] = {}
        skip_chs = [ch]

        def add(block: ResBlock, ds: int, with_attn: bool | None = None) -> None:
            # with_attn=None: attention where ds is listed in attention_resolutions.
            if with_attn or (with_attn is None and ds in attention_resolutions):
                attn_blocks[str(len(resblocks))] = AttnBlock(
                    block.out_norm.num_channels, num_heads, attn
                )
            resblocks.append(block)

        # Encoder.
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                add(ResBlock(ch, model_channels * mult, emb_dim, dropout), ds)
                ch = model_channels * mult
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                skip_chs.append(ch)  # the downsampled activation is a skip too
                ds *= 2
        # Middle: residual -> attention -> residual.
        add(ResBlock(ch, ch, emb_dim, dropout), ds, with_attn=True)
        add(ResBlock(ch, ch, emb_dim, dropout), ds, with_attn=False)
        # Decoder.
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                add(ResBlock(ch + skip_chs.pop(), model_channels * mult, emb_dim, dropout), ds)
                ch = model_channels * mult
            if level:
                ds //= 2

        self.resblocks = nn.ModuleList(resblocks)
        self.attn = nn.ModuleDict(attn_blocks)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.block_names = [f"resblocks.{i}" for i in range(len(resblocks))]
        self.depth = len(resblocks)

    def _res(self, i: int, h: Tensor, emb: Tensor) -> Tensor:
        h = self.resblocks[i](h, emb)
        key = str(i)
        if key in self.attn:
            h = self.attn[key](h)
        return h

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long or None -> v (B, C, H, W)."""
        want = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"UNet expects x of shape (B, {want[0]}, {want[1]}, {want[2]}); "
                f"got {tuple(x.shape)}"
            )
        B = x.shape[0]
        t = check_time(t, B, "t", x)
        y = check_labels(y, self.num_classes, B)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(
            timestep_embedding(t * FLOW_TIME_SCALE, self.model_channels).to(dtype)
        )  # (B, 4 * model_channels)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)

        h = self.conv_in(x)  # (B, ch, H, W)
        skips = [h]
        i = 0
        last = len(self.channel_mult) - 1
        for level in range(len(self.channel_mult)):
            for _ in range(self.num_res_blocks):
                h = self._res(i, h, emb)
                i += 1
                skips.append(h)
            if level != last:
                h = F.avg_pool2d(h, 2)  # (B, ch, h / 2, w / 2)
                skips.append(h)
        h = self._res(i + 1, self._res(i, h, emb), emb)
        i += 2
        for level in reversed(range(len(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = self._res(i, torch.cat([h, skips.pop()], dim=1), emb)
                i += 1
            if level:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (B, ch, 2h, 2w)
        return self.out(h)


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------

UNET_SIZES: dict[str, dict[str, Any]] = {
    # Flow Matching's CIFAR-10 UNet (facebookresearch/flow_matching): ~55.7M parameters.
    "CIFAR": dict(
        model_channels=128,
        channel_mult=(2, 2, 2),
        num_res_blocks=4,
        attention_resolutions=(2,),  # 16x16 for 32x32 inputs
        dropout=0.3,
        num_heads=1,
    ),
    # A small UNet for CPU runs: 28 -> 14 -> 7 or 32 -> 16 -> 8, attention at the lowest level.
    "T": dict(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=None,  # the lowest level, whatever channel_mult is
        dropout=0.0,
        num_heads=1,
    ),
}
UNET_PRESETS = UNET_SIZES  # old name ("preset" now means a TOML config in configs/)
