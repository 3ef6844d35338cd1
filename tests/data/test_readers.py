"""Axis-aware readers on files tifffile/Pillow wrote with their own metadata (OME, ImageJ)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetkit.data.io import load_image, parse_channels, read_image, write_image
from unetkit.data.masks import decode_mask
from unetkit.data.tiff import PixelSize
from unetkit.errors import ConfigError, DataError


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def stains(rng):
    """Two different uint16 stains, 24×32 (cytoplasm, nucleus)."""
    return rng.integers(0, 65535, size=(2, 24, 32), endpoint=True).astype(np.uint16)


def test_imagej_two_channel_hyperstack_stays_two_channels(tmp_path, stains):
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, stains, imagej=True, metadata={"axes": "CYX"})
    loaded = load_image(path)
    assert loaded.axes == "YXC"
    np.testing.assert_allclose(loaded.image, stains / 65535.0, rtol=1e-6)


def test_channels_pick_and_order(tmp_path, stains):
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, stains, imagej=True, metadata={"axes": "CYX"})
    swapped = load_image(path, channels=(1, 0)).image
    np.testing.assert_allclose(swapped, stains[::-1] / 65535.0, rtol=1e-6)
    only_nucleus = load_image(path, channels=[1]).image
    assert only_nucleus.shape == (1, 24, 32)
    with pytest.raises(DataError, match=r"two.tif: --channels 2: the image has 2 channel"):
        load_image(path, channels=(2,))


def test_ome_cyx_with_more_than_four_channels_and_pixel_size_in_nm(tmp_path, rng):
    data = rng.integers(0, 255, size=(6, 16, 20), endpoint=True).astype(np.uint8)
    path = tmp_path / "six.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={
            "axes": "CYX",
            "PhysicalSizeX": 325.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 0.5,
            "PhysicalSizeYUnit": "µm",
        },
    )
    loaded = load_image(path)
    assert loaded.image.shape == (6, 16, 20)
    np.testing.assert_allclose(loaded.image, data / 255.0, rtol=1e-6)
    assert loaded.pixel_size == PixelSize(y=0.5, x=pytest.approx(0.325), z=None)


def test_ome_tczyx_with_one_time_point(tmp_path, rng):
    data = rng.integers(0, 4095, size=(1, 2, 3, 8, 9), endpoint=True).astype(np.uint16)
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={
            "axes": "TCZYX",
            "PhysicalSizeX": 0.2,
            "PhysicalSizeY": 0.2,
            "PhysicalSizeZ": 1.5,
        },
    )
    volume = load_image(path, spatial_dims=3)
    assert volume.axes == "ZYXC" and volume.image.shape == (2, 3, 8, 9)  # C×Z×Y×X
    np.testing.assert_allclose(volume.image, data[0] / 65535.0, rtol=1e-6)
    assert volume.pixel_size.z == pytest.approx(1.5)
    with pytest.raises(DataError, match=r"stack.ome.tif: image of shape .*a volume\? use"):
        load_image(path)  # a 2-D model cannot take a Z-stack


def test_imagej_zcyx_volume_with_unit_and_spacing(tmp_path, rng):
    data = rng.integers(0, 255, size=(4, 3, 10, 12), endpoint=True).astype(np.uint8)
    path = tmp_path / "zcyx.tif"
    tifffile.imwrite(
        path,
        data,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.4),  # pixels per unit: x 0.25 µm, y 0.4 µm
        metadata={"axes": "ZCYX", "unit": "um", "spacing": 2.0},
    )
    loaded = load_image(path, spatial_dims=3, channels=(2, 0))
    np.testing.assert_allclose(loaded.image, np.moveaxis(data[:, [2, 0]], 1, 0) / 255.0, rtol=1e-6)
    assert loaded.pixel_size.x == pytest.approx(0.25)
    assert loaded.pixel_size.y == pytest.approx(0.4)
    assert loaded.pixel_size.z == pytest.approx(2.0)


def test_time_series_refused_with_its_axes(tmp_path, rng):
    path = tmp_path / "movie.tif"
    data = rng.integers(0, 255, size=(3, 8, 8), endpoint=True).astype(np.uint8)
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(DataError, match=r"movie.tif: TIFF holds a time series of 3 frames"):
        read_image(path)


def test_unlabelled_planes_need_channels_in_2d(tmp_path, stains):
    path = tmp_path / "planes.tif"
    tifffile.imwrite(path, stains)  # no axes: tifffile calls them Q
    with pytest.raises(DataError, match=r"planes.tif: TIFF holds 2 planes .*--channels"):
        load_image(path)
    np.testing.assert_allclose(load_image(path, channels=(0, 1)).image, stains / 65535.0)
    assert load_image(path, spatial_dims=3).image.shape == (1, 2, 24, 32)


def test_plain_tiff_resolution_in_centimetres_round_trips(tmp_path, rng):
    labels = rng.integers(0, 70_000, size=(8, 8)).astype(np.uint32)
    path = write_image(tmp_path / "labels.tif", labels, pixel_size=PixelSize(y=0.65, x=0.65))
    with tifffile.TiffFile(path) as tif:  # tifffile reads what we wrote: 1/0.65 µm in px/cm
        assert tif.pages.first.resolutionunit == 3
        assert tif.pages.first.get_resolution()[0] == pytest.approx(1e4 / 0.65, rel=1e-6)
    loaded = load_image(path)
    assert loaded.pixel_size.x == pytest.approx(0.65, rel=1e-6)
    np.testing.assert_array_equal(read_image(path), labels)


def test_png_grey_alpha_is_one_channel_and_dpi_is_a_pixel_size(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    la = np.stack([grey, np.full_like(grey, 255)], -1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png", dpi=(25400, 25400))
    loaded = load_image(tmp_path / "la.png")
    assert loaded.image.shape == (1, 6, 8)
    np.testing.assert_allclose(loaded.image[0], grey / 255.0, rtol=1e-6)
    assert loaded.pixel_size.x == pytest.approx(1.0, rel=1e-3)  # 25400 dpi = 1 µm


def test_big_uncompressed_tiff_is_memory_mapped(tmp_path, stains):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stains, imagej=True, metadata={"axes": "CYX"})
    arr = read_image(path)
    assert isinstance(arr.base, np.memmap) or isinstance(arr, np.memmap)
    np.testing.assert_array_equal(arr, np.moveaxis(stains, 0, -1))


def test_parse_channels():
    assert parse_channels("1,0") == (1, 0)
    assert parse_channels(None) is None and parse_channels("") is None
    for bad in ("a", "1,1", "-1", "1,,2"):
        with pytest.raises(ConfigError, match="--channels"):
            parse_channels(bad)


def test_jpeg_masks_are_refused(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    path = write_image(tmp_path / "m.jpg", mask)
    with pytest.raises(DataError, match=r"m.jpg: JPEG masks are lossy"):
        decode_mask(read_image(path), 2, path=path)


def test_planes_first_arrays_are_not_mistaken_for_channels_last(tmp_path, stains):
    from unetkit.data.io import to_float_image

    path = tmp_path / "planes.tif"
    tifffile.imwrite(path, stains[:, :8, :10])  # 2 planes of 8×10, no axes
    with pytest.raises(DataError, match=r"planes.tif: image of shape \(2, 8, 10\).*planes first"):
        to_float_image(read_image(path), path=path)
