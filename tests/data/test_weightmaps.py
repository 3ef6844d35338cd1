from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from unetkit.data.synthetic import synth_cells
from unetkit.data.weightmaps import (
    border_weight_map,
    class_balance_weights,
    instance_borders,
    nearest_two_distances,
    separate_touching,
)
from unetkit.errors import ConfigError


def _tiny_instances() -> np.ndarray:
    """Four cells on 14×16: two touching, one close by, one far, one cut by the edge."""
    labels = np.zeros((14, 16), np.int32)
    labels[2:6, 2:6] = 1
    labels[2:6, 6:9] = 2  # touches cell 1
    labels[8:12, 3:7] = 3  # 2-pixel gap below cells 1 and 2
    labels[9:14, 12:16] = 4  # far, cut by the image edge
    labels[3, 11] = 5  # a single-pixel cell
    return labels


def _brute_force_distances(labels: np.ndarray) -> np.ndarray:
    """float64 (n_cells, H, W): distance from each pixel to each cell's nearest pixel."""
    grid = np.stack(np.indices(labels.shape), -1).reshape(-1, 2).astype(np.float64)
    out = []
    for k in range(1, labels.max() + 1):
        cell = np.argwhere(labels == k).astype(np.float64)
        d = np.sqrt(((grid[:, None, :] - cell[None, :, :]) ** 2).sum(-1)).min(1)
        out.append(d.reshape(labels.shape))
    return np.stack(out)


def _brute_force_weights(labels, w0, sigma, class_weights):
    dist = np.sort(_brute_force_distances(labels), axis=0)
    d1, d2 = dist[0], dist[1]
    fg = labels > 0
    if class_weights == "balanced":
        n_fg, n = fg.sum(), fg.size
        wc = np.where(fg, n / (2.0 * n_fg), n / (2.0 * (n - n_fg)))
    else:
        wc = np.ones(labels.shape)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    return wc + np.where(fg, 0.0, border)


@pytest.mark.parametrize(("w0", "sigma"), [(10.0, 5.0), (3.0, 1.5), (10.0, 0.7)])
@pytest.mark.parametrize("class_weights", ["balanced", None])
def test_border_weight_map_matches_brute_force_float64(w0, sigma, class_weights):
    labels = _tiny_instances()
    got = border_weight_map(labels, w0=w0, sigma=sigma, class_weights=class_weights)
    want = _brute_force_weights(labels, w0, sigma, class_weights)
    assert got.dtype == np.float32 and got.shape == labels.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_nearest_two_distances_match_brute_force_and_truncate_safely():
    labels = _tiny_instances()
    dist = np.sort(_brute_force_distances(labels), axis=0)
    d1, d2 = nearest_two_distances(labels)
    np.testing.assert_allclose(d1, dist[0], atol=1e-9)
    np.testing.assert_allclose(d2, dist[1], atol=1e-9)
    t1, t2 = nearest_two_distances(labels, max_distance=3.0)
    for trunc, full in ((t1, dist[0]), (t2, dist[1])):
        near = full <= 3.0
        np.testing.assert_allclose(trunc[near], full[near], atol=1e-9)
        assert (trunc[~near] > 3.0).all()  # exact or inf, never too small


def test_w0_and_sigma_semantics_on_a_hand_computed_gap():
    # Two cells with a 3-pixel gap: the middle gap pixel is 2 px from both cells.
    labels = np.zeros((5, 11), np.int32)
    labels[:, :4] = 1
    labels[:, 7:] = 2
    for w0, sigma in [(10.0, 5.0), (5.0, 2.0)]:
        w = border_weight_map(labels, w0=w0, sigma=sigma, class_weights=None)
        assert w[2, 5] == pytest.approx(1.0 + w0 * math.exp(-(4.0**2) / (2 * sigma**2)), 1e-6)
        assert w[2, 4] == pytest.approx(1.0 + w0 * math.exp(-(4.0**2) / (2 * sigma**2)), 1e-6)
        np.testing.assert_array_equal(w[labels > 0], 1.0)  # no border term on cells
    np.testing.assert_array_equal(border_weight_map(labels, w0=0.0, class_weights=None), 1.0)
    wide = border_weight_map(labels, w0=10.0, sigma=50.0, class_weights=None)
    narrow = border_weight_map(labels, w0=10.0, sigma=1.0, class_weights=None)
    assert wide[2, 5] > narrow[2, 5]


