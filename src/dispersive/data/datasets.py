"""Training data: readers, datasets with a fast ``get_batch`` and a resumable batch stream.

Datasets (``build_dataset``; ``data.name``):

- ``fashion-mnist``: IDX files (``.gz`` or uncompressed), default folder
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``cifar10``: the standard python batches (``data_batch_1..5``, ``test_batch``), unpickled with
  a restricted unpickler that only builds plain containers and numpy arrays.
- ``imagefolder``: class subfolders of images, ADM centre crop to ``model.input_size``; decoded
  with PIL on demand (use :class:`BatchLoader` for worker processes).
- ``latents``: shards written by ``dispersive extract-latents`` (see ``data/latents.py``).
- ``synthetic``: deterministic class-dependent gratings, for tests.

Every dataset returns ``x`` float32 (B, C, H, W) in [-1, 1] (latents: scaled VAE latents) and
``y`` long (B,). Random horizontal flips (``data.hflip``) are drawn from the ``generator`` passed
to ``get_batch``, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dispersive.errors import UserError

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "read_idx",
    "load_fashion_mnist",
    "load_cifar10",
    "restricted_unpickle",
    "center_crop_arr",
    "list_image_folder",
    "load_image",
    "ArrayDataset",
    "ImageFolderDataset",
    "synthetic_images",
    "META_NAME",
    "LATENT_FORMAT",
    "latent_shard_name",
    "read_meta",
    "LatentDataset",
    "build_dataset",
    "BatchStream",
    "BatchLoader",
]

#: Valid ``data.name`` values (:func:`build_dataset`).
DATASETS = ("fashion-mnist", "cifar10", "imagefolder", "latents", "synthetic")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not.

    Returns:
        The array with the shape stored in the header (e.g. (N, 28, 28) uint8 for images).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number); re-download it")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise UserError(
            f"{path} is truncated or corrupt: header says {dims} ({count * dtype.itemsize} bytes) "
            f"but {len(body)} bytes follow; re-download it"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    # Both "train-images-idx3-ubyte" (Zalando) and "train-images.idx3-ubyte" spellings exist.
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            p = folder / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def load_fashion_mnist(
    path: str | Path | None = None, *, train: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Read Fashion-MNIST (or MNIST) from the four IDX files in a folder.

    Args:
        path: folder with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``; None or "" = the
            Debian package's folder ``/usr/share/datasets/fashion-mnist``.
        train: the 60k training split (True) or the 10k test split (False).

    Returns:
        images uint8 (N, 28, 28) and labels int64 (N,) in 0..9.

    Raises:
        UserError: the files are missing (with how to get them) or inconsistent.
    """
    folder = Path(path) if path else Path(FASHION_MNIST_DIR)
    prefix = "train" if train else "t10k"
    img_p = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lab_p = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img_p is None or lab_p is None:
        missing = [
            n
            for n, p in (
                (f"{prefix}-images-idx3-ubyte", img_p),
                (f"{prefix}-labels-idx1-ubyte", lab_p),
            )
            if p is None
        ]
        raise UserError(
            f"Fashion-MNIST files not found in {folder} (missing {', '.join(missing)}[.gz]); "
            "install them with `sudo apt-get install dataset-fashion-mnist` or set data.path to a "
            "folder holding the IDX files"
        )
    images = read_idx(img_p)
    labels = read_idx(lab_p)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(
            f"{img_p} should hold uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(
            f"{lab_p} holds {labels.shape} labels for {len(images)} images in {img_p}; "
            "the files do not belong together"
        )
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles, read as data, never as code)


def _numpy_global(module: str, name: str) -> Any:
    import importlib

    for mod in (module, module.replace("numpy.core", "numpy._core")):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot find {module}.{name}")


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only containers, strings, numbers and numpy arrays; refuses any other global.

    A pickle can name any importable callable (``os.system``, ``eval``...) and the default
    unpickler calls it. CIFAR batches need only numpy's array reconstruction helpers.
    """

    _NUMPY = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
    _BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "str", "int"}
    _BUILTINS |= {"float", "complex", "bool"}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NUMPY:
            return _numpy_global(module, name)
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            import builtins

            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles store bytes
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(
            f"refusing to load '{module}.{name}': data files may only contain arrays and plain "
            "containers (this file may be malicious or not a CIFAR batch)"
        )


def restricted_unpickle(path: str | Path) -> Any:
    """Unpickle a data file allowing only numpy arrays and plain containers.

    Raises:
        UserError: the file names any other global (e.g. ``os.system``) or is not a pickle.
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, struct.error) as e:
        raise UserError(f"{path} is not a readable pickle ({e}); re-download it") from None


