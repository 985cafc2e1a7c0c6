"""Building blocks shared by the transformer (SiT / DiT / MeanFlow) and UNet models.

Contents, in order: attention kernels (``sdpa`` | ``math``), sinusoidal embeddings,
the timestep / label embedders, patch embedding, the multi-head self-attention and MLP
modules, and the adaLN modulation helper.

Time embedding scaling (a choice of this package, documented once here): flow and MeanFlow
models receive t in [0, 1] and embed ``1000 * t`` (``FLOW_TIME_SCALE``), so the sinusoid
frequencies cover the same range as DiT's integer steps k in {0..999}, which DiT embeds
directly. The network itself does not care which end of [0, 1] is data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTN_BACKENDS",
    "FLOW_TIME_SCALE",
    "POS_EMBED_ORDERS",
    "attention",
    "timestep_embedding",
    "sincos_pos_embed_2d",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "modulate",
    "check_labels",
]

ATTN_BACKENDS = ("sdpa", "math")
# Channel order of the 2-D sin-cos positional embedding: "hw" = first half encodes the row (this
# package's default), "wh" = first half encodes the column (MAE's construction, used by the
# official DiT and SiT; needed to run their released weights).
POS_EMBED_ORDERS = ("hw", "wh")

# Flow models embed 1000 * t so their frequencies match DiT's integer steps (MeanFlow models embed
# the raw t and h, as the official MeanFlow code; see dispersive.models.meanflow).
FLOW_TIME_SCALE = 1000.0


def check_attn_backend(backend: str) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid choices: {ATTN_BACKENDS}")
    return backend


# ----------------------------------------------------------------------------------------------
# Attention kernels
# ----------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """Softmax attention softmax(q k^T / sqrt(d)) v.

    Args:
        q, k, v: (B, heads, T, d).
        backend: "sdpa" uses ``F.scaled_dot_product_attention`` (fused kernels, fastest);
            "math" spells the computation out with matmul + softmax, which supports
            forward-mode AD (``torch.func.jvp``, needed by MeanFlow) where the fused CPU
            kernels do not.

    Returns:
        (B, heads, T, d).
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)  # (B, heads, T, T)
        return scores.softmax(dim=-1) @ v
    raise ValueError(f"unknown attention backend {backend!r}; valid choices: {ATTN_BACKENDS}")


