"""Draws per epoch, augmentation diversity, spatial split and the one-pass spatial warp."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unetkit.data import transforms as T
from unetkit.data.datasets import FolderSegmentationDataset
from unetkit.data.elastic import resample
from unetkit.data.io import write_image
from unetkit.data.sampling import RandomDraws, spatial_split
from unetkit.errors import ConfigError


def _folder(root, n: int, shape=(48, 64), seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = rng.integers(0, 65535, shape).astype(np.uint16)  # noise: every crop differs
        labels = np.zeros(shape, np.uint16)
        labels[8:20, 8:20], labels[20:30, 30:50] = 1, 2
        write_image(root / "images" / f"im{i:03d}.tif", image)
        write_image(root / "masks" / f"im{i:03d}.tif", labels)
    return root


@pytest.mark.parametrize("n_images", [1, 3])
def test_no_two_draws_share_crop_and_warp(tmp_path, n_images) -> None:
    """Every draw of a run (all epochs, every repeat of an image) gets its own augmentation."""
    aug = T.Compose([T.RandomSpatial(24), T.RandomFlip(), T.IntensityJitter()])
    base = FolderSegmentationDataset(_folder(tmp_path, n_images), transform=aug)
    draws = RandomDraws(base, 30, seed=1)
    seen = set()
    for epoch in range(2):
        draws.set_epoch(epoch)
        for i in range(len(draws)):
            seen.add(draws[i]["image"].numpy().tobytes())
    assert len(seen) == 60


def test_draws_are_reproducible_and_balanced(tmp_path) -> None:
    base = FolderSegmentationDataset(_folder(tmp_path, 3), transform=T.RandomSpatial(16))
    a, b = RandomDraws(base, 12, seed=5), RandomDraws(base, 12, seed=5)
    a.set_epoch(3), b.set_epoch(3)
    for i in range(12):
        assert np.array_equal(a[i]["image"].numpy(), b[i]["image"].numpy())
    names = [a[i]["name"] for i in range(12)]
    assert {names.count(n) for n in set(names)} == {4}  # each image drawn equally often


def test_epoch_length_does_not_depend_on_the_data(tmp_path) -> None:
    one = FolderSegmentationDataset(_folder(tmp_path / "one", 1))
    many = FolderSegmentationDataset(_folder(tmp_path / "many", 100, shape=(8, 8)))
    assert len(RandomDraws(one, 40)) == len(RandomDraws(many, 40)) == 40
    with pytest.raises(ConfigError):
        RandomDraws(one, 0)


def test_spatial_split_holds_out_a_disjoint_strip() -> None:
    train, val, axis = spatial_split((256, 512), 0.2)
    assert axis == 1 and val[1] == slice(409, 512) and train[1] == slice(0, 409)
    marks = np.zeros((256, 512), int)
    marks[train] += 1
    marks[val] += 1
    assert (marks == 1).all()  # every pixel in exactly one region
    assert spatial_split((9, 4, 4), 0.5)[1][0] == slice(4, 9)  # volumes: longest axis


def test_regions_cut_targets_computed_on_the_whole_image(tmp_path) -> None:
    data = FolderSegmentationDataset(_folder(tmp_path, 1), target="boundary")
    whole = data.sample(0, None)
    train, val, _ = spatial_split(whole["mask"].shape, 0.25)
    parts = data.select([(0, train), (0, val)])
    assert len(parts) == 2
    joined = np.concatenate([parts.sample(0, None)["mask"], parts.sample(1, None)["mask"]], 1)
    assert np.array_equal(joined, whole["mask"].numpy())


def test_resample_reads_only_a_window_but_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1, 300, 200))
    coords = rng.uniform([[[40]], [[30]]], [[[90]], [[70]]], size=(2, 16, 16))
    ref = ndimage.map_coordinates(image[0], coords, order=3, mode="mirror")
    np.testing.assert_allclose(resample(image, coords, order=3)[0], ref, atol=1e-4)
    edge = np.stack(np.meshgrid(np.linspace(-5, 10, 8), np.linspace(190, 205, 8), indexing="ij"))
    ref = ndimage.map_coordinates(image[0], edge, order=1, mode="mirror")
    np.testing.assert_allclose(resample(image, edge, order=1)[0], ref, atol=1e-12)


def test_random_spatial_zoom_scales_a_ramp() -> None:
    """Cubic interpolation of a linear ramp is exact away from the mirrored edges: zoom 2
    doubles its slope, and every value is the ramp at the sampled position."""
    ramp = np.tile(np.arange(200, dtype=np.float64), (200, 1))[None]
    labels = (ramp[0] > 100).astype(np.int64)
    aug = T.RandomSpatial(20, scale=(2.0, 2.0), rotate=0.0, p_affine=1.0, p_elastic=0.0)
    coords = aug.coordinates((200, 200), np.random.default_rng(3))
    out = aug({"image": ramp, "mask": labels}, np.random.default_rng(3))
    np.testing.assert_allclose(np.diff(coords[1], axis=1), 2.0)
    inside = (coords[1] > 10) & (coords[1] < 189) & (coords[0] > 10) & (coords[0] < 189)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out["image"][0][inside], coords[1][inside], atol=1e-4)
    assert set(np.unique(out["mask"])) <= {0, 1}  # labels by nearest neighbour
    exact = inside & (np.abs(coords[1] - 100.5) > 1)
    assert np.array_equal(out["mask"][exact], (coords[1][exact] > 100.5).astype(np.int64))


def test_random_spatial_without_zoom_or_warp_is_an_exact_crop() -> None:
    image = np.random.default_rng(1).random((2, 40, 50)).astype(np.float32)
    aug = T.RandomSpatial(16, p_affine=0.0, p_elastic=0.0)
    out = aug({"image": image}, np.random.default_rng(7))["image"]
    hits = [
        (y, x)
        for y in range(25)
        for x in range(35)
        if np.array_equal(out, image[:, y : y + 16, x : x + 16])
    ]
    assert len(hits) == 1


def test_normalize_percentiles_match_numpy() -> None:
    image = np.random.default_rng(2).gamma(2.0, 100.0, (1, 64, 64)).astype(np.float32)
    out = T.Normalize("percentile", percentiles=(2.0, 99.8))({"image": image})["image"]
    low, high = np.percentile(image.astype(np.float64), [2.0, 99.8])
    np.testing.assert_allclose(out, (image - low) / (high - low), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="percentiles"):
        T.Normalize("percentile", percentiles=(50, 10))