def test_single_cell_or_none_gets_no_border_term():
    labels = np.zeros((8, 8), np.int32)
    np.testing.assert_array_equal(border_weight_map(labels, class_weights=None), 1.0)
    labels[2:4, 2:4] = 1
    np.testing.assert_array_equal(border_weight_map(labels, class_weights=None), 1.0)


def test_class_weights_dict_and_mask_and_errors():
    labels = _tiny_instances()
    w = border_weight_map(labels, w0=0.0, class_weights={0: 0.5, 1: 3.0})
    np.testing.assert_array_equal(w, np.where(labels > 0, 3.0, 0.5))
    mask = np.where(labels == 3, 2, labels > 0).astype(np.int64)
    w = border_weight_map(labels, w0=0.0, class_weights={0: 1, 1: 2, 2: 4}, mask=mask)
    np.testing.assert_array_equal(w, np.array([1.0, 2.0, 4.0])[mask])
    with pytest.raises(ConfigError, match=r"no weight for classes \[1\]"):
        border_weight_map(labels, class_weights={0: 1.0})
    with pytest.raises(ConfigError, match="class_weights='balance'"):
        border_weight_map(labels, class_weights="balance")
    with pytest.raises(ConfigError, match="sigma > 0"):
        border_weight_map(labels, sigma=0.0)


def test_class_balance_weights_equalise_class_totals():
    mask = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 2]])
    w = class_balance_weights(mask)
    totals = [w[mask == c].sum() for c in range(3)]
    np.testing.assert_allclose(totals, [3.0, 3.0, 3.0], rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)


def test_weight_map_on_512_with_50_cells():
    _, labels = synth_cells((512, 512), seed=3, n_cells=(50, 50))
    assert labels.max() >= 40
    w = border_weight_map(labels)
    assert w.max() > 5.0  # touching cells leave background gaps near junctions


def test_weight_map_works_in_3d():
    labels = np.zeros((6, 10, 10), np.int32)
    labels[:, :, :4] = 1
    labels[:, :, 6:] = 2
    w = border_weight_map(labels, w0=10.0, sigma=5.0, class_weights=None)
    assert w[3, 5, 4] == pytest.approx(1.0 + 10 * math.exp(-(3.0**2) / 50.0), 1e-6)


def test_instance_borders_match_skimage_inner_boundaries():
    _, labels = synth_cells((96, 96), seed=1)
    ours = instance_borders(labels)
    np.testing.assert_array_equal(ours, find_boundaries(labels, mode="inner", connectivity=1))
    touching = instance_borders(labels, touching_only=True)
    assert touching.any() and not (touching & ~ours).any()


def test_separate_touching_leaves_no_two_cells_adjacent():
    _, labels = synth_cells((96, 96), seed=2)
    assert instance_borders(labels, touching_only=True).any()
    sep = separate_touching(labels)
    assert not instance_borders(sep, touching_only=True, connectivity=2).any()
    removed = (labels > 0) & (sep == 0)
    touching = instance_borders(labels, touching_only=True, connectivity=2)
    assert removed.any() and not (removed & ~touching).any()  # only where cells touched
    assert removed.sum() < touching.sum()  # one side of each contact: a 1-pixel gap
    assert not (sep[sep > 0] != labels[sep > 0]).any()
    np.testing.assert_array_equal(np.unique(sep), np.unique(labels))
