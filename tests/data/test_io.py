from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetkit.data.io import list_images, read_image, to_float_image, write_image
from unetkit.data.masks import decode_mask
from unetkit.errors import ConfigError, DataError


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --- read/write round trips --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype", "shape"),
    [
        ("grey8.png", np.uint8, (13, 17)),
        ("grey16.png", np.uint16, (13, 17)),
        ("rgb.png", np.uint8, (13, 17, 3)),
        ("rgba.png", np.uint8, (13, 17, 4)),
        ("grey16.tif", np.uint16, (13, 17)),
        ("rgb16.tiff", np.uint16, (13, 17, 3)),
        ("float.tif", np.float32, (13, 17)),
        ("volume.tif", np.uint8, (5, 13, 17)),
        ("UPPER.PNG", np.uint8, (4, 4)),
    ],
)
def test_round_trip_is_exact(tmp_path, rng, name, dtype, shape):
    if np.issubdtype(dtype, np.integer):
        arr = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    else:
        arr = rng.standard_normal(shape).astype(dtype)
    path = write_image(tmp_path / name, arr)
    back = read_image(path)
    assert back.dtype == arr.dtype
    if name == "rgba.png":  # the readers drop alpha: it is not image content
        arr = arr[..., :3]
    np.testing.assert_array_equal(back, arr)


def test_multipage_tiff_written_by_tifffile_reads_as_volume(tmp_path, rng):
    pages = rng.integers(0, 65535, size=(4, 8, 9)).astype(np.uint16)
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        for page in pages:
            tif.write(page, photometric="minisblack")
    np.testing.assert_array_equal(read_image(tmp_path / "stack.tif"), pages)


def test_16bit_png_is_really_16bit_on_disk(tmp_path):
    arr = np.array([[0, 1000, 65535]], np.uint16)
    write_image(tmp_path / "a.png", arr)
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode.startswith("I")
        np.testing.assert_array_equal(np.asarray(img), arr)


def test_jpeg_is_close_and_bool_becomes_0_255(tmp_path):
    arr = np.full((16, 16), 100, np.uint8)
    write_image(tmp_path / "a.jpg", arr)
    assert np.abs(read_image(tmp_path / "a.jpg").astype(int) - 100).max() <= 2
    write_image(tmp_path / "b.png", np.eye(3, dtype=bool))
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), np.eye(3) * 255)


