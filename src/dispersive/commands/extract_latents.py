"""``dispersive extract-latents IMAGE_DIR OUT_DIR --vae PATH_OR_ID``: encode images with a VAE.

Writes sharded VAE posteriors (mean and std, unscaled) and ``OUT_DIR/meta.json`` (VAE path/ID,
scale, shapes, classes). Resumable: rerun the same command after an interruption and finished
shards are skipped. Train on the result with ``data.name = "latents"``, ``data.path = OUT_DIR``,
``model.input_size = image_size / 8`` and ``model.in_channels = 4`` (SD VAE).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of class subfolders")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (resumable)")
    parser.add_argument(
        "--vae",
        required=True,
        metavar="PATH_OR_ID",
        help="AutoencoderKL folder, or a Hugging Face ID already in the local cache "
        "(never downloaded), e.g. stabilityai/sd-vae-ft-ema",
    )
    parser.add_argument("--image-size", type=int, default=256, help="pixel size (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per VAE forward")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    parser.add_argument(
        "--scale", type=float, default=0.18215, help="latent scale recorded in meta.json"
    )
    parser.add_argument("--hflip", action="store_true", help="also store latents of flipped images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes")


def run(args: argparse.Namespace) -> int:
    import torch

    from dispersive.errors import UserError
    from dispersive.train.latents import extract_latents

    for name in ("image_size", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = extract_latents(
        args.image_dir,
        args.out_dir,
        vae=args.vae,
        image_size=args.image_size,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        hflip=args.hflip,
        scale=args.scale,
        device=device,
        num_workers=args.workers,
    )
    print(
        f"latents: {len(result['written'])} shard(s) written, {len(result['skipped'])} already "
        f"done, {result['num_shards']} total -> {args.out_dir}"
    )
    return 0