# ----------------------------------------------------------------------------------------------
# Sinusoidal embeddings
# ----------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / half).

    Args:
        t: (B,) time values, already scaled (e.g. 1000 * t or integer DDPM steps).
        dim: embedding width (an odd width gets one zero column).
        max_period: the lowest frequency is 1 / max_period.

    Returns:
        (B, dim), in at least float32 (float64 stays float64 for precise oracles), because
        sin/cos of arguments up to ~1000 lose digits in half precision.
    """
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half
    )  # (half,)
    args = t.to(dtype)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    # (N,) positions -> (N, dim): [sin(pos w), cos(pos w)], w_i = 10000^(-i / (dim / 2)).
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = pos.to(torch.float64)[:, None] * omega[None]  # (N, dim / 2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, order: str = "hw") -> Tensor:
    """Fixed 2-D sin-cos positional embedding (as in MAE / DiT), float32.

    Half of the channels encode the row, half the column of each token; each half is
    ``[sin(pos w), cos(pos w)]`` with ``w_i = 10000^(-i / (dim / 4))``.

    Args:
        dim: embedding width, divisible by 4.
        grid_size: tokens per side; tokens are ordered row-major.
        order: "hw" (first half: row, second half: column; this package's default) or "wh"
            (first half: column, second half: row; MAE's construction, whose grid lists w
            first, and so the official DiT / SiT checkpoints). From scratch the two train
            alike; official weights only work with "wh".

    Returns:
        (grid_size**2, dim).
    """
    if dim % 4:
        raise ValueError(
            f"sin-cos positional embedding needs hidden_size divisible by 4; got {dim}"
        )
    if order not in POS_EMBED_ORDERS:
        raise ValueError(f"unknown pos_embed order {order!r}; valid choices: {POS_EMBED_ORDERS}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # (T,)
    cols = coords.repeat(grid_size)  # (T,)
    first, second = (rows, cols) if order == "hw" else (cols, rows)
    emb = torch.cat([_sincos_1d(dim // 2, first), _sincos_1d(dim // 2, second)], dim=1)  # (T, dim)
    return emb.float()


# ----------------------------------------------------------------------------------------------
# Conditioning embedders
# ----------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Scalar time -> vector: sinusoidal features of ``scale * t`` followed by a 2-layer MLP.

    Args:
        hidden_size: output width.
        freq_dim: width of the sinusoidal features (256 as in DiT).
        scale: multiplies t before the sinusoid (``FLOW_TIME_SCALE`` for t in [0, 1],
            1 for integer DDPM steps).
    """

    def __init__(self, hidden_size: int, freq_dim: int = 256, scale: float = 1.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = float(scale)
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        """(B,) -> (B, hidden_size)."""
        freq = timestep_embedding(t * self.scale, self.freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector, with one extra row for the null label ``num_classes``.

    The null label is what classifier-free guidance uses for the unconditional branch; the
    training loop (not this module) replaces dropped labels by ``num_classes``.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        """(B,) long in [0, num_classes] -> (B, hidden_size)."""
        return self.embedding_table(y)


def check_labels(y: Tensor | None, num_classes: int, batch: int) -> Tensor | None:
    """Validate class labels against the model's contract; returns None when unconditional.

    Value checks run only for CPU tensors: on an accelerator they would force a device sync
    every forward (the embedding lookup itself still asserts on out-of-range values there).
    """
    if num_classes == 0:
        return None
    if y is None:
        raise ValueError(
            f"this model is class-conditional (num_classes={num_classes}) and needs labels y; "
            f"pass y = torch.full((B,), {num_classes}) for the null (unconditional) label"
        )
    if y.shape != (batch,):
        raise ValueError(
            f"y must have shape ({batch},) (one label per sample); got {tuple(y.shape)}"
        )
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an integer (long) tensor of class ids; got dtype {y.dtype}")
    if y.device.type == "cpu" and not torch.compiler.is_compiling() and y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}] ({num_classes} = null label); "
                f"got values in [{lo}, {hi}]"
            )
    return y


def check_time(t: Tensor | float, batch: int, name: str, like: Tensor) -> Tensor:
    """Broadcast a scalar time to (B,) and check the shape of a per-sample time."""
    if not isinstance(t, Tensor):
        t = torch.tensor(float(t), device=like.device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(
            f"{name} must have shape ({batch},) (one value per sample); got {tuple(t.shape)}"
        )
    return t


# ----------------------------------------------------------------------------------------------
# Token-level modules
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens with a strided convolution.

    (B, C, H, W) -> (B, T, D) with T = (H / p) * (W / p), tokens in row-major order, contiguous.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # The transpose alone would leave D as the outer stride, and every elementwise op after
        # it keeps that layout: the whole residual stream would be (B, D, T) in memory, each
        # LayerNorm would copy it, and each tap on a block would copy it again to flatten a
        # sample (B, T * D). One copy here makes all of them contiguous (same values: every
        # reduction downstream already ran on a contiguous copy).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, T, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Args:
        dim: token width D (divisible by ``num_heads``).
        num_heads: number of heads.
        backend: "sdpa" or "math" (see :func:`attention`); a plain attribute, so it can be
            switched after construction (``dispersive.models.set_attn_backend``).
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.backend = check_attn_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, T, d)
        out = attention(q, k, v, self.backend)  # (B, heads, T, d)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation, as DiT) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift; shift/scale broadcast against x."""
    # addcmul fuses the multiply and the add into one pass over x.
    return torch.addcmul(shift, x, 1 + scale)