def test_palette_png_reads_indices_or_rgb(tmp_path):
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), idx)
    rgb = read_image(tmp_path / "p.png", palette_to_rgb=True)
    assert rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[0, 1], [255, 0, 0])


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "a.png", np.ones((4, 4), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    assert read_image(tmp_path / "a.png").max() == 1


@pytest.mark.parametrize(
    ("name", "arr"),
    [
        ("f.png", np.zeros((4, 4), np.float32)),
        ("rgb16.png", np.zeros((4, 4, 3), np.uint16)),
        ("vol.png", np.zeros((3, 4, 5), np.uint8)),
        ("a.bmp", np.zeros((4, 4), np.uint8)),
    ],
)
def test_write_refuses_what_the_format_cannot_hold(tmp_path, name, arr):
    with pytest.raises(DataError, match=name) as err:
        write_image(tmp_path / name, arr)
    assert ".tif" in str(err.value)
    assert not (tmp_path / name).exists()


# --- bad files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t.png", "t.tif"])
def test_truncated_file_raises_data_error_naming_it(tmp_path, rng, name):
    path = write_image(tmp_path / name, rng.integers(0, 255, (64, 64)).astype(np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{name}: cannot read image"):
        read_image(path)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="x.png: cannot read image"):
        read_image(tmp_path / "x.png")
    with pytest.raises(DataError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match="unsupported image type '.gif'"):
        read_image(tmp_path / "a.gif")


def test_list_images_sorted_filtered_case_insensitive(tmp_path):
    for name in ["b.PNG", "a.tif", "c.TIFF", "d.jpeg", "e.txt", ".hidden.png", "f.JPG"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.tif", "b.PNG", "c.TIFF", "d.jpeg", "f.JPG"]
    with pytest.raises(DataError, match="missing: folder not found"):
        list_images(tmp_path / "missing")


# --- to_float_image ----------------------------------------------------------------------


def test_to_float_image_scales_by_dtype_and_moves_channels():
    grey8 = np.array([[0, 255], [51, 102]], np.uint8)
    np.testing.assert_allclose(to_float_image(grey8)[0], grey8 / 255.0, rtol=1e-6)
    grey16 = np.array([[0, 65535]], np.uint16)
    np.testing.assert_allclose(to_float_image(grey16), [[[0.0, 1.0]]])
    four = np.zeros((2, 3, 4), np.uint8)
    four[..., 1] = 255
    out = to_float_image(four)  # 4 channels stay 4 (alpha is dropped by the readers only)
    assert out.shape == (4, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], 1.0)
    assert to_float_image(np.zeros((2, 3, 2), np.uint8)).shape == (2, 2, 3)  # two stains
    floats = np.array([[-1.5, 2.0]], np.float64)
    np.testing.assert_array_equal(to_float_image(floats)[0], floats)  # floats are not scaled


def test_to_float_image_volumes_and_shape_errors():
    assert to_float_image(np.zeros((5, 6, 7), np.uint8), spatial_dims=3).shape == (1, 5, 6, 7)
    assert to_float_image(np.zeros((5, 6, 7, 3), np.uint8), spatial_dims=3).shape == (3, 5, 6, 7)
    with pytest.raises(DataError, match="a volume"):
        to_float_image(np.zeros((5, 66, 67), np.uint8), path="vol.tif")


def test_nan_image_raises_naming_the_file():
    arr = np.zeros((4, 4), np.float32)
    arr[1, 2] = np.nan
    arr[0, 0] = np.inf
    with pytest.raises(DataError, match=r"img7.tif: image contains 2 NaN/inf values"):
        to_float_image(arr, path="images/img7.tif")


# --- decode_mask -------------------------------------------------------------------------


def test_decode_binary_and_auto():
    m255 = np.array([[0, 255], [255, 0]], np.uint8)
    np.testing.assert_array_equal(decode_mask(m255, 2, mode="binary"), m255 // 255)
    np.testing.assert_array_equal(decode_mask(m255, 2), m255 // 255)
    m01 = np.array([[0, 1]], np.uint8)
    out = decode_mask(m01, 2)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, m01)
    np.testing.assert_array_equal(decode_mask(np.zeros((2, 2), np.uint8), 2), 0)


def test_decode_index_and_instances():
    m = np.array([[0, 1], [2, 3]], np.uint16)
    np.testing.assert_array_equal(decode_mask(m, 4, mode="index"), m)
    np.testing.assert_array_equal(decode_mask(m, 4), m)  # auto → index
    labels = np.array([[0, 7], [300, 7]], np.uint16)
    np.testing.assert_array_equal(decode_mask(labels, 2, mode="instances"), labels)


def test_decode_error_message_names_file_values_and_fix():
    m = np.array([[0, 1], [7, 1]], np.uint8)
    with pytest.raises(DataError) as err:
        decode_mask(m, 2, path="masks/img3.png")
    msg = str(err.value)
    assert msg.startswith(
        "masks/img3.png: mask values [0, 1, 7] do not fit num_classes=2 "
        "(expected 0..1, or 0/255 for binary); set --num-classes or --mask-mode"
    )


def test_decode_errors_for_each_mode():
    with pytest.raises(DataError, match=r"values \[0, 255\] do not fit num_classes=3"):
        decode_mask(np.array([[0, 255]], np.uint8), 3, path="m.png")  # auto: binary only if 2
    with pytest.raises(DataError, match=r"m.png: mask values \[0, 2\] are not binary"):
        decode_mask(np.array([[0, 2]], np.uint8), 2, path="m.png", mode="binary")
    with pytest.raises(DataError, match="instance labels must be ≥ 0"):
        decode_mask(np.array([[0, -1]], np.int32), 2, mode="instances")
    with pytest.raises(DataError, match="non-integer"):
        decode_mask(np.array([[0.0, 0.5]]), 2)
    many = np.arange(100, dtype=np.uint8).reshape(10, 10)
    with pytest.raises(DataError, match=r"\[0, 1, 2, 3, 4, 5, 6, \.\.\., 99\] \(100 distinct"):
        decode_mask(many, 2)
    with pytest.raises(ConfigError, match="did you mean 'instances'"):
        decode_mask(many, 2, mode="instance")
    with pytest.raises(ConfigError, match="num_classes=1"):
        decode_mask(many, 1)


def test_decode_grey_mask_saved_as_rgb_and_refuse_colour():
    grey = np.array([[0, 1], [1, 0]], np.uint8)
    np.testing.assert_array_equal(decode_mask(np.stack([grey] * 3, -1), 2), grey)
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(DataError, match="c.png: colour mask"):
        decode_mask(colour, 2, path="c.png")


def test_decode_mask_from_16bit_file(tmp_path):
    labels = np.array([[0, 1, 2], [513, 513, 0]], np.uint16)
    write_image(tmp_path / "m.png", labels)
    np.testing.assert_array_equal(
        decode_mask(read_image(tmp_path / "m.png"), 2, mode="instances"), labels
    )


def test_auto_mode_reads_label_images_as_instances():
    from unetkit.data.masks import looks_like_instances

    labels16 = np.array([[0, 1, 2], [3, 3, 0]], np.uint16)
    assert looks_like_instances(labels16, 2)
    assert looks_like_instances(np.array([[0, 1, 2, 5]], np.uint8), 2)
    assert not looks_like_instances(np.array([[0, 1, 7]], np.uint8), 2)  # stray value: error
    assert not looks_like_instances(np.array([[0, 255]], np.uint8), 2)  # binary
    assert not looks_like_instances(labels16, 4)  # a 4-class index mask
