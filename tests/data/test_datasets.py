from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader, Subset

from unetkit.data.datasets import (
    FolderSegmentationDataset,
    SyntheticCellsDataset,
    boundary_target,
    split_indices,
)
from unetkit.data.io import write_image
from unetkit.data.synthetic import synth_cells, write_synthetic_folder
from unetkit.data.transforms import Compose, RandomCrop, RandomFlip
from unetkit.data.weightmaps import border_weight_map, instance_borders
from unetkit.errors import ConfigError, DataError

SHAPE = (40, 48)


@pytest.fixture
def cells(tmp_path):
    return write_synthetic_folder(tmp_path / "cells", 3, SHAPE, seed=2)


def _binary_folder(root, names=("a", "b"), shape=(10, 12)):
    rng = np.random.default_rng(0)
    for name in names:
        write_image(root / "images" / f"{name}.png", rng.integers(0, 255, shape).astype(np.uint8))
        write_image(
            root / "masks" / f"{name}.png", (rng.random(shape) > 0.5).astype(np.uint8) * 255
        )
    return root


# --- folder data set ---------------------------------------------------------------------


def test_folder_sample_contents(cells):
    ds = FolderSegmentationDataset(cells, mask_mode="instances")
    assert len(ds) == 3 and ds.target_classes == 2
    s = ds[1]
    assert sorted(s) == ["image", "instances", "mask", "name"]
    assert s["name"] == "cell_001"
    assert s["image"].dtype == torch.float32 and s["image"].shape == (1, *SHAPE)
    assert s["mask"].dtype == torch.int64 and s["instances"].dtype == torch.int32
    _, labels = synth_cells(SHAPE, seed=(2, 1))
    np.testing.assert_array_equal(s["instances"].numpy(), labels)
    np.testing.assert_array_equal(s["mask"].numpy(), labels > 0)
    ds.validate()


def test_folder_pairs_by_stem_across_types_and_decodes_binary(tmp_path):
    root = tmp_path / "d"
    write_image(root / "images" / "x.png", np.zeros((6, 7, 3), np.uint8))
    write_image(root / "masks" / "x.tif", np.array([[0, 255] * 3 + [0]] * 6, np.uint8))
    write_image(root / "masks" / "orphan.png", np.zeros((6, 7), np.uint8))
    ds = FolderSegmentationDataset(root)
    assert [(i.name, m.name) for i, m in ds.pairs] == [("x.png", "x.tif")]
    s = ds[0]
    assert s["image"].shape == (3, 6, 7) and "instances" not in s
    assert s["mask"].unique().tolist() == [0, 1]
    separate = FolderSegmentationDataset((root / "images", root / "masks"))
    assert len(separate) == 1


def test_missing_folders_and_masks(tmp_path):
    with pytest.raises(DataError, match="images: folder not found"):
        FolderSegmentationDataset(tmp_path)
    root = _binary_folder(tmp_path / "d", names=("a", "b", "c"))
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) without a mask: .*b\.png"):
        FolderSegmentationDataset(root)
    write_image(root / "masks" / "b.tif", np.zeros((10, 12), np.uint8))
    write_image(root / "masks" / "c.tif", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match="two masks for one image: c.png and c.tif"):
        FolderSegmentationDataset(root)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    with pytest.raises(DataError, match="no images found"):
        FolderSegmentationDataset(empty)


