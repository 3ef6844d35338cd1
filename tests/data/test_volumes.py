"""3D volumes: NIfTI and multi-page TIFF I/O with spacing, a 3D folder data set with
augmentation, and 3D tiled inference (3D U-Net and V-Net)."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

import unetkit
from unetkit.data.datasets import FolderSegmentationDataset
from unetkit.data.transforms import Compose, ElasticDeform, RandomCrop, RandomFlip, RandomRot90
from unetkit.data.volumes import read_volume, volume_stem, write_volume
from unetkit.errors import ConfigError, DataError
from unetkit.inference import TileOptions
from unetkit.inference.tiling import predict_tiled

SHAPE = (12, 20, 18)  # D, H, W
SPACING = (2.5, 0.7, 0.6)  # z, y, x


def _volume(dtype=np.int16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 1500, SHAPE).astype(dtype)


# --- NIfTI -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_with_spacing(tmp_path, suffix):
    vol = _volume()
    path = write_volume(tmp_path / f"ct{suffix}", vol, spacing=SPACING)
    back, spacing = read_volume(path)
    assert back.dtype == np.int16 and back.shape == SHAPE
    np.testing.assert_array_equal(back, vol)
    assert spacing == SPACING
    # what another tool sees: x, y, z voxels, zooms (sx, sy, sz), affine diag(sx, sy, sz, 1)
    img = nib.load(path)
    assert img.shape == SHAPE[::-1]
    assert np.asarray(img.dataobj)[5, 3, 1] == vol[1, 3, 5]
    np.testing.assert_allclose(img.header.get_zooms(), SPACING[::-1], rtol=1e-6)
    np.testing.assert_allclose(img.affine, np.diag([*SPACING[::-1], 1.0]), rtol=1e-6)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_read_nifti_written_by_nibabel(tmp_path):
    xyz = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)  # x, y, z
    img = nib.Nifti1Image(xyz, np.diag([0.5, 0.8, 3.0, 1.0]))
    nib.save(img, tmp_path / "a.nii.gz")
    vol, spacing = read_volume(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(vol, xyz.transpose(2, 1, 0))
    assert vol.shape == (4, 5, 6) and spacing == (3.0, 0.8, 0.5)


def test_nifti_channels_bool_and_int64(tmp_path):
    multi = np.random.default_rng(2).random((4, 5, 6, 2)).astype(np.float32)
    back, spacing = read_volume(write_volume(tmp_path / "m.nii.gz", multi))
    np.testing.assert_array_equal(back, multi)
    assert spacing == (1.0, 1.0, 1.0)
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 2, 3] = True
    back, _ = read_volume(write_volume(tmp_path / "b.nii", mask))
    assert back.dtype == np.uint8 and back.sum() == 1 and back[1, 2, 3] == 1
    labels = np.arange(60, dtype=np.int64).reshape(3, 4, 5)
    back, _ = read_volume(write_volume(tmp_path / "l.nii", labels))
    assert back.dtype == np.int32  # stored as int32: other tools read it
    np.testing.assert_array_equal(back, labels)


def test_missing_nibabel_is_a_clear_error(tmp_path, monkeypatch):
    write_volume(tmp_path / "ok.nii", _volume())
    monkeypatch.setitem(sys.modules, "nibabel", None)  # `import nibabel` now fails
    with pytest.raises(DataError, match=r"ok\.nii: .*nibabel.*pip install unetkit\[3d\]"):
        read_volume(tmp_path / "ok.nii")
    with pytest.raises(DataError, match=r"pip install unetkit\[3d\]"):
        write_volume(tmp_path / "new.nii.gz", _volume())
    assert not (tmp_path / "new.nii.gz").exists()
    back, _ = read_volume(write_volume(tmp_path / "v.tif", _volume()))  # TIFF needs no extra
    np.testing.assert_array_equal(back, _volume())


def test_corrupt_nifti(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DataError, match=r"bad\.nii\.gz: cannot read NIfTI"):
        read_volume(tmp_path / "bad.nii.gz")


# --- multi-page TIFF ---------------------------------------------------------------------


def test_tiff_round_trip_one_page_per_slice(tmp_path):
    vol = _volume(np.uint16, seed=3)
    path = write_volume(tmp_path / "stack.tif", vol, spacing=SPACING)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == SHAPE[0] and tif.pages[0].shape == SHAPE[1:]
        np.testing.assert_array_equal(tif.pages[4].asarray(), vol[4])
    back, spacing = read_volume(path)
    np.testing.assert_array_equal(back, vol)
    assert back.dtype == np.uint16 and spacing == SPACING


def test_tiff_channels_round_trip(tmp_path):
    for dtype, channels in ((np.float32, 2), (np.uint8, 3)):
        vol = (np.random.default_rng(4).random((3, 5, 6, channels)) * 200).astype(dtype)
        back, _ = read_volume(write_volume(tmp_path / f"c{channels}.tiff", vol))
        np.testing.assert_array_equal(back, vol)


def test_tiff_spacing_from_imagej_and_pages_written_one_by_one(tmp_path):
    vol = _volume(np.uint16, seed=5)
    # ImageJ hyperstack: z spacing in its metadata, x/y from the resolution tags (px/unit)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        vol,
        imagej=True,
        resolution=(1 / 0.6, 1 / 0.7),
        metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"},
    )
    back, spacing = read_volume(tmp_path / "ij.tif")
    np.testing.assert_array_equal(back, vol)
    np.testing.assert_allclose(spacing, SPACING, rtol=1e-6)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        for page in vol:
            tif.write(page, contiguous=False)
    back, spacing = read_volume(tmp_path / "pages.tif")
    np.testing.assert_array_equal(back, vol)
    assert spacing == (1.0, 1.0, 1.0)


def test_single_page_tiff_is_one_slice(tmp_path):
    tifffile.imwrite(tmp_path / "grey.tif", np.ones((5, 6), np.uint8))
    tifffile.imwrite(tmp_path / "rgb.tif", np.ones((5, 6, 3), np.uint8), photometric="rgb")
    assert read_volume(tmp_path / "grey.tif")[0].shape == (1, 5, 6)
    assert read_volume(tmp_path / "rgb.tif")[0].shape == (1, 5, 6, 3)


def test_volume_errors(tmp_path):
    with pytest.raises(DataError, match=r"x\.png: unsupported volume type"):
        read_volume(tmp_path / "x.png")
    with pytest.raises(DataError, match="file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(DataError, match="D×H×W"):
        write_volume(tmp_path / "flat.tif", np.zeros((4, 5)))
    with pytest.raises(ConfigError, match="spacing"):
        write_volume(tmp_path / "v.nii", np.zeros((2, 3, 4)), spacing=(1.0, 0.0, 1.0))
    assert volume_stem("a/b.nii.gz") == "b" and volume_stem("C.TIF") == "C"
    assert volume_stem("x.y.nii") == "x.y"


# --- a 3D folder data set with augmentation ----------------------------------------------


def _ball_folder(root):
    """Two cases, image and mask in different formats: a bright ball on a dark background;
    the mask is the ball, so image > 0.5 exactly where mask == 1."""
    z, y, x = np.indices(SHAPE)
    for name, centre, image_ext, mask_ext in (
        ("case1", (5, 9, 8), ".nii.gz", ".tif"),
        ("case2", (7, 11, 10), ".tif", ".nii"),
    ):
        ball = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= 16
        noise = np.random.default_rng(len(name)).integers(0, 8000, SHAPE)
        image = np.where(ball, 60000 - noise, noise).astype(np.uint16)
        write_volume(root / "images" / f"{name}{image_ext}", image, spacing=SPACING)
        write_volume(root / "masks" / f"{name}{mask_ext}", ball.astype(np.uint8))
    return root


def test_folder_dataset_reads_volumes(tmp_path):
    root = _ball_folder(tmp_path / "vol")
    (root / "images" / "notes.png").write_bytes(b"")  # 2D files are not volumes: ignored
    ds = FolderSegmentationDataset(root, spatial_dims=3)
    assert [p[0].name for p in ds.pairs] == ["case1.nii.gz", "case2.tif"]
    ds.validate()
    s = ds[0]
    assert s["name"] == "case1"
    assert s["image"].shape == (1, *SHAPE) and s["image"].dtype == torch.float32
    assert s["mask"].shape == SHAPE and s["mask"].dtype == torch.int64
    raw, _ = read_volume(root / "images" / "case1.nii.gz")
    np.testing.assert_array_equal(s["image"][0].numpy(), raw / np.float32(65535))
    assert ((s["image"][0] > 0.5) == (s["mask"] == 1)).all()


def test_folder_dataset_3d_augmentation_keeps_alignment(tmp_path):
    root = _ball_folder(tmp_path / "vol")
    rigid = Compose([RandomCrop((8, 12, 12)), RandomFlip(), RandomRot90()])
    ds = FolderSegmentationDataset(root, spatial_dims=3, transform=rigid, seed=1)
    shapes = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].shape == (1, 8, 12, 12) and s["mask"].shape == (8, 12, 12)
            assert ((s["image"][0] > 0.5) == (s["mask"] == 1)).all()  # exact: no interpolation
            shapes.add(tuple(s["image"].shape))
    assert torch.equal(ds[0]["image"], ds[0]["image"])  # seeded: same epoch, same sample
    elastic = Compose([RandomCrop((8, 12, 12)), ElasticDeform(grid=3, sigma=2.0)])
    ds = FolderSegmentationDataset(root, spatial_dims=3, transform=elastic, seed=2)
    s = ds[1]
    assert set(torch.unique(s["mask"]).tolist()) <= {0, 1}  # nearest: no new labels
    agree = ((s["image"][0] > 0.5) == (s["mask"] == 1)).float().mean()
    assert agree > 0.95  # cubic image vs nearest mask differ only at the ball's surface


# --- 3D tiled inference ------------------------------------------------------------------


def test_predict_tiled_3d_unet_overlap_tile_equals_one_pass():
    net = unetkit.create_model(
        "unet", preset="3d", channels=(2, 4), padding="valid", norm="none"
    ).eval()
    image = torch.rand(1, *SHAPE)
    tiled = predict_tiled(net, image, TileOptions(tile=(6, 10, 10)))  # 2×2×2 output tiles cover S
    assert tiled.shape == (2, *SHAPE)
    # reference: one pass over the whole volume mirror-padded by the margin
    need = net.input_size_for(SHAPE)
    margin = net.margin()
    pads = [(m, n - s - m) for m, n, s in zip(margin, need, SHAPE, strict=True)]
    padded = np.pad(image[0].numpy(), pads, mode="reflect")
    with torch.inference_mode():
        logits = net(torch.from_numpy(padded)[None, None])
    expected = torch.softmax(logits, 1)[0, :, : SHAPE[0], : SHAPE[1], : SHAPE[2]]
    torch.testing.assert_close(tiled, expected, rtol=1e-5, atol=1e-6)


def _gauss(t: int) -> np.ndarray:
    x = np.arange(t) - (t - 1) / 2
    g = np.exp(-0.5 * (x / (0.125 * t)) ** 2)
    return np.maximum(g / g.max(), 1e-6)


def test_predict_tiled_3d_vnet_gaussian_sliding_window():
    torch.manual_seed(0)
    net = unetkit.create_model("vnet", channels=(4, 8, 16), num_convs=(1, 2, 2)).eval()
    image = torch.rand(1, *SHAPE)
    tile = (8, 12, 10)
    got = predict_tiled(net, image, TileOptions(tile=tile, overlap=0.25))
    assert got.shape == (2, *SHAPE)
    # float64 reference: windows overlapping ≥ 25 %, first at 0, last at the end, evenly
    # spaced; probabilities weighted by a separable Gaussian (sigma = tile / 8), averaged
    starts = [(0, 4), (0, 8), (0, 4, 8)]
    total = np.zeros((2, *SHAPE))
    weight = np.zeros(SHAPE)
    w = np.einsum("i,j,k->ijk", *(_gauss(t) for t in tile))
    for z0 in starts[0]:
        for y0 in starts[1]:
            for x0 in starts[2]:
                win = (slice(z0, z0 + 8), slice(y0, y0 + 12), slice(x0, x0 + 10))
                with torch.inference_mode():
                    p = torch.softmax(net(image[(slice(None), *win)][None]), 1)[0]
                total[(slice(None), *win)] += w * p.double().numpy()
                weight[win] += w
    expected = torch.from_numpy(total / weight).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(0), torch.ones(SHAPE))
