"""Pre-extracted VAE latents: extraction (sharded, resumable) and the training dataset.

Layout of an output folder written by :func:`extract_latents`::

    OUT_DIR/meta.json            VAE path/ID, scale, image size, latent shape, classes, ...
    OUT_DIR/shard-00000/         one folder per shard, renamed into place when complete
        mean.npy  std.npy        float32 (n, C, h, w): the VAE posterior N(mean, std^2), UNSCALED
        labels.npy index.npy     int64 (n,): class labels and global image indices
        mean_flip.npy ...        the same for horizontally flipped images (``--hflip``)

Where the scale is applied: shards hold the raw posterior of ``AutoencoderKL.encode``; the
training dataset (:class:`LatentDataset`) samples ``z = scale * (mean + std * eps)`` with
``scale = meta["scale"]`` (0.18215 for the Stable Diffusion VAE, as in DiT/SiT), so models see
roughly unit-variance latents. To decode samples: ``vae.decode(z / scale)``
(:func:`decode_latents`).

Shards are written into ``shard-XXXXX.tmp/`` and renamed when every file is on disk (fsync),
so an interrupted extraction leaves no half-written shard; a rerun deletes stale ``.tmp``
folders and skips finished shards. Every ``.npy`` is read with ``allow_pickle=False``.

Under torchrun (``torchrun --nproc_per_node=8 -m dispersive extract-latents ...``, also over
several nodes) the shards still to do are dealt round-robin to the ranks: rank 0 alone removes
stale temporaries and writes meta.json (before any shard, and once every rank is done), each
rank writes only its own shards. OUT_DIR must be one folder that every rank sees (the same
machine, or a filesystem shared by the nodes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from torch import Tensor

from dispersive.atomic import atomic_write, fsync_dir
from dispersive.data.datasets import (  # the reading side of a latent folder is a dataset
    LATENT_FORMAT,
    META_NAME,
    ImageFolderDataset,
    LatentDataset,
    latent_shard_name,
    read_meta,
)
from dispersive.errors import UserError

__all__ = [
    "SD_VAE_SCALE",
    "META_NAME",
    "load_vae",
    "read_meta",
    "extract_latents",
    "LatentDataset",
    "load_vae_from_meta",
    "decode_latents",
]

SD_VAE_SCALE = 0.18215  # Stable Diffusion VAE latent scale (DiT / SiT)
_KEYS = ("mean", "std")


def load_vae(path_or_id: str, *, device: str | torch.device = "cpu") -> Any:
    """Load a diffusers ``AutoencoderKL`` from a local folder or the local Hugging Face cache.

    Never touches the network (``local_files_only=True``).

    Raises:
        UserError: diffusers is missing, or the VAE is neither a local folder nor cached.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError(
            "extracting latents needs diffusers: pip install 'dispersive[latents]'"
        ) from None
    local = Path(path_or_id).expanduser()
    src = str(local) if local.exists() else path_or_id
    if local.exists() and not (local / "config.json").is_file():
        if (local / "vae" / "config.json").is_file():
            src = str(local / "vae")  # a full Stable Diffusion folder: use its vae/
        else:
            raise UserError(
                f"--vae {path_or_id}: no config.json in that folder; point it at a folder saved "
                "with AutoencoderKL.save_pretrained (or a diffusers model's vae/ folder)"
            )
    try:
        # low_cpu_mem_usage=False: the default asks for `accelerate` and warns when it is absent.
        vae = AutoencoderKL.from_pretrained(src, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        if local.exists():
            raise UserError(f"cannot load the VAE from {local}: {str(e).splitlines()[0]}") from None
        raise UserError(
            f"VAE '{path_or_id}' is not a local folder and not in the Hugging Face cache (no "
            f"download is attempted); fetch it by hand, e.g. `huggingface-cli download "
            f"{path_or_id} --local-dir vae/`, and pass --vae vae/"
        ) from None
    return vae.to(device).eval().requires_grad_(False)


def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def _save_shard(out_dir: Path, k: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one shard into a temporary folder, fsync, then rename it into place."""
    final = out_dir / latent_shard_name(k)
    tmp = out_dir / (latent_shard_name(k) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, arr in arrays.items():
        with open(tmp / f"{name}.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(out_dir)


@torch.no_grad()
def extract_latents(
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    vae: str,
    image_size: int = 256,
    batch_size: int = 32,
    shard_size: int = 1024,
    hflip: bool = False,
    scale: float = SD_VAE_SCALE,
    device: str = "cpu",
    num_workers: int = 0,
    max_shards: int | None = None,
    progress: bool = True,
) -> dict:
    """Encode a class-subfolder image folder with a VAE into resumable shards.

    Runs as one process, or on every rank of an initialised ``torch.distributed`` group, which
    then shares the work (see the module docstring); every rank must call it.

    Args:
        image_dir: ``IMAGE_DIR/<class>/<image>``; images are ADM-centre-cropped to image_size.
        out_dir: output folder (created); rerunning continues an interrupted extraction.
        vae: local folder or Hugging Face ID (resolved from the local cache only).
        image_size: pixel size fed to the VAE (latents are image_size / 8 for the SD VAE).
        batch_size: images per VAE forward.
        shard_size: images per shard.
        hflip: also store the latents of horizontally flipped images (for data.hflip).
        scale: latent scale recorded in meta.json (applied by the dataset, not stored).
        device: torch device for the VAE (this rank's device under torchrun).
        num_workers: DataLoader workers decoding images.
        max_shards: stop after writing this many new shards per rank (for tests and partial
            runs).
        progress: print one line per shard.

    Returns:
        ``{"written": [...], "skipped": [...], "num_shards": K, "complete": bool}``: the shards
        this process wrote, those that were already done, the total, and whether all exist.
        With several ranks also ``"written_all"``: the shards every rank wrote.

    Raises:
        UserError: missing images or VAE, or an OUT_DIR holding a different extraction.
    """
    # The ranks torchrun started (the process group is the command's; train/ is a layer above).
    group = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if group else 0
    world = torch.distributed.get_world_size() if group else 1
    out = Path(out_dir)
    ds = ImageFolderDataset(image_dir, size=image_size)
    # The file list identifies the extraction: a rerun on changed images must not mix shards.
    rel = "\n".join(str(p.relative_to(Path(image_dir))) for p in ds.files)
    files_sha = hashlib.sha256(rel.encode()).hexdigest()
    n = len(ds)
    num_shards = (n + shard_size - 1) // shard_size
    plan = {
        "format": LATENT_FORMAT,
        "version": 1,
        "vae": str(vae),
        "scale": float(scale),
        "scale_applied_by": "dataset: z = scale * (mean + std * eps); decode with vae(z / scale)",
        "image_size": image_size,
        "num_images": n,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "hflip": bool(hflip),
        "classes": ds.classes,
        "num_classes": ds.num_classes,
        "files_sha256": files_sha,
        "source": str(Path(image_dir).resolve()),
    }
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_NAME
    if meta_path.is_file():
        old = read_meta(out)
        keys = ("vae", "scale", "image_size", "num_images", "shard_size", "hflip", "files_sha256")
        diff = [k for k in keys if old.get(k) != plan[k]]
        if diff:
            raise UserError(
                f"{out} holds latents extracted with different settings ({', '.join(diff)} "
                "differ); use a new OUT_DIR or delete that one"
            )
        plan["latent_shape"] = old.get("latent_shape")
    # Every rank computes the same list: no shard is renamed into place before the barrier.
    todo = [k for k in range(num_shards) if not (out / latent_shard_name(k)).is_dir()]
    skipped = [k for k in range(num_shards) if k not in set(todo)]
    if todo:
        model = load_vae(vae, device=device)  # before the plan is recorded: a bad VAE leaves none
    if rank == 0:
        for stale in out.glob("shard-*.tmp"):  # left by an interrupted run
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        if todo:  # record the plan before the first shard lands
            _write_json_atomic(meta_path, {**plan, "complete": False})
    if world > 1:  # the stale temporaries are gone before any rank writes its shards
        torch.distributed.barrier()
    written: list[int] = []
    for k in todo[rank::world]:
        if max_shards is not None and len(written) >= max_shards:
            break
        idx = list(range(k * shard_size, min(n, (k + 1) * shard_size)))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, idx),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=lambda items: torch.from_numpy(np.stack([it[0] for it in items])),
        )
        parts: dict[str, list[np.ndarray]] = {}
        for x_uint8 in loader:
            x = (x_uint8.float() / 127.5 - 1.0).to(device)  # (B, 3, H, W) in [-1, 1]
            views = {"": x, "_flip": x.flip(-1)} if hflip else {"": x}
            for suffix, v in views.items():
                dist = model.encode(v).latent_dist
                parts.setdefault("mean" + suffix, []).append(dist.mean.float().cpu().numpy())
                parts.setdefault("std" + suffix, []).append(dist.std.float().cpu().numpy())
        arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        arrays["labels"] = ds.labels[idx].numpy().astype(np.int64)
        arrays["index"] = np.asarray(idx, dtype=np.int64)
        _save_shard(out, k, arrays)
        written.append(k)
        if progress:
            by = f" [rank {rank}]" if world > 1 else ""
            msg = f"latents: shard {k + 1}/{num_shards} ({len(idx)} images) -> {out}{by}"
            print(msg, flush=True)
    if world > 1:  # every rank's shards are in place
        torch.distributed.barrier()
    done = [k for k in range(num_shards) if (out / latent_shard_name(k)).is_dir()]
    complete = len(done) == num_shards
    if plan.get("latent_shape") is None and done:
        # The shape as written (by whichever rank): read from the first shard's .npy header.
        first_mean = out / latent_shard_name(done[0]) / "mean.npy"
        first = np.load(first_mean, mmap_mode="r", allow_pickle=False)
        plan["latent_shape"] = list(first.shape[1:])
    if rank == 0 and plan.get("latent_shape") is not None:
        _write_json_atomic(meta_path, {**plan, "complete": complete})
    result = {"written": written, "skipped": skipped, "num_shards": num_shards}
    if world > 1:
        result["written_all"] = [k for k in todo if k in set(done)]
    return {**result, "complete": complete}


def load_vae_from_meta(latent_dir: str | Path, *, device: str | torch.device = "cpu") -> Any:
    """The VAE recorded in ``latent_dir/meta.json`` and its scale: ``(vae, scale)``."""
    meta = read_meta(latent_dir)
    return load_vae(meta["vae"], device=device), float(meta["scale"])


@torch.no_grad()
def decode_latents(vae: Any, z: Tensor, *, scale: float = SD_VAE_SCALE) -> Tensor:
    """Decode scaled latents z (B, C, h, w) to images (B, 3, H, W) clamped to [-1, 1]."""
    return vae.decode(z / scale).sample.clamp(-1, 1)
