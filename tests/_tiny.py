"""Tiny random diffusers models shared by tests (seeded, built in milliseconds, no download)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_vae(path: Path, sample_size: int) -> Path:
    """Save a random AutoencoderKL (seed 0; RGB -> 4 latent channels, downsampling by 2) at
    ``path`` in diffusers' format, and return ``path``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
    ).save_pretrained(path)
    return path


def tiny_unet2d(channels: int, *, attention: bool) -> torch.nn.Module:
    """A random diffusers UNet2DModel (seed 0) on 8x8 images with two resolution levels; with
    ``attention``, the inner level's blocks carry self-attention."""
    from diffusers import UNet2DModel

    inner = ("AttnDownBlock2D", "AttnUpBlock2D") if attention else ("DownBlock2D", "UpBlock2D")
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", inner[0]),
        up_block_types=(inner[1], "UpBlock2D"),
        **({"attention_head_dim": 8} if attention else {}),
    )
