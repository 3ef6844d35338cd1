from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import regionprops

from unetkit.data.io import read_image
from unetkit.data.synthetic import synth_cells, write_synthetic_folder
from unetkit.errors import ConfigError


def _touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different cells that are 4-neighbours somewhere."""
    pairs = set()
    for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
        hit = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[hit].tolist(), b[hit].tolist(), strict=True)}
    return pairs


def test_deterministic_per_seed():
    a_img, a_lab = synth_cells((64, 80), seed=7)
    b_img, b_lab = synth_cells((64, 80), seed=7)
    c_img, c_lab = synth_cells((64, 80), seed=8)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab)
    np.testing.assert_array_equal(
        synth_cells((32, 32), seed=(1, 2))[1], synth_cells((32, 32), seed=[1, 2])[1]
    )


@pytest.mark.parametrize("style", ["fluorescence", "phase"])
def test_outputs_are_valid_images_and_labels(style):
    image, labels = synth_cells((128, 96), seed=3, style=style)
    assert image.shape == labels.shape == (128, 96)
    assert image.dtype == np.float32 and labels.dtype == np.int32
    assert image.min() >= 0.0 and image.max() <= 1.0
    n = labels.max()
    np.testing.assert_array_equal(np.unique(labels), np.arange(n + 1))  # 0..N, consecutive
    for label in range(1, n + 1):
        assert ndimage.label(labels == label)[1] == 1  # each cell is one piece
    fg, bg = image[labels > 0].mean(), image[labels == 0].mean()
    assert fg > bg + 0.1 if style == "fluorescence" else fg < bg - 0.05


@pytest.mark.parametrize("seed", range(4))
def test_many_cells_touch(seed):
    _, labels = synth_cells((256, 256), seed=seed)
    pairs = _touching_pairs(labels)
    n = labels.max()
    assert 15 * 0.6 <= n <= 40
    assert len(pairs) >= 10
    touching_cells = {c for p in pairs for c in p}
    assert len(touching_cells) >= 0.5 * n


def test_cells_are_irregular_not_circles():
    _, labels = synth_cells((256, 256), seed=11)
    props = regionprops(labels)
    eccentric = [p.eccentricity > 0.4 for p in props]
    assert np.mean(eccentric) > 0.4
    areas = np.array([p.area for p in props])
    assert areas.std() / areas.mean() > 0.15  # varied sizes


def test_cell_count_follows_n_cells():
    _, few = synth_cells((128, 128), seed=0, n_cells=(3, 3))
    _, many = synth_cells((128, 128), seed=0, n_cells=(30, 30))
    assert 1 <= few.max() <= 3 and 15 <= many.max() <= 30


def test_bad_arguments():
    with pytest.raises(ConfigError, match="did you mean 'phase'"):
        synth_cells(seed=0, style="phaze")
    with pytest.raises(ConfigError, match="n_cells"):
        synth_cells(seed=0, n_cells=(5, 2))
    with pytest.raises(ConfigError, match="shape"):
        synth_cells((4, 4), seed=0)


def test_write_synthetic_folder(tmp_path):
    root = write_synthetic_folder(tmp_path / "cells", 3, (48, 56), seed=5)
    images = sorted(p.name for p in (root / "images").iterdir())
    assert images == ["cell_000.png", "cell_001.png", "cell_002.png"]
    image, labels = synth_cells((48, 56), seed=(5, 1))
    mask = read_image(root / "masks" / "cell_001.png")
    assert mask.dtype == np.uint16
    np.testing.assert_array_equal(mask, labels)
    img = read_image(root / "images" / "cell_001.png")
    assert img.dtype == np.uint8
    np.testing.assert_allclose(img / 255.0, image, atol=0.5 / 255 + 1e-6)
