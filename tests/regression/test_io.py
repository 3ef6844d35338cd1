from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetkit.errors import ConfigError, DataError
from unetkit.regression.io import (
    colorize,
    read_pfm,
    read_target,
    to_channels_first,
    validity_mask,
    write_pfm,
    write_target,
)


def test_reads_a_hand_made_grey_little_endian_pfm_bottom_row_first(tmp_path):
    # A 3-wide, 2-high image whose top row is 1 2 3 and bottom row 4 5 6: PFM stores the
    # bottom row first.
    path = tmp_path / "grey.pfm"
    path.write_bytes(b"Pf\n3 2\n-1.0\n" + struct.pack("<6f", 4, 5, 6, 1, 2, 3))
    arr, scale = read_pfm(path)
    assert arr.dtype == np.float32 and scale == 1.0
    np.testing.assert_array_equal(arr, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(read_target(path), [[[1, 2, 3], [4, 5, 6]]])


def test_reads_a_hand_made_colour_big_endian_pfm(tmp_path):
    # 2×2 RGB; rows bottom to top, pixels left to right, channels interleaved.
    top = [(1, 2, 3), (4, 5, 6)]
    bottom = [(7, 8, 9), (10, 11, 12)]
    values = [c for px in bottom + top for c in px]
    path = tmp_path / "rgb.pfm"
    path.write_bytes(b"PF\n2 2\n2.5\n" + struct.pack(">12f", *values))
    arr, scale = read_pfm(path)
    assert arr.shape == (2, 2, 3) and scale == 2.5
    np.testing.assert_array_equal(arr[0], top)
    np.testing.assert_array_equal(arr[1], bottom)
    target = read_target(path)
    assert target.shape == (3, 2, 2)
    np.testing.assert_array_equal(target[:, 0, 1], [4, 5, 6])


@pytest.mark.parametrize("little", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3)])
def test_pfm_round_trip_both_byte_orders(tmp_path, little, shape):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=shape).astype(np.float32)
    arr.flat[3] = np.inf  # Middlebury marks unknown disparity with inf
    path = write_pfm(tmp_path / "a.pfm", arr, little_endian=little)
    data = path.read_bytes()
    kind = b"PF" if len(shape) == 3 else b"Pf"
    header = b"%s\n%d %d\n%s\n" % (kind, shape[1], shape[0], b"-1.0" if little else b"1.0")
    assert data.startswith(header)
    # first stored row is the image's bottom row
    row = arr[-1].reshape(-1)
    fmt = ("<" if little else ">") + f"{row.size}f"
    np.testing.assert_array_equal(struct.unpack_from(fmt, data, len(header)), row)
    back, _ = read_pfm(path)
    np.testing.assert_array_equal(back, arr)


def test_pfm_errors_name_the_file(tmp_path):
    truncated = tmp_path / "short.pfm"
    truncated.write_bytes(b"Pf\n4 4\n-1.0\n" + b"\0" * 20)
    with pytest.raises(DataError, match="short.pfm.*truncated"):
        read_pfm(truncated)
    bad = tmp_path / "bad.pfm"
    bad.write_bytes(b"P6\n4 4\n255\n" + b"\0" * 48)
    with pytest.raises(DataError, match="bad.pfm.*not a PFM"):
        read_target(bad)
    zero = tmp_path / "zero.pfm"
    zero.write_bytes(b"Pf\n2 2\n0\n" + b"\0" * 16)
    with pytest.raises(DataError, match="zero.pfm"):
        read_pfm(zero)
    with pytest.raises(DataError, match="H×W or H×W×3"):
        write_pfm(tmp_path / "x.pfm", np.zeros((2, 3, 4)))


