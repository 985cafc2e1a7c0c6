"""SiT and DiT: latent diffusion transformers with adaLN-Zero conditioning.

Organisation (as DiT's ``models.py``): helpers live in ``layers.py``; this file has the block,
the final layer, the shared backbone, the two models and their sizes (paper Table 8).

- SiT (flow, velocity prediction): ``model(x, t, y) -> v`` (B, C, H, W); t in [0, 1] with
  data at t=0 (``dispersive.paths``), embedded as 1000 * t. Built with the official SiT's
  conventions (``time_origin="noise"``, ``time_scale=1``, ``learn_sigma=True``,
  ``pos_embed="wh"``; see ``dispersive.models.official``) the network inside is the released
  SiT, and ``forward`` still speaks this package's time and velocity.
- DiT (DDPM): ``model(x, k, y) -> (B, 2C, H, W)``: epsilon, then the learned-variance
  interpolation values v in [-1, 1] (raw network output; the objective maps it); k are integer
  steps 0..999 given as floats and embedded directly.

Feature taps: ``blocks`` is a ModuleList, so "blocks.0" .. "blocks.{depth-1}" (and "blocks.-1")
name the residual stream (B, T, D) after each block; ``block_names`` lists them in order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dispersive.models.layers import (
    FLOW_TIME_SCALE,
    POS_EMBED_ORDERS,
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    check_attn_backend,
    check_labels,
    check_time,
    modulate,
    sincos_pos_embed_2d,
)
from dispersive.paths import to_sit_time

__all__ = [
    "TransformerBlock",
    "FinalLayer",
    "DiffusionTransformer",
    "SiT",
    "DiT",
    "SIZES",
    "TIME_ORIGINS",
]

# Where SiT's network time is 0: "data" (this package's t) or "noise" (official SiT's 1 - t).
TIME_ORIGINS = ("data", "noise")


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the conditioning vector c regresses a shift,
    a scale and a gate for both the attention and the MLP branch; the gates start at zero, so
    the block starts as the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, T, D), c (B, D) -> (B, T, D)."""
        mod = self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its p x p x C_out patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, T, D), c (B, D) -> (B, T, p * p * C_out)."""
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------


class DiffusionTransformer(nn.Module):
    """The backbone shared by SiT, DiT and MeanFlow; subclasses define ``forward``.

    Args:
        input_size: H = W of the input (pixels or latent cells).
        in_channels: C of the input.
        out_channels: channels of the output (C, or 2C for DiT with learned variance).
        num_classes: number of classes; 0 = unconditional (no label embedder). The label
            table has num_classes + 1 rows; row num_classes is the null label.
        hidden_size, depth, num_heads, patch_size, mlp_ratio: the architecture (Table 8).
        attn: attention backend, "sdpa" or "math".
        num_times: how many scalar time inputs are embedded and summed into c (1, or 2 for
            MeanFlow's t and h).
        time_scale: multiplies each time before its sinusoidal embedding.
        pos_embed: channel order of the fixed 2-D sin-cos positional embedding, "hw" (row
            first; default) or "wh" (column first, as the official DiT / SiT weights need).
    """

    kind: str = ""
    config: dict[str, Any] | None = None  # set by dispersive.models.build

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        out_channels: int,
        num_classes: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        mlp_ratio: float = 4.0,
        attn: str = "sdpa",
        num_times: int = 1,
        time_scale: float = 1.0,
        pos_embed: str = "hw",
    ):
        super().__init__()
        for name, value in [
            ("input_size", input_size),
            ("in_channels", in_channels),
            ("hidden_size", hidden_size),
            ("depth", depth),
            ("num_heads", num_heads),
            ("patch_size", patch_size),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                f"num_classes must be an integer >= 0 (0 = unconditional); got {num_classes!r}"
            )
        if input_size % patch_size:
            divisors = [p for p in range(1, input_size + 1) if input_size % p == 0]
            raise ValueError(
                f"patch_size={patch_size} does not divide input_size={input_size}; "
                f"choose a patch size among {divisors}"
            )
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if hidden_size % 4:
            raise ValueError(
                f"hidden_size must be divisible by 4 (2-D sin-cos embedding); got {hidden_size}"
            )
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive; got {mlp_ratio!r}")
        if pos_embed not in POS_EMBED_ORDERS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_ORDERS}; got {pos_embed!r}")
        check_attn_backend(attn)

        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.grid_size = input_size // patch_size
        self.pos_embed_order = pos_embed

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedders = nn.ModuleList(
            TimestepEmbedder(hidden_size, scale=time_scale) for _ in range(num_times)
        )
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        # Fixed, not learned, and cheap to recompute: a non-persistent buffer keeps it out of
        # checkpoints while still following .to(device). Its order is in ``model.config``.
        self.register_buffer("pos_embed", self._pos_embed(), persistent=False)  # (1, T, D)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, mlp_ratio, attn) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.block_names = [f"blocks.{i}" for i in range(depth)]
        self.initialize_weights()

    def _pos_embed(self, device: torch.device | str | None = None) -> Tensor:
        emb = sincos_pos_embed_2d(self.hidden_size, self.grid_size, self.pos_embed_order)
        return emb[None].to(device)  # (1, T, D)

    def reset_buffers(self) -> None:
        """Recompute the fixed buffers (pos_embed) in place, on the device of the parameters;
        for a model materialised with ``to_empty`` (built on the meta device)."""
        self.pos_embed = self._pos_embed(self.x_embedder.proj.weight.device)

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embedders, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in self.t_embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p * p * C_out) -> (B, C_out, H, W)."""
        B, p, g, c = x.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(B, g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)

    def _check_x(self, x: Tensor) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (B, {want[0]}, {want[1]}, {want[2]}); "
                f"got {tuple(x.shape)}"
            )

    def _forward(self, x: Tensor, times: list[Tensor], y: Tensor | None) -> Tensor:
        """x (B, C, H, W), times: list of (B,), y (B,) or None -> (B, C_out, H, W)."""
        self._check_x(x)
        B = x.shape[0]
        y = check_labels(y, self.num_classes, B)
        h = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedders[0](times[0])  # (B, D)
        for emb, t in zip(self.t_embedders[1:], times[1:]):
            c = c + emb(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)  # (B, T, D)
        h = self.final_layer(h, c)  # (B, T, p * p * C_out)
        return self.unpatchify(h)  # (B, C_out, H, W)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class SiT(DiffusionTransformer):
    """Scalable Interpolant Transformer: velocity prediction for flow matching.

    ``model(x, t, y) -> v`` with x (B, C, H, W), t (B,) in [0, 1] (data at 0, noise at 1;
    embedded as 1000 * t), y (B,) long or None; returns (B, C, H, W).

    Args (beyond the backbone's, see :class:`DiffusionTransformer`):
        learn_sigma: the final layer outputs 2C channels and ``forward`` returns the first C
            (the official SiT's layout: its default ``learn_sigma=True`` trains a second half
            that no loss or sampler reads). Default False: C channels.
        time_scale: the network embeds ``time_scale * t_net`` (1000 here; 1 in official SiT).
        time_origin: what the network's own time ``t_net`` is. "data" (default):
            ``t_net = t``. "noise": ``t_net = 1 - t``, SiT's time (noise at 0, data at 1), and
            the network predicts the velocity along SiT's time, so ``forward`` returns its
            negative (``dispersive.paths.to_sit_time``). Either way ``forward`` takes this
            package's t and returns this package's velocity ``d x_t / d t``.
    """

    kind = "flow"

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        learn_sigma: bool = False,
        time_scale: float = FLOW_TIME_SCALE,
        time_origin: str = "data",
        **arch: Any,
    ):
        if not isinstance(learn_sigma, bool):
            raise ValueError(f"learn_sigma must be True or False; got {learn_sigma!r}")
        if isinstance(time_scale, bool) or not isinstance(time_scale, int | float):
            raise ValueError(f"time_scale must be a positive number; got {time_scale!r}")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be a positive number; got {time_scale!r}")
        if time_origin not in TIME_ORIGINS:
            raise ValueError(f"time_origin must be one of {TIME_ORIGINS}; got {time_origin!r}")
        self.learn_sigma = learn_sigma
        self.time_origin = time_origin
        super().__init__(
            input_size=input_size,
            in_channels=in_channels,
            out_channels=in_channels * (2 if learn_sigma else 1),
            num_classes=num_classes,
            time_scale=float(time_scale),
            **arch,
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = check_time(t, x.shape[0], "t", x)
        if self.time_origin == "noise":
            t = to_sit_time(t)
        out = self._forward(x, [t], y)  # (B, C_out, H, W)
        if self.learn_sigma:
            out = out[:, : self.in_channels]  # the unused second half
        return -out if self.time_origin == "noise" else out  # d x / d(1 - t) = -d x / d t


class DiT(DiffusionTransformer):
    """Diffusion Transformer: epsilon (and learned-variance) prediction for DDPM.

    ``model(x, k, y)`` with k (B,) float integer steps 0..999, embedded directly. Returns
    (B, 2C, H, W) (epsilon, then the variance interpolation values) with ``learn_sigma=True``,
    else (B, C, H, W) (epsilon only).
    """

    kind = "ddpm"

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        learn_sigma: bool = True,
        **arch: Any,
    ):
        if not isinstance(learn_sigma, bool):
            raise ValueError(f"learn_sigma must be True or False; got {learn_sigma!r}")
        self.learn_sigma = learn_sigma
        super().__init__(
            input_size=input_size,
            in_channels=in_channels,
            out_channels=in_channels * (2 if learn_sigma else 1),
            num_classes=num_classes,
            time_scale=1.0,
            **arch,
        )

    def forward(self, x: Tensor, k: Tensor, y: Tensor | None = None) -> Tensor:
        return self._forward(x, [check_time(k, x.shape[0], "k", x)], y)


# ----------------------------------------------------------------------------------------------
# Sizes: (hidden_size, depth, num_heads). S..XL from paper Table 8; T and XS are small
# sizes for CPU work built from the same code.
# ----------------------------------------------------------------------------------------------

SIZES: dict[str, dict[str, int]] = {
    "XS": dict(hidden_size=64, depth=4, num_heads=4),
    "T": dict(hidden_size=128, depth=6, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
# Patch sizes registered per size: the paper's 2/4/8, and 2/4/7 for the CPU sizes (7 fits 28x28).
PATCHES: dict[str, tuple[int, ...]] = {
    "XS": (2, 4, 7),
    "T": (2, 4, 7),
    "S": (2, 4, 8),
    "B": (2, 4, 8),
    "L": (2, 4, 8),
    "XL": (2, 4, 8),
}