def _get(d: dict, key: str) -> Any:
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise KeyError(key)


def load_cifar10(path: str | Path, *, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 from its python batches.

    Args:
        path: folder with ``data_batch_1..5`` and ``test_batch`` (or its parent holding
            ``cifar-10-batches-py/``).
        train: the 50k training batches (True) or the 10k test batch (False).

    Returns:
        images uint8 (N, 3, 32, 32) and labels int64 (N,).
    """
    folder = Path(path) if path else Path("cifar-10-batches-py")
    if not (folder / "test_batch").exists() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"CIFAR-10 batches not found in {folder} (missing {', '.join(missing)}); download "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it "
            "and set data.path to the cifar-10-batches-py folder"
        )
    xs, ys = [], []
    for n in names:
        batch = restricted_unpickle(folder / n)
        try:
            data = np.asarray(_get(batch, "data"))
            labels = np.asarray(_get(batch, "labels"), dtype=np.int64)
        except (KeyError, TypeError):
            raise UserError(
                f"{folder / n} is not a CIFAR-10 batch (needs 'data' and 'labels' entries)"
            ) from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(
                f"{folder / n}: 'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}"
            )
        if len(labels) != len(data):
            raise UserError(f"{folder / n}: {len(labels)} labels for {len(data)} images")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------------------------
# Image folders


def center_crop_arr(image: Any, size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side >= 2*size, BICUBIC to size, crop.

    Args:
        image: a PIL image (converted to RGB by the caller).
        size: output height and width.

    Returns:
        uint8 (size, size, C) array.
    """
    from PIL import Image

    # Repeated BOX halving is a cheap, alias-free downscale before the final BICUBIC resize.
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def list_image_folder(path: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images of a folder with one subfolder per class (sorted names -> labels 0..K-1).

    Returns:
        files (sorted by class, then path), labels int64 (N,), class names.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(
            f"image folder {root} not found; set data.path to a folder with one subfolder per class"
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        found = sorted(
            p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        files += found
        labels += [k] * len(found)
    if not files:
        raise UserError(
            f"no images found in class subfolders of {root} (expected {root}/<class>/<image> "
            f"with extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files, np.asarray(labels, dtype=np.int64), classes


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one image as RGB and ADM-centre-crop it: uint8 (3, size, size)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = center_crop_arr(im.convert("RGB"), size)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------------
# Datasets


def _as_index(indices: np.ndarray | Tensor | Sequence[int]) -> Tensor:
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
    if idx.ndim != 1 or idx.dtype.is_floating_point:
        raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {tuple(idx.shape)}")
    return idx.long()


def _flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Flip each sample horizontally with probability 1/2 (one draw per sample)."""
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


class ArrayDataset:
    """An in-memory dataset: one index op per batch.

    Args:
        images: uint8 (N, C, H, W) (mapped to [-1, 1]) or float32 (N, C, H, W) already in range.
        labels: int64 (N,).
        num_classes: number of classes.
        hflip: random horizontal flips in ``get_batch``.
    """

    def __init__(
        self,
        images: np.ndarray | Tensor,
        labels: np.ndarray | Tensor,
        *,
        num_classes: int,
        hflip: bool = False,
    ) -> None:
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels).long()
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"images must be (N, C, H, W) with N labels, got {tuple(self.images.shape)} and "
                f"{tuple(self.labels.shape)}"
            )
        self.num_classes = int(num_classes)
        self.hflip = hflip
        self.image_shape = tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(
        self, indices: np.ndarray | Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Gather a batch.

        Args:
            indices: (B,) integer indices.
            generator: draws the flips (only used when hflip is on).

        Returns:
            x float32 (B, C, H, W) in [-1, 1], y long (B,).
        """
        idx = _as_index(indices)
        x = self.images[idx]
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        if self.hflip:
            x = _flip(x, generator)
        return x, self.labels[idx]


class ImageFolderDataset:
    """Class-subfolder images decoded with PIL on demand (ADM centre crop to ``size``).

    ``dataset[i]`` returns (uint8 (3, size, size) array, label) for DataLoader workers
    (see :class:`BatchLoader`); ``get_batch`` decodes in the calling process.
    """

    def __init__(self, path: str | Path, *, size: int, hflip: bool = False) -> None:
        self.files, labels, self.classes = list_image_folder(path)
        self.labels = torch.as_tensor(labels)
        self.size = size
        self.hflip = hflip
        self.num_classes = len(self.classes)
        self.image_shape = (3, size, size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return load_image(self.files[i], self.size), int(self.labels[i])

    def to_float(self, x_uint8: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 (B, 3, H, W) -> float32 in [-1, 1], flipped if hflip (draws from generator)."""
        x = x_uint8.float() / 127.5 - 1.0
        return _flip(x, generator) if self.hflip else x

    def get_batch(
        self, indices: np.ndarray | Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Decode a batch: x float32 (B, 3, size, size) in [-1, 1], y long (B,)."""
        idx = _as_index(indices)
        x = torch.from_numpy(np.stack([load_image(self.files[i], self.size) for i in idx.tolist()]))
        return self.to_float(x, generator), self.labels[idx]


def synthetic_images(
    n: int, *, size: int, channels: int, num_classes: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Deterministic class-dependent gratings: something a model can learn in seconds.

    Class k is a cosine grating with orientation pi k / K and frequency 1 + (k mod 3) cycles per
    image; each sample gets a random phase and amplitude in [0.6, 1.0], channels are scaled
    copies, plus Gaussian noise of std 0.05.

    Returns:
        images float32 (n, channels, size, size) in [-1, 1], labels long (n,).
    """
    g = torch.Generator().manual_seed(seed)
    k = max(num_classes, 1)
    y = torch.randint(0, k, (n,), generator=g)
    theta = torch.pi * y.double() / k
    freq = 1.0 + (y % 3).double()
    phase = 2 * torch.pi * torch.rand(n, generator=g, dtype=torch.float64)
    amp = 0.6 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64)
    grid = torch.arange(size, dtype=torch.float64) / size
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    proj = xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None]
    wave = amp[:, None, None] * torch.cos(
        2 * torch.pi * freq[:, None, None] * proj + phase[:, None, None]
    )
    chan = (
        torch.linspace(1.0, 0.5, channels, dtype=torch.float64) if channels > 1 else torch.ones(1)
    )
    x = wave[:, None] * chan.double()[None, :, None, None]
    x = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.clamp(-1, 1).float(), y


# ----------------------------------------------------------------------------------------------
# Latents written by `dispersive extract-latents` (data/latents.py): the reading side

META_NAME = "meta.json"
LATENT_FORMAT = "dispersive-latents"


def latent_shard_name(k: int) -> str:
    """The folder of shard ``k`` in a latent folder."""
    return f"shard-{k:05d}"


def read_meta(path: str | Path) -> dict:
    """Read ``OUT_DIR/meta.json`` of an extraction (raises UserError with the fix if absent)."""
    p = Path(path) / META_NAME
    if not p.is_file():
        raise UserError(
            f"no latents in {path} ({META_NAME} missing); create them with "
            f"`dispersive extract-latents IMAGE_DIR {path} --vae PATH_OR_ID`"
        )
    with open(p) as f:
        meta = json.load(f)
    if meta.get("format") != LATENT_FORMAT:
        raise UserError(f"{p} is not a {LATENT_FORMAT} meta file")
    return meta


class LatentDataset:
    """Latents written by ``dispersive extract-latents``, memory-mapped shard by shard.

    ``get_batch`` samples ``z = scale * (mean + std * eps)`` with ``eps`` from the generator, so a
    resumed run draws the same latents. With ``hflip`` each sample uses the latents of the
    flipped image with probability 1/2 (the flip draws come before the eps draws).

    Args:
        path: the extraction's OUT_DIR.
        hflip: use the stored flipped latents (needs ``extract-latents --hflip``).
    """

    def __init__(self, path: str | Path, *, hflip: bool = False) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if not self.meta.get("complete"):
            raise UserError(
                f"the latents in {path} are incomplete (an extraction was interrupted); rerun "
                f"the same `dispersive extract-latents ... {path}` command to finish it"
            )
        if hflip and not self.meta.get("hflip"):
            raise UserError(
                f"data.hflip = true but the latents in {path} have no flipped copies; "
                "re-extract with `dispersive extract-latents --hflip` or set data.hflip = false"
            )
        self.hflip = hflip
        self.scale = float(self.meta["scale"])
        self.shard_size = int(self.meta["shard_size"])
        self.num_classes = int(self.meta["num_classes"])
        self.image_shape = tuple(int(s) for s in self.meta["latent_shape"])
        names = ["mean", "std"] + (["mean_flip", "std_flip"] if hflip else [])
        self._shards: list[dict[str, np.ndarray]] = []
        labels = []
        for k in range(int(self.meta["num_shards"])):
            d = self.path / latent_shard_name(k)
            try:
                shard = {
                    nm: np.load(d / f"{nm}.npy", mmap_mode="r", allow_pickle=False) for nm in names
                }
                labels.append(np.load(d / "labels.npy", allow_pickle=False))
            except FileNotFoundError as e:
                raise UserError(
                    f"latent shard file missing: {e.filename}; rerun extract-latents into {path}"
                ) from None
            self._shards.append(shard)
        self.labels = torch.from_numpy(np.concatenate(labels)).long()
        if len(self.labels) != int(self.meta["num_images"]):
            raise UserError(
                f"{path}: shards hold {len(self.labels)} latents but meta.json says "
                f"{self.meta['num_images']}; re-extract into a new folder"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(
        self, indices: np.ndarray | Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Sample scaled latents: x float32 (B, C, h, w), y long (B,)."""
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
        idx = idx.long()
        b = len(idx)
        flip = (
            torch.rand(b, generator=generator) < 0.5 if self.hflip else torch.zeros(b, dtype=bool)
        )
        mean = np.empty((b, *self.image_shape), dtype=np.float32)
        std = np.empty_like(mean)
        shard_of = (idx // self.shard_size).numpy()
        local = (idx % self.shard_size).numpy()
        for k in np.unique(shard_of):
            rows = np.nonzero(shard_of == k)[0]
            for f in (False, True) if self.hflip else (False,):
                sel = rows[flip.numpy()[rows] == f]
                if len(sel) == 0:
                    continue
                sfx = "_flip" if f else ""
                # Sorted reads are friendlier to the page cache of a memory map.
                order = np.argsort(local[sel], kind="stable")
                src = local[sel][order]
                mean[sel[order]] = self._shards[k]["mean" + sfx][src]
                std[sel[order]] = self._shards[k]["std" + sfx][src]
        eps = torch.randn(mean.shape, generator=generator)
        z = self.scale * (torch.from_numpy(mean) + torch.from_numpy(std) * eps)
        return z, self.labels[idx]


def build_dataset(data_cfg: Any, *, model_cfg: Any, train: bool = True, seed: int = 0) -> Any:
    """Build the dataset named by ``data_cfg.name``, shaped for ``model_cfg``.

    Args:
        data_cfg: ``Config.data`` (name, path, hflip, num_workers, synthetic_size).
        model_cfg: ``Config.model`` (input_size, in_channels, num_classes).
        train: training split (True) or test split (False; image folders and latents have one
            split: point data.path elsewhere).
        seed: seed of the synthetic data (the test split uses a different stream).

    Returns:
        A dataset with ``__len__``, ``num_classes``, ``image_shape`` (C, H, W) and
        ``get_batch(indices, *, generator=None) -> (x (B, C, H, W) float32, y (B,) long)``.

    Raises:
        UserError: missing files (with the fix) or data that does not fit the model.
    """
    name = data_cfg.name
    size, channels = model_cfg.input_size, model_cfg.in_channels
    if name == "fashion-mnist":
        x, y = load_fashion_mnist(data_cfg.path or None, train=train)
        ds: Any = ArrayDataset(x[:, None], y, num_classes=10, hflip=data_cfg.hflip)
    elif name == "cifar10":
        x, y = load_cifar10(data_cfg.path, train=train)
        ds = ArrayDataset(x, y, num_classes=10, hflip=data_cfg.hflip)
    elif name == "imagefolder":
        ds = ImageFolderDataset(data_cfg.path, size=size, hflip=data_cfg.hflip)
    elif name == "latents":
        ds = LatentDataset(data_cfg.path, hflip=data_cfg.hflip)
    elif name == "synthetic":
        ncls = model_cfg.num_classes or 10
        x, y = synthetic_images(
            data_cfg.synthetic_size,
            size=size,
            channels=channels,
            num_classes=ncls,
            seed=seed if train else seed + 1_000_003,
        )
        ds = ArrayDataset(x, y, num_classes=ncls, hflip=data_cfg.hflip)
    else:
        raise UserError(f"unknown data.name '{name}'")
    if tuple(ds.image_shape) != (channels, size, size):
        c, h, w = ds.image_shape
        raise UserError(
            f"data.name = '{name}' gives samples of shape {c}x{h}x{w} (C x H x W) but the model "
            f"expects {channels}x{size}x{size}; set model.in_channels = {c} and "
            f"model.input_size = {h}"
        )
    if model_cfg.num_classes not in (0, ds.num_classes):
        raise UserError(
            f"the data has {ds.num_classes} classes but model.num_classes = "
            f"{model_cfg.num_classes}; set model.num_classes = {ds.num_classes} (0 = unconditional)"
        )
    return ds


# ----------------------------------------------------------------------------------------------
# Batches


def _epoch_seed(seed: int, epoch: int) -> int:
    # A well-mixed 63-bit seed per (seed, epoch): neighbouring seeds give unrelated permutations.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)[0] >> 1)


class BatchStream:
    """An infinite, resumable stream of per-rank index batches.

    Each epoch is a permutation of the dataset from a ``torch.Generator`` seeded with
    (seed, epoch); consecutive global batches of ``batch_size * world_size`` indices are cut from
    it (the last incomplete one is dropped) and rank r takes slice r. Every rank computes the same
    permutation, so the slices are disjoint and their union is the global batch.

    Args:
        dataset: anything with ``len()`` (or an int, the dataset size).
        batch_size: the per-rank batch (``train.global_batch / world_size``).
        seed: the data seed (same on every rank).
        rank, world_size: this process's slice.
    """

    def __init__(
        self, dataset: Any, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n = dataset if isinstance(dataset, int) else len(dataset)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                f"rank={rank}, world_size={world_size}"
            )
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * world_size
        if self.n < self.global_batch:
            raise UserError(
                f"the dataset has {self.n} samples, fewer than one global batch of "
                f"{self.global_batch}; lower train.global_batch or use more data "
                "(data.synthetic_size for synthetic data)"
            )
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next global batch
        self._perm: Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def _permutation(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._perm = torch.randperm(self.n, generator=g)
        return self._perm

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        """The next per-rank batch of indices: long (batch_size,)."""
        if self.position + self.global_batch > self.n:
            self.epoch += 1
            self.position = 0
            self._perm = None
        start = self.position + self.rank * self.batch_size
        idx = self._permutation()[start : start + self.batch_size].clone()
        self.position += self.global_batch
        return idx

    def state_dict(self) -> dict:
        """Plain-dict state: where the next batch starts (identical on every rank)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n": self.n,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (same dataset size, seed and global batch).

        Raises:
            UserError: the dataset size, seed or global batch differ from the saved ones.
        """
        for key, mine in (("n", self.n), ("seed", self.seed), ("global_batch", self.global_batch)):
            if key in state and int(state[key]) != mine:
                raise UserError(
                    f"cannot resume the data stream: saved {key} = {state[key]} but now {mine}; "
                    "resume with the same dataset, train.seed and train.global_batch"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._perm = None


class _StreamSampler:
    """A batch sampler over a BatchStream that remembers the stream state after each batch."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream
        self.states: deque[dict] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            idx = next(self.stream)
            self.states.append(self.stream.state_dict())
            yield idx.tolist()


class BatchLoader:
    """Batches decoded in DataLoader worker processes, with exact resume.

    For datasets that decode files (image folders). The stream runs ahead of the consumer
    (prefetching), so ``state_dict`` returns the stream state right after the last batch this
    loader *yielded*, not the stream's own position. Flips are drawn in the main process from
    the generator given to ``__next__``'s caller via ``generator``.

    Args:
        dataset: a dataset with ``__getitem__`` -> (uint8 (C, H, W), label) and ``to_float``.
        stream: the BatchStream (its state may be loaded before the first ``next``).
        num_workers: DataLoader worker processes (0 = decode in this process).
        generator: draws the flips.
    """

    def __init__(
        self,
        dataset: Any,
        stream: BatchStream,
        *,
        num_workers: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.dataset = dataset
        self.stream = stream
        self.num_workers = num_workers
        self.generator = generator
        self._sampler: _StreamSampler | None = None
        self._it: Iterator | None = None
        self._state = stream.state_dict()

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        """x float32 (B, C, H, W) in [-1, 1], y long (B,)."""
        if self._it is None:
            self._sampler = _StreamSampler(self.stream)
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=self._sampler,
                num_workers=self.num_workers,
                collate_fn=_collate,
                persistent_workers=self.num_workers > 0,
                prefetch_factor=2 if self.num_workers > 0 else None,
            )
            self._it = iter(loader)
        x, y = next(self._it)
        assert self._sampler is not None
        self._state = self._sampler.states.popleft()
        return self.dataset.to_float(x, self.generator), y

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("load the BatchLoader state before drawing the first batch")
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()


def _collate(items: list[tuple[np.ndarray, int]]) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(np.stack([it[0] for it in items]))
    y = torch.tensor([it[1] for it in items], dtype=torch.long)
    return x, y
