"""Sample files: the [-1, 1] <-> uint8 convention, ADM .npz, image folders, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dispersive.errors import UserError
from dispersive.eval.io import (
    from_uint8,
    load_image_folder,
    load_images,
    load_npz,
    make_grid,
    save_grid,
    save_image_folder,
    save_npz,
    to_uint8,
)


def test_to_uint8_convention_and_clamping():
    x = torch.tensor([-1.0, 1.0, 0.0, -5.0, 5.0, -1 + 1 / 127.5, 0.5]).reshape(1, 1, 1, 7)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 1, 7, 1)  # NCHW -> NHWC
    # round((x + 1) * 127.5) clamped: 0 -> 127.5 rounds to 128 (half to even), 0.5 -> 191.25.
    assert u[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 1, 191]


def test_to_uint8_is_nhwc():
    x = torch.zeros(2, 3, 4, 5)
    x[:, 1] = 1.0  # green channel full
    u = to_uint8(x)
    assert u.shape == (2, 4, 5, 3)
    assert (u[..., 1] == 255).all() and (u[..., 0] == 128).all()


@settings(max_examples=25, deadline=None)
@given(
    arrays(
        np.uint8,
        st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.sampled_from([1, 3])),
    )
)
def test_uint8_round_trip_is_exact(u):
    x = from_uint8(u)
    assert x.shape == (u.shape[0], u.shape[3], u.shape[1], u.shape[2])
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    np.testing.assert_array_equal(to_uint8(x), u)


def test_float_round_trip_within_half_a_level():
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    err = (from_uint8(to_uint8(x)) - x).abs().max()
    assert float(err) <= 0.5 / 127.5 + 1e-6


def test_npz_round_trip_adm_layout(tmp_path):
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, (5, 7, 6, 1), dtype=np.uint8)
    labels = np.arange(5) % 3
    p = save_npz(tmp_path / "s.npz", u, labels)
    with np.load(p, allow_pickle=False) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 7, 6, 1)
        np.testing.assert_array_equal(z["arr_1"], labels)
    np.testing.assert_array_equal(load_npz(p), u)
    np.testing.assert_array_equal(load_images(p), u)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write leaves no temporary


def test_npz_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(UserError, match="no 'arr_0'.*images"):
        load_npz(bad)
    f32 = tmp_path / "f32.npz"
    np.savez(f32, arr_0=np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(UserError, match="uint8"):
        load_npz(f32)
    nchw = tmp_path / "nchw.npz"
    np.savez(nchw, arr_0=np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(UserError, match="NHWC"):
        load_npz(nchw)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="cannot read"):
        load_npz(garbage)
    with pytest.raises(FileNotFoundError):
        load_images(tmp_path / "missing.npz")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_round_trip(tmp_path, channels):
    rng = np.random.default_rng(channels)
    u = rng.integers(0, 256, (4, 9, 8, channels), dtype=np.uint8)
    paths = save_image_folder(tmp_path / "imgs", u)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(4)]
    np.testing.assert_array_equal(load_image_folder(tmp_path / "imgs"), u)
    np.testing.assert_array_equal(load_images(tmp_path / "imgs"), u)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_image_folder(tmp_path / "empty")
    save_image_folder(tmp_path / "mixed", np.zeros((1, 4, 4, 1), np.uint8))
    save_image_folder(tmp_path / "mixed", np.zeros((1, 5, 5, 1), np.uint8), start=1)
    with pytest.raises(UserError, match="differ in size"):
        load_image_folder(tmp_path / "mixed")


def test_grid_layout(tmp_path):
    u = np.stack([np.full((3, 2, 1), i, np.uint8) for i in range(1, 6)])  # 5 images, 3x2
    g = make_grid(u, nrow=2, pad=1)
    assert g.shape == (3 * (3 + 1) + 1, 2 * (2 + 1) + 1, 1)
    assert g[1, 1, 0] == 1 and g[1, 4, 0] == 2 and g[5, 1, 0] == 3 and g[9, 1, 0] == 5
    assert g[9, 4, 0] == 0  # the empty sixth cell
    from PIL import Image

    p = save_grid(tmp_path / "g.png", u)
    assert Image.open(p).size[0] > 0
