"""`dispersive sample`: draw samples from a checkpoint.

    dispersive sample --ckpt runs/fmnist --sampler heun --steps 25 --num 10000 --outdir out/
    torchrun --nproc_per_node=4 -m dispersive sample --ckpt runs/fmnist --num-samples 50000 \
        --outdir out/

Writes to ``--outdir``: ``samples.npz`` (ADM-compatible: ``arr_0`` uint8 (N, H, W, C), ``arr_1``
int64 labels for class-conditional models), ``grid.png`` (the first ``--grid`` samples) and
``spec.json`` (method, steps, NFE, guidance scale and interval, seed, checkpoint step, model).

Reproducibility: samples are drawn in chunks of ``--batch-size``; chunk ``c`` uses a generator
seeded with ``seed * 1_000_003 + c`` and the labels ``(i mod num_classes)`` of its global
indices ``i`` (exactly class-balanced). Chunks are dealt round-robin to ranks, so the output is
the same for any number of ranks (given the same seed and batch size).
Grayscale samples keep C = 1 in the .npz; the ADM evaluator needs 3 channels (replicate them).
Latent models are decoded through the VAE recorded in the latents' meta.json (``data.path``),
or through ``--vae``; the latents reach the decoder unclamped and only the decoded pixels are
clamped to [-1, 1] (``spec.json``: ``"space": "latent", "decoded": true, "clamp": "pixels"``).

Official DiT / SiT checkpoints (docs/architecture.md, "Official DiT / SiT checkpoints"):

    dispersive sample --ckpt SiT-XL-2-256x256.pt --official SiT-XL/2 --vae sd-vae-ft-ema/ ...

``--official NAME`` reads ``--ckpt`` as an official file (``dispersive.models.load_official``;
EMA weights of a training dict unless ``--no-ema``); the model's kind picks the defaults
(SiT: flow on the linear path; DiT: DDPM), and ``--vae`` is required to decode its latents.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a checkpoint file or a run directory (latest)")
    p.add_argument("--outdir", required=True, help="output folder")
    p.add_argument(
        "--num",
        "--num-samples",
        dest="num",
        type=int,
        default=None,
        help="number of samples (default: 64); under torchrun spell it --num-samples, since "
        "torchrun reads --num as an ambiguous abbreviation of its own --numa-binding",
    )
    p.add_argument("--sampler", default=None, help="default: the run config's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: sample.cfg_scale")
    p.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("T_LO", "T_HI"),
        help="apply guidance for t in [T_LO, T_HI] (default: sample.cfg_interval)",
    )
    p.add_argument(
        "--cfg-channels",
        type=int,
        default=None,
        metavar="N",
        help="guide the first N sample channels only, the rest conditional; 0 = all (default: "
        "sample.cfg_channels; official DiT / SiT guide 3 of 4 latent channels)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sampler option as a TOML literal, repeatable: --option rtol=1e-4 (dopri5), "
        "--option final_euler=false (heun), --option last_step=0.0 (euler_maruyama); default: "
        "sample.options when --sampler is the run's sample.sampler",
    )
    p.add_argument("--seed", type=int, default=None, help="default: the run's sample.seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--grid", type=int, default=64, help="samples shown in grid.png (0 = none)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of EMA")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--official",
        metavar="NAME",
        default=None,
        help="--ckpt is an official DiT / SiT checkpoint of this model (e.g. SiT-XL/2)",
    )
    p.add_argument("--sha256", default=None, help="verify the --official file's sha256 first")
    p.add_argument(
        "--vae",
        default=None,
        help="decode latents through this VAE (local folder or cached Hugging Face ID); "
        "default: the one in the run's latents meta.json",
    )


def _official(args: argparse.Namespace, device) -> tuple:
    """An official checkpoint: the model and a stand-in for the run config it lacks."""
    from dispersive.errors import UserError
    from dispersive.models import load_official

    if not args.vae:
        raise UserError(
            "--official models make VAE latents; give --vae PATH_OR_ID (e.g. a local copy of "
            "stabilityai/sd-vae-ft-ema, the VAE of the published DiT / SiT numbers)"
        )
    weights = "model" if args.no_ema else "ema"
    model = load_official(args.official, args.ckpt, weights=weights, sha256=args.sha256)
    model.to(device).requires_grad_(False)
    kind = model.kind  # SiT: flow, linear path; DiT: DDPM with learned variance
    config = {
        "model": {"name": args.official, "official": True, "weights": weights},
        "objective": {"kind": kind, "path": "linear"},
        # Guidance on 3 of the 4 latent channels, as official forward_with_cfg (their FIDs).
        "sample": {
            "sampler": "ddpm" if kind == "ddpm" else "heun",
            "steps": 250,
            "cfg_channels": 3,
        },
        "data": {"name": "latents"},
    }
    return model, config, None


def _decoder(config: dict, device, vae_id: str | None = None):
    """For latent runs, a function z -> images through ``vae_id`` or the recorded VAE."""
    data = config.get("data", {})
    if data.get("name") != "latents":
        return None, None
    from dispersive.data.latents import (
        SD_VAE_SCALE,
        decode_latents,
        load_vae,
        load_vae_from_meta,
        read_meta,
    )

    if vae_id:  # official DiT / SiT: the Stable Diffusion VAE's scale 0.18215
        scale = float(read_meta(data["path"])["scale"]) if data.get("path") else SD_VAE_SCALE
        vae = load_vae(vae_id, device=device)
        return (lambda z: decode_latents(vae, z, scale=scale)), vae_id
    vae, scale = load_vae_from_meta(data["path"], device=device)
    meta = read_meta(data["path"])
    return (lambda z: decode_latents(vae, z, scale=scale)), meta.get("vae")


def _options(items: list[str]) -> dict:
    """``["rtol=1e-4", "final_euler=false"]`` -> ``{"rtol": 0.0001, "final_euler": False}``."""
    import tomllib

    from dispersive.errors import UserError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except (ValueError, tomllib.TOMLDecodeError):
            raise UserError(
                f"--option {item!r} must be KEY=VALUE with a TOML value, e.g. --option rtol=1e-4 "
                "or --option final_euler=false"
            ) from None
    return out


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dispersive.errors import UserError
    from dispersive.eval.io import save_grid, save_npz, to_uint8
    from dispersive.generate import SAMPLER_OPTIONS, generate
    from dispersive.train.checkpoint import load_model, resolve_checkpoint
    from dispersive.train.distributed import barrier, cleanup_distributed, init_distributed

    info = init_distributed(device=args.device)
    try:
        if args.official:
            model, config, step = _official(args, info.device)
        else:
            model, config, step = load_model(
                args.ckpt, ema=not args.no_ema, map_location=info.device
            )
        sc = config.get("sample", {})
        sampler = args.sampler or sc.get("sampler", "heun")
        # The run's options belong to the run's sampler; another --sampler starts from defaults.
        options = dict(sc.get("options", {})) if sampler == sc.get("sampler", "heun") else {}
        options.update(_options(args.option))
        valid = SAMPLER_OPTIONS.get(sampler, {})
        if set(options) - set(valid):
            raise UserError(
                f"unknown option(s) {sorted(set(options) - set(valid))} for sampler {sampler!r}; "
                f"valid options: {sorted(valid) or 'none'}"
            )
        steps = args.steps if args.steps is not None else int(sc.get("steps", 25))
        cfg_scale = args.cfg_scale if args.cfg_scale is not None else float(sc.get("cfg_scale", 1))
        cfg_interval = tuple(args.cfg_interval or sc.get("cfg_interval", (0.0, 1.0)))
        cfg_channels = (
            args.cfg_channels if args.cfg_channels is not None else int(sc.get("cfg_channels", 0))
        )
        seed = args.seed if args.seed is not None else int(sc.get("seed", 0))
        num = args.num if args.num is not None else 64
        path = config.get("objective", {}).get("path", "linear")
        if num < 1 or args.batch_size < 1:
            raise UserError("--num and --batch-size must be >= 1")
        if not 0 <= cfg_channels <= int(model.in_channels):
            raise UserError(
                f"--cfg-channels {cfg_channels} must be in [0, {int(model.in_channels)}] (the "
                "model's channels; 0 = all)"
            )
        ncls = int(getattr(model, "num_classes", 0) or 0)
        decode, vae_id = _decoder(config, info.device, args.vae)

        outdir = Path(args.outdir)
        shard_dir = outdir / "shards"
        if info.is_main:
            shard_dir.mkdir(parents=True, exist_ok=True)
        barrier()

        chunks = list(range((num + args.batch_size - 1) // args.batch_size))
        mine = chunks[info.rank :: info.world_size]
        t0 = time.time()
        spec: dict = {}
        for c in mine:
            lo, hi = c * args.batch_size, min(num, (c + 1) * args.batch_size)
            gen = torch.Generator(device=info.device).manual_seed(seed * 1_000_003 + c)
            labels = torch.arange(lo, hi, device=info.device) % ncls if ncls > 0 else None
            images, spec = generate(
                model,
                num=hi - lo,
                sampler=sampler,
                steps=steps,
                cfg_scale=cfg_scale,
                cfg_interval=cfg_interval,
                cfg_channels=cfg_channels or None,
                options=options,
                labels=labels,
                path=path,
                generator=gen,
                batch_size=args.batch_size,
                device=info.device,
                space="pixel" if decode is None else "latent",
                decode=decode,  # latents go to the VAE unclamped; generate() clamps the pixels
            )
            lab = labels.cpu().numpy() if labels is not None else None
            save_npz(shard_dir / f"chunk-{c:06d}.npz", to_uint8(images), lab)
            if "nfe_per_batch" in spec:  # adaptive: the main rank sums every chunk's NFE
                (shard_dir / f"chunk-{c:06d}.nfe.json").write_text(
                    json.dumps(spec["nfe_per_batch"])
                )
            if info.is_main:
                print(f"chunk {c + 1}/{len(chunks)}  ({time.time() - t0:.0f}s)", flush=True)
        barrier()

        if info.is_main:
            arrs, labs = [], []
            for c in chunks:
                with np.load(shard_dir / f"chunk-{c:06d}.npz", allow_pickle=False) as z:
                    arrs.append(z["arr_0"])
                    if "arr_1" in z.files:
                        labs.append(z["arr_1"])
            if "nfe_per_batch" in spec:
                per_batch = []
                for c in chunks:
                    nfe_file = shard_dir / f"chunk-{c:06d}.nfe.json"
                    per_batch += json.loads(nfe_file.read_text())
                    nfe_file.unlink()
                mean = sum(per_batch) / len(per_batch)
                nfe = int(mean) if mean == int(mean) else round(mean, 2)
                spec = {**spec, "nfe": nfe, "nfe_per_batch": per_batch}
            images_u8 = np.concatenate(arrs)
            labels_all = np.concatenate(labs) if labs else None
            npz = save_npz(outdir / "samples.npz", images_u8, labels_all)
            if args.grid > 0:
                save_grid(outdir / "grid.png", images_u8[: args.grid])
            for c in chunks:
                (shard_dir / f"chunk-{c:06d}.npz").unlink()
            shard_dir.rmdir()
            full_spec = {
                **spec,
                "method": spec.get("method", sampler),
                "steps": spec.get("steps", steps),
                "cfg_scale": spec.get("cfg_scale", cfg_scale),
                "cfg_interval": list(spec.get("cfg_interval", cfg_interval)),
                "seed": seed,
                "seeding": "chunk c: seed * 1000003 + c; labels i mod num_classes",
                "batch_size": args.batch_size,
                "num": num,
                "checkpoint": str(resolve_checkpoint(args.ckpt)),
                "checkpoint_step": step,
                "ema": not args.no_ema,
                "model": config.get("model", {}).get("name", type(model).__name__),
                "official": bool(args.official),
                "path": path,
                "vae": vae_id,
                "world_size": info.world_size,
                "seconds": round(time.time() - t0, 1),
            }
            (outdir / "spec.json").write_text(json.dumps(full_spec, indent=2) + "\n")
            print(f"wrote {npz} ({images_u8.shape}), grid.png and spec.json", flush=True)
            print(json.dumps(full_spec))
        barrier()
    finally:
        cleanup_distributed(info)
    return 0
