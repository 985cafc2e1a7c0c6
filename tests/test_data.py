"""Data readers, datasets and the resumable batch stream."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dispersive.data.datasets import (
    FASHION_MNIST_DIR,
    ArrayDataset,
    BatchLoader,
    BatchStream,
    ImageFolderDataset,
    build_dataset,
    center_crop_arr,
    load_cifar10,
    load_fashion_mnist,
    read_idx,
    restricted_unpickle,
    synthetic_images,
)
from dispersive.errors import UserError
from dispersive.train.config import Config, apply_overrides

# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)


def write_idx(path: Path, arr: np.ndarray, *, compress: bool) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    raw = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def make_idx_folder(folder: Path, n: int = 7, *, compress: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, m in (("train", n), ("t10k", n - 2)):
        x = rng.integers(0, 256, (m, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, m).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", x, compress=compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, compress=compress)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reader_round_trip(tmp_path, compress):
    ref = make_idx_folder(tmp_path, compress=compress)
    for train, split in ((True, "train"), (False, "t10k")):
        x, y = load_fashion_mnist(tmp_path, train=train)
        assert x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, ref[split][0])
        np.testing.assert_array_equal(y, ref[split][1])


def test_idx_reader_big_endian_ints(tmp_path):
    arr = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    write_idx(tmp_path / "a", arr, compress=False)
    out = read_idx(tmp_path / "a")
    np.testing.assert_array_equal(out, arr.astype(np.int32))
    assert out.dtype.isnative


def test_fashion_mnist_missing_names_the_fix(tmp_path):
    with pytest.raises(UserError) as info:
        load_fashion_mnist(tmp_path)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.path" in msg
    assert "train-images-idx3-ubyte" in msg and "\n" not in msg


def test_fashion_mnist_corrupt_files(tmp_path):
    make_idx_folder(tmp_path, compress=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        load_fashion_mnist(tmp_path)
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="not an IDX file"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    make_idx_folder(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), compress=False)
    with pytest.raises(UserError, match="do not belong together"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist():
    x, y = load_fashion_mnist()
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.min() == 0 and y.max() == 9
    assert np.all(np.bincount(y) == 6000)  # Fashion-MNIST is balanced
    xt, yt = load_fashion_mnist(train=False)
    assert xt.shape == (10000, 28, 28) and np.all(np.bincount(yt) == 1000)
    ds = build_dataset(Config().data, model_cfg=Config().model, train=False)
    xb, yb = ds.get_batch(np.array([0, 9999]))
    assert xb.shape == (2, 1, 28, 28) and xb.min() >= -1 and xb.max() <= 1
    torch.testing.assert_close(xb[0, 0], torch.from_numpy(xt[0]).float() / 127.5 - 1)
    assert yb.tolist() == [yt[0], yt[9999]]


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (restricted unpickling)


def write_cifar(folder: Path, n: int = 5, *, protocol: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ref = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        d = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"a"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
        ref[name] = (data, labels)
    return ref


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_reader(tmp_path, protocol):
    ref = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    x, y = load_cifar10(tmp_path, train=True)  # the parent folder works too
    assert x.shape == (25, 3, 32, 32) and y.dtype == np.int64
    data, labels = ref["data_batch_2"]
    # Rows are R(1024) G(1024) B(1024), each 32x32 row-major.
    np.testing.assert_array_equal(x[5:10, 1], data[:, 1024:2048].reshape(-1, 32, 32))
    assert y[5:10].tolist() == labels
    xt, _ = load_cifar10(tmp_path / "cifar-10-batches-py", train=False)
    np.testing.assert_array_equal(xt.reshape(5, -1), ref["test_batch"][0])


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused(tmp_path, protocol):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f, protocol=protocol)
    with pytest.raises(UserError) as info:
        load_cifar10(tmp_path)
    msg = str(info.value)
    assert "refusing" in msg and "system" in msg and "data_batch_3" in msg
    assert not marker.exists()


@pytest.mark.parametrize("target", [eval, getattr, __import__, np.load])
def test_restricted_unpickler_refuses_callables(tmp_path, target):
    class Reduce:
        def __reduce__(self):
            return (target, ("1",))

    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps(Reduce(), protocol=2))
    with pytest.raises(UserError, match="refusing"):
        restricted_unpickle(p)


def test_cifar_missing_names_the_fix(tmp_path):
    with pytest.raises(UserError) as info:
        load_cifar10(tmp_path)
    assert "cifar-10-python.tar.gz" in str(info.value) and "data.path" in str(info.value)


def test_cifar_not_a_batch(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"x": np.zeros(3)}, f)
    with pytest.raises(UserError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------
# Image folders


def save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_center_crop_identity_and_box_halving():
    from PIL import Image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(a), 16), a)
    # 2x2-constant blocks: BOX halving is exact, then no resize is needed (short side = size).
    small = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # H=8, W=12
    big = small.repeat(2, axis=0).repeat(2, axis=1)  # 16 x 24
    out = center_crop_arr(Image.fromarray(big), 8)
    np.testing.assert_array_equal(out, small[:, 2:10])


def test_center_crop_upscales_small_images():
    from PIL import Image

    out = center_crop_arr(Image.fromarray(np.full((5, 9, 3), 77, np.uint8)), 10)
    assert out.shape == (10, 10, 3) and np.all(out == 77)  # constant stays constant


def make_image_folder(root: Path, *, size=(20, 24)) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    out: dict[str, list[np.ndarray]] = {}
    for cls, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            save_png(root / cls / f"{i}.png", a)
            out.setdefault(cls, []).append(a)
    (root / "dog" / "notes.txt").write_text("not an image")
    return out


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    ref = make_image_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, size=16)
    assert len(ds) == 5 and ds.num_classes == 2 and ds.image_shape == (3, 16, 16)
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1]
    x, y = ds.get_batch(np.array([4, 0]))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [1, 0]
    expect = center_crop_arr(Image.fromarray(ref["dog"][1]), 16).transpose(2, 0, 1)
    torch.testing.assert_close(x[0], torch.tensor(expect).float() / 127.5 - 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ImageFolderDataset(tmp_path / "nope", size=8)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(tmp_path, size=8)


def test_hflip_is_deterministic_given_generator():
    x = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8)
    ds = ArrayDataset(x, torch.zeros(32), num_classes=1, hflip=True)
    idx = np.arange(32)
    a, _ = ds.get_batch(idx, generator=torch.Generator().manual_seed(3))
    b, _ = ds.get_batch(idx, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    plain = x.float() / 127.5 - 1
    flipped = torch.tensor([torch.equal(a[i], plain[i].flip(-1)) for i in range(32)])
    same = torch.tensor([torch.equal(a[i], plain[i]) for i in range(32)])
    assert torch.all(flipped | same) and flipped.any() and same.any()
    expect = torch.rand(32, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.equal(flipped & ~same, expect & ~same)


def test_batch_loader_matches_get_batch_and_resumes(tmp_path):
    make_image_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, size=8)
    loader = BatchLoader(ds, BatchStream(ds, batch_size=2, seed=5), num_workers=1)
    ref_stream = BatchStream(ds, batch_size=2, seed=5)
    got = [next(loader) for _ in range(3)]
    states = []
    for xb, yb in got:
        idx = next(ref_stream)
        states.append(ref_stream.state_dict())
        xr, yr = ds.get_batch(idx)
        torch.testing.assert_close(xb, xr, rtol=0, atol=0)
        assert torch.equal(yb, yr)
    # Prefetching ran the stream ahead, but the state is that of the last batch handed out.
    assert loader.state_dict() == states[-1]
    resumed = BatchLoader(ds, BatchStream(ds, batch_size=2, seed=5), num_workers=0)
    resumed.load_state_dict(states[0])
    torch.testing.assert_close(next(resumed)[0], got[1][0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Synthetic data and build_dataset


def test_synthetic_is_deterministic_and_learnable():
    x1, y1 = synthetic_images(400, size=8, channels=2, num_classes=4, seed=0)
    x2, y2 = synthetic_images(400, size=8, channels=2, num_classes=4, seed=0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = synthetic_images(400, size=8, channels=2, num_classes=4, seed=1)
    assert not torch.equal(x1, x3)
    assert x1.shape == (400, 2, 8, 8) and x1.abs().max() <= 1 and set(y1.tolist()) == {0, 1, 2, 3}
    # Classes are separable: nearest class centroid of the phase-free |FFT| on held-out data.
    feats = torch.fft.fft2(x1[:, 0]).abs().flatten(1)
    cents = torch.stack([feats[y1 == k].mean(0) for k in range(4)])
    xt, yt = synthetic_images(200, size=8, channels=2, num_classes=4, seed=7)
    ft = torch.fft.fft2(xt[:, 0]).abs().flatten(1)
    acc = (torch.cdist(ft, cents).argmin(1) == yt).float().mean().item()
    assert acc > 0.9, acc


def test_build_dataset_synthetic_shapes_and_splits():
    cfg = apply_overrides(
        Config(),
        [
            "data.name='synthetic'",
            "model.input_size=8",
            "model.in_channels=3",
            "model.num_classes=5",
        ],
    )
    ds = build_dataset(cfg.data, model_cfg=cfg.model, seed=2)
    assert (
        len(ds) == cfg.data.synthetic_size and ds.num_classes == 5 and ds.image_shape == (3, 8, 8)
    )
    x, y = ds.get_batch(torch.arange(4))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.long
    test = build_dataset(cfg.data, model_cfg=cfg.model, seed=2, train=False)
    assert not torch.equal(test.get_batch(torch.arange(4))[0], x)


def test_build_dataset_shape_mismatch(tmp_path):
    make_image_folder(tmp_path)
    ok = apply_overrides(
        Config(),
        [
            "data.name='imagefolder'",
            "model.in_channels=3",
            f"data.path={str(tmp_path)!r}",
            "model.num_classes=2",
        ],
    )
    assert build_dataset(ok.data, model_cfg=ok.model).image_shape == (3, 28, 28)
    bad = apply_overrides(ok, ["model.num_classes=3"])
    with pytest.raises(UserError, match="model.num_classes = 2"):
        build_dataset(bad.data, model_cfg=bad.model)


# ---------------------------------------------------------------------------------------------
# BatchStream


def take(stream, k):
    return [next(stream) for _ in range(k)]


def test_stream_is_deterministic_and_seed_dependent():
    a = take(BatchStream(100, batch_size=8, seed=1), 30)
    b = take(BatchStream(100, batch_size=8, seed=1), 30)
    c = take(BatchStream(100, batch_size=8, seed=2), 30)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_each_epoch_is_a_permutation_without_partial_batches():
    s = BatchStream(50, batch_size=8, seed=0)
    assert s.batches_per_epoch == 6
    for epoch in range(3):
        seen = torch.cat(take(s, 6))
        assert len(set(seen.tolist())) == 48 and s.epoch == epoch  # 2 dropped per epoch
    epochs = [
        torch.cat(take(BatchStream(50, batch_size=8, seed=0), 12)[6 * e : 6 * e + 6])
        for e in (0, 1)
    ]
    assert not torch.equal(epochs[0], epochs[1])  # a new permutation every epoch


def test_stream_resume_equals_uninterrupted():
    full = take(BatchStream(37, batch_size=4, seed=3), 25)
    s = BatchStream(37, batch_size=4, seed=3)
    take(s, 11)
    state = s.state_dict()
    resumed = BatchStream(37, batch_size=4, seed=3)
    resumed.load_state_dict(dict(state))
    rest = take(resumed, 14)
    assert all(torch.equal(u, v) for u, v in zip(full[11:], rest))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_slices_are_disjoint_and_form_the_global_batch(world_size):
    per_rank = 4
    glob = BatchStream(50, batch_size=per_rank * world_size, seed=9)
    ranks = [
        BatchStream(50, batch_size=per_rank, seed=9, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for _ in range(10):  # crosses epoch boundaries
        g = next(glob)
        parts = [next(s) for s in ranks]
        flat = torch.cat(parts)
        assert len(set(flat.tolist())) == len(flat)  # disjoint
        assert torch.equal(flat, g)  # rank order concatenated = the global batch
    assert len({str(s.state_dict()) for s in ranks}) == 1  # same state on every rank


def test_stream_errors():
    with pytest.raises(UserError, match="fewer than one global batch"):
        BatchStream(10, batch_size=8, seed=0, world_size=2)
    s = BatchStream(100, batch_size=8, seed=0)
    with pytest.raises(UserError, match="global_batch"):
        BatchStream(100, batch_size=4, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        BatchStream(100, batch_size=4, seed=0, rank=2, world_size=2)
