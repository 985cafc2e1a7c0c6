"""Sample files: [-1, 1] tensors <-> uint8 arrays, ADM-style .npz, image folders, PNG grids.

Conventions:
- Float images are in [-1, 1], (N, C, H, W). uint8 images are (N, H, W, C) ("NHWC"), as in the
  ADM evaluator's .npz files (key ``arr_0``). The mapping is ``round((x + 1) * 127.5)`` clamped
  to [0, 255], and back ``u / 127.5 - 1``.
- Grayscale samples are stored with C = 1. The ADM evaluator (TensorFlow Inception) expects
  3 channels: replicate them (``np.repeat(arr, 3, axis=-1)``) before using its script;
  ``dispersive eval --features inception`` does this itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dispersive.atomic import atomic_write
from dispersive.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "to_uint8",
    "from_uint8",
    "save_npz",
    "load_npz",
    "save_image_folder",
    "load_image_folder",
    "load_images",
    "make_grid",
    "save_grid",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(images: Tensor) -> np.ndarray:
    """Float images (N, C, H, W) in [-1, 1] -> uint8 array (N, H, W, C)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float32)
    u = torch.round((x + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """uint8 array (N, H, W, C) -> float32 images (N, C, H, W) in [-1, 1]."""
    _check_nhwc(images, "images")
    return (
        torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1
    )


def _check_nhwc(arr: np.ndarray, where: str) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise UserError(f"{where}: expected a uint8 array (N, H, W, C); got dtype {got}")
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UserError(
            f"{where}: expected shape (N, H, W, C) with C = 1 or 3 (NHWC); got {arr.shape}"
        )


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write an ADM-compatible .npz: ``arr_0`` uint8 (N, H, W, C), optional ``arr_1`` labels (N,).

    Written to a temporary file and renamed, so readers never see half a file.
    """
    _check_nhwc(images, "save_npz")
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"sample file {str(path)!r} must end in .npz")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},); got {labels.shape}")
        arrays["arr_1"] = labels
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | Path) -> np.ndarray:
    """Read ``arr_0`` (uint8 NHWC) from an .npz without unpickling anything."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sample file {str(p)!r} not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise UserError(
                    f"{str(p)!r} has no 'arr_0' array (keys: {', '.join(z.files) or 'none'}); "
                    "sample files are ADM-style .npz with arr_0 uint8 (N, H, W, C)"
                )
            arr = z["arr_0"]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {str(p)!r} as an .npz file: {e}") from None
    _check_nhwc(arr, str(p))
    return arr


def save_image_folder(folder: str | Path, images: np.ndarray, *, start: int = 0) -> list[Path]:
    """Write each image as a lossless PNG ``{index:06d}.png``; returns the paths."""
    from PIL import Image

    _check_nhwc(images, "save_image_folder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = folder / f"{start + i:06d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(p)
        paths.append(p)
    return paths


def load_image_folder(folder: str | Path) -> np.ndarray:
    """Read every image file in a folder (sorted by name) as uint8 (N, H, W, C).

    Grayscale files give C = 1, colour files C = 3; all images must share one size and mode.
    """
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {str(folder)!r}")
    out = []
    for p in files:
        with Image.open(p) as im:
            gray = im.mode in ("L", "I;16", "1") or (im.mode == "P" and _palette_is_gray(im))
            a = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
        out.append(a[..., None] if a.ndim == 2 else a)
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise UserError(
            f"images in {str(folder)!r} differ in size or channels: {sorted(shapes)[:4]}; "
            "resize them to one size first"
        )
    return np.stack(out)


def _palette_is_gray(im) -> bool:
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def load_images(path: str | Path) -> np.ndarray:
    """Load a sample set: an .npz (``arr_0``) or a folder of images -> uint8 (N, H, W, C)."""
    p = Path(path)
    if p.is_dir():
        return load_image_folder(p)
    if p.suffix == ".npz":
        return load_npz(p)
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} not found (expected an .npz file or image folder)")
    raise UserError(f"{str(p)!r} is neither an .npz file nor a folder of images")


def make_grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one uint8 image (H', W', C), ``nrow`` per row."""
    _check_nhwc(images, "make_grid")
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def save_grid(path: str | Path, images: np.ndarray, *, nrow: int | None = None) -> Path:
    """Write a PNG grid of uint8 images (N, H, W, C)."""
    from PIL import Image

    g = make_grid(images, nrow=nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(path)
    return path