def test_bad_files_fail_lazily_and_validate_lists_them_all(tmp_path):
    root = _binary_folder(tmp_path / "d", names=("a", "b", "c", "d", "e"))
    write_image(root / "masks" / "b.png", np.zeros((9, 12), np.uint8))  # size mismatch
    write_image(root / "masks" / "c.png", np.array([[0, 1, 7]], np.uint8))  # bad values
    data = (root / "images" / "d.png").read_bytes()
    (root / "images" / "d.png").write_bytes(data[: len(data) // 2])  # truncated
    nan = np.zeros((10, 12), np.float32)
    nan[0, 0] = np.nan
    (root / "images" / "e.png").unlink()
    tifffile.imwrite(root / "images" / "e.tif", nan)  # NaN image
    ds = FolderSegmentationDataset(root)  # listing only: no error yet
    assert ds[0]["mask"].shape == (10, 12)
    with pytest.raises(DataError, match=r"b\.png \(10×12\) and its mask .*b\.png \(9×12\)"):
        ds[1]
    with pytest.raises(DataError, match=r"c\.png: mask values \[0, 1, 7\] do not fit"):
        ds[2]
    with pytest.raises(DataError, match=r"d\.png: cannot read image"):
        ds[3]
    with pytest.raises(DataError, match=r"e\.tif: image contains 1 NaN/inf"):
        ds[4]
    with pytest.raises(DataError) as err:
        ds.validate()
    msg = str(err.value)
    assert "4 of 5 samples are invalid" in msg
    for name in ("b.png", "c.png", "d.png", "e.tif"):
        assert name in msg


def test_bad_options(tmp_path):
    root = _binary_folder(tmp_path / "d")
    with pytest.raises(ConfigError, match="did you mean 'boundary'"):
        FolderSegmentationDataset(root, target="boundry")
    with pytest.raises(ConfigError, match="did you mean 'sigma'"):
        FolderSegmentationDataset(root, weight_map={"sigm": 5})
    with pytest.raises(ConfigError, match="mask_mode='bin'"):
        FolderSegmentationDataset(root, mask_mode="bin")


def test_targets_and_weight_map(cells):
    _, labels = synth_cells(SHAPE, seed=(2, 0))
    opts = {"w0": 10.0, "sigma": 5.0}
    boundary = FolderSegmentationDataset(cells, mask_mode="instances", target="boundary")[0]
    np.testing.assert_array_equal(boundary["mask"].numpy(), boundary_target(labels))
    assert boundary["mask"].unique().tolist() == [0, 1, 2]
    sep = FolderSegmentationDataset(
        cells, mask_mode="instances", target="separated", weight_map=opts
    )[0]
    mask = sep["mask"].numpy()
    assert mask.sum() < (labels > 0).sum()
    gap = (labels > 0) & (mask == 0)
    assert gap.any() and sep["weight"].numpy()[gap].min() > 2.0  # gaps weigh most
    np.testing.assert_array_equal(sep["instances"].numpy(), labels)  # originals kept
    plain = FolderSegmentationDataset(cells, mask_mode="instances", weight_map=opts)[0]
    np.testing.assert_allclose(plain["weight"].numpy(), border_weight_map(labels, **opts))


def test_weight_map_without_instance_files_uses_components(tmp_path):
    root = tmp_path / "d"
    mask = np.zeros((12, 20), np.uint8)
    mask[2:10, 2:8] = 255
    mask[2:10, 11:18] = 255
    write_image(root / "images" / "a.png", mask)
    write_image(root / "masks" / "a.png", mask)
    s = FolderSegmentationDataset(root, weight_map={"w0": 10, "sigma": 3})[0]
    w = s["weight"].numpy()
    assert w[5, 9] > w[5, 0] + 1.0  # the gap between the two components


def test_transform_is_seeded_per_index_and_epoch(cells):
    aug = Compose([RandomCrop(16), RandomFlip()])
    ds = FolderSegmentationDataset(cells, mask_mode="instances", transform=aug, seed=1)
    a, b = ds[0], ds[0]
    assert a["image"].shape == (1, 16, 16)
    torch.testing.assert_close(a["image"], b["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a["image"])
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), ds[0]["instances"].numpy() > 0)


# --- synthetic data set, split, loader -----------------------------------------------------


def test_synthetic_dataset_matches_generator_and_batches():
    ds = SyntheticCellsDataset(4, shape=(32, 40), seed=3, weight_map={}, target="boundary")
    assert ds.target_classes == 3
    image, labels = synth_cells((32, 40), seed=(3, 2))
    s = ds[2]
    np.testing.assert_array_equal(s["image"][0].numpy(), image)
    np.testing.assert_array_equal(s["instances"].numpy(), labels)
    assert s["weight"].shape == (32, 40) and s["name"] == "synthetic_00002"
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 1, 32, 40) and batch["mask"].dtype == torch.int64
    assert batch["name"] == ["synthetic_00000", "synthetic_00001"]
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ConfigError, match="style"):
        SyntheticCellsDataset(2, style="brightfield")


def test_split_indices_deterministic_disjoint_complete():
    train, val = split_indices(50, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    assert set(train) | set(val) == set(range(50)) and not set(train) & set(val)
    t2, v2 = split_indices(50, 0.2, seed=0)
    np.testing.assert_array_equal(v2, val)
    _, v3 = split_indices(50, 0.2, seed=1)
    assert set(v3) != set(val)
    assert [len(x) for x in split_indices(2, 0.01)] == [1, 1]  # at least one each
    assert [len(x) for x in split_indices(3, 0.0)] == [3, 0]
    assert len(Subset(SyntheticCellsDataset(5, shape=(16, 16)), val[:2])) == 2
    with pytest.raises(ConfigError, match="val_fraction=1.0"):
        split_indices(10, 1.0)


def test_boundary_target_thickness():
    labels = np.zeros((10, 12), np.int64)
    labels[2:8, 1:6] = 1
    labels[2:8, 6:11] = 2
    target = boundary_target(labels)
    np.testing.assert_array_equal(target[5], [0, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0])
    np.testing.assert_array_equal(target == 2, instance_borders(labels))


def test_folder_volumes_with_3d_transforms(tmp_path):
    root = tmp_path / "vol"
    labels = np.zeros((6, 10, 12), np.uint16)
    labels[1:5, 2:6, 2:6] = 1
    labels[1:5, 2:6, 6:10] = 2
    write_image(root / "images" / "v.tif", labels.astype(np.float32) / 2)
    write_image(root / "masks" / "v.tif", labels)
    aug = Compose([RandomCrop((4, 8, 8)), RandomFlip()])
    ds = FolderSegmentationDataset(
        root, mask_mode="instances", spatial_dims=3, target="boundary", transform=aug
    )
    s = ds[0]
    assert s["image"].shape == (1, 4, 8, 8) and s["mask"].shape == (4, 8, 8)
    np.testing.assert_array_equal(
        (s["image"][0] * 2).round().int().numpy(), s["instances"].numpy()
    )  # image and labels cropped/flipped alike
    with pytest.raises(DataError, match="use spatial_dims=3"):
        FolderSegmentationDataset(root, mask_mode="instances")[0]
