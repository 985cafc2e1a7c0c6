"""``dispersive extract-latents IMAGE_DIR OUT_DIR --vae PATH_OR_ID``: encode images with a VAE.

Writes sharded VAE posteriors (mean and std, unscaled) and ``OUT_DIR/meta.json`` (VAE path/ID,
scale, shapes, classes). Resumable: rerun the same command after an interruption and finished
shards are skipped. Under torchrun (``torchrun --nproc_per_node=8 -m dispersive extract-latents
...``, one or several nodes) the ranks share the shards, each on its own device; OUT_DIR must be a
folder every rank sees. Train on the result with ``data.name = "latents"``, ``data.path = OUT_DIR``,
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
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=3 * 3600.0,
        metavar="S",
        help="under torchrun: how long a rank that is done waits for the others (default 3 h)",
    )


def run(args: argparse.Namespace) -> int:
    from dispersive.data.latents import extract_latents
    from dispersive.errors import UserError
    from dispersive.train.distributed import cleanup_distributed, init_distributed

    for name in ("image_size", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # Under torchrun each rank encodes its share of the shards on cuda:LOCAL_RANK ("auto"),
    # whatever node it is on; an explicit cuda:N is taken as given.
    explicit = args.device if args.device.startswith("cuda:") else None
    info = init_distributed(device="cuda" if explicit else args.device, timeout_s=args.dist_timeout)
    try:
        result = extract_latents(
            args.image_dir,
            args.out_dir,
            vae=args.vae,
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            hflip=args.hflip,
            scale=args.scale,
            device=explicit or str(info.device),
            num_workers=args.workers,
        )
    finally:
        cleanup_distributed(info)
    if info.is_main:
        written = result.get("written_all", result["written"])
        ranks = f" by {info.world_size} ranks" if info.distributed else ""
        print(
            f"latents: {len(written)} shard(s) written{ranks}, {len(result['skipped'])} already "
            f"done, {result['num_shards']} total -> {args.out_dir}"
        )
    return 0