def test_16bit_png_raw_values_and_kitti_scale(tmp_path):
    raw = np.array([[0, 256, 5120], [65535, 1, 300]], np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(raw).save(path)  # Pillow writes uint16 as a 16-bit grey PNG
    np.testing.assert_array_equal(read_target(path), raw[None].astype(np.float32))
    depth = read_target(path, scale=1 / 256)
    np.testing.assert_allclose(depth[0], raw / 256.0, rtol=1e-7)
    assert depth[0, 0, 1] == 1.0 and depth[0, 0, 2] == 20.0


def test_8bit_rgb_png_becomes_channels_first(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    out = read_target(tmp_path / "c.png", scale=1 / 255)
    assert out.shape == (3, 4, 5)
    np.testing.assert_allclose(out, np.moveaxis(rgb, -1, 0) / 255.0, rtol=1e-6)


def test_tiff_float_with_nan_and_int(tmp_path):
    f = np.array([[1.5, np.nan], [np.inf, -2.0]], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", f)
    out = read_target(tmp_path / "f.tif")
    assert out.shape == (1, 2, 2) and np.isnan(out[0, 0, 1]) and out[0, 0, 0] == 1.5
    tifffile.imwrite(tmp_path / "i.tiff", np.array([[7, 9]], np.uint16))
    np.testing.assert_array_equal(read_target(tmp_path / "i.tiff", scale=0.5), [[[3.5, 4.5]]])


def test_npy_and_write_target_round_trips(tmp_path):
    arr = np.random.default_rng(1).random((2, 6, 5)) * 10
    np.save(tmp_path / "a.npy", arr)  # float64 file
    out = read_target(tmp_path / "a.npy")
    assert out.dtype == np.float32 and out.shape == (2, 6, 5)
    np.testing.assert_allclose(out, arr, rtol=1e-6)
    for suffix in (".tif", ".npy"):
        write_target(tmp_path / f"w{suffix}", arr)
        np.testing.assert_array_equal(read_target(tmp_path / f"w{suffix}"), arr.astype(np.float32))
    write_target(tmp_path / "w.pfm", arr[:1])
    np.testing.assert_array_equal(read_target(tmp_path / "w.pfm"), arr[:1].astype(np.float32))
    rgb = arr[[0, 1, 0]]
    write_target(tmp_path / "rgb.pfm", rgb)
    np.testing.assert_array_equal(read_target(tmp_path / "rgb.pfm"), rgb.astype(np.float32))
    write_target(tmp_path / "h.tif", arr[0])  # H×W accepted
    assert read_target(tmp_path / "h.tif").shape == (1, 6, 5)


def test_write_target_png_needs_scale_and_range(tmp_path):
    depth = np.array([[1.0, 2.5], [80.0, 0.0]], np.float32)
    with pytest.raises(ConfigError, match="scale"):
        write_target(tmp_path / "d.png", depth)
    write_target(tmp_path / "d.png", depth, scale=1 / 256)
    assert np.asarray(Image.open(tmp_path / "d.png")).dtype == np.uint16
    np.testing.assert_array_equal(read_target(tmp_path / "d.png", scale=1 / 256)[0], depth)
    with pytest.raises(DataError, match="do not fit 16-bit PNG"):
        write_target(tmp_path / "e.png", depth * 1000, scale=1 / 256)
    with pytest.raises(DataError, match="suffix"):
        write_target(tmp_path / "e.jpg", depth)


def test_unreadable_files_raise_data_error_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.npy: file not found"):
        read_target(tmp_path / "missing.npy")
    (tmp_path / "t.exr").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported target type"):
        read_target(tmp_path / "t.exr")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):
        read_target(tmp_path / "obj.npy")
    np.save(tmp_path / "cut.npy", np.zeros((20, 20)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:300])
    with pytest.raises(DataError, match="cut.npy.*truncated"):
        read_target(tmp_path / "cut.npy")
    Image.fromarray(np.zeros((30, 30), np.uint16)).save(tmp_path / "p.png")
    (tmp_path / "p.png").write_bytes((tmp_path / "p.png").read_bytes()[:40])
    with pytest.raises(DataError, match="p.png"):
        read_target(tmp_path / "p.png")
    np.save(tmp_path / "c.npy", np.zeros((2, 2), np.complex64))
    with pytest.raises(DataError, match="dtype complex64"):
        read_target(tmp_path / "c.npy")


def test_channel_layout_and_validity():
    assert to_channels_first(np.zeros((5, 6))).shape == (1, 5, 6)
    assert to_channels_first(np.zeros((2, 5, 6))).shape == (2, 5, 6)
    assert to_channels_first(np.zeros((5, 6, 3))).shape == (3, 5, 6)
    with pytest.raises(DataError, match="shape"):
        to_channels_first(np.zeros((1, 2, 3, 4)))
    t = np.array([[[1.0, 0.0, -1.0, np.nan, np.inf]], [[1.0, 1.0, 1.0, 1.0, 1.0]]])
    np.testing.assert_array_equal(validity_mask(t), [[True, False, False, False, False]])
    np.testing.assert_array_equal(
        validity_mask(t, positive=False), [[True, True, True, False, False]]
    )


def test_colorize_marks_invalid_black_and_orders_near_bright():
    d = np.array([[1.0, 5.0, np.nan]])
    rgb = colorize(d, vmin=1.0, vmax=5.0)
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 2].tolist() == [0, 0, 0]
    assert rgb[0, 0].astype(int).sum() > rgb[0, 1].astype(int).sum()  # near is bright
