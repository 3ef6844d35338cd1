"""Stitching block labels: compared with scipy.ndimage.label on the whole image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unetkit.segmentation.stitching import (
    core_labels,
    face_pairs,
    label_classes,
    merge_labels,
    overlap_pairs,
)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering: the label pairs are a bijection on the foreground."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], axis=1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


def _stitch(classes: np.ndarray, block: int, min_size: int) -> np.ndarray:
    """Label a class map block by block, merge across faces, assemble the whole."""
    n_y, n_x = classes.shape
    ys, xs = range(0, n_y, block), range(0, n_x, block)
    local, counts, areas, index = {}, [], [], {}
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            core = (slice(y, y + block), slice(x, x + block))
            lab, _ = core_labels(label_classes(classes[core]), (slice(None), slice(None)))
            index[r, c] = len(counts)
            local[r, c] = (core, lab)
            counts.append(int(lab.max(initial=0)))
            areas.append(np.bincount(lab.ravel(), minlength=counts[-1] + 1))
    links = []
    for (r, c), (core, lab) in local.items():
        for dr, dc in ((1, 0), (0, 1)):
            if (r + dr, c + dc) not in local:
                continue
            other_core, other = local[r + dr, c + dc]
            edge = (-1, slice(None)) if dr else (slice(None), -1)
            first = (0, slice(None)) if dr else (slice(None), 0)
            pairs = face_pairs(
                lab[edge], other[first], classes[core][edge], classes[other_core][first]
            )
            links.append((index[r, c], index[r + dr, c + dc], pairs))
    luts = merge_labels(counts, areas, links, min_size=min_size)
    out = np.zeros(classes.shape, np.uint32)
    for key, (core, lab) in local.items():
        out[core] = luts[index[key]][lab]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_face_merging_equals_whole_image_components(seed: int) -> None:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((97, 130)), 2.0)
    classes = np.digitize(smooth, np.quantile(smooth, [0.45, 0.75])).astype(np.uint8)
    got = _stitch(classes, block=rng.integers(7, 40), min_size=0)
    expected = np.zeros(classes.shape, np.int64)
    offset = 0
    for c in (1, 2):  # classes never merge, as in instances_from_semantic
        comp, n = ndimage.label(classes == c)
        expected[comp > 0] = comp[comp > 0] + offset
        offset += n
    assert _same_partition(got, expected)
    assert got.max() == offset  # numbered 1..N without gaps


def test_min_size_counts_whole_objects() -> None:
    classes = np.zeros((20, 20), np.uint8)
    classes[2:4, 8:12] = 1  # 8 px, split by the block border at x=10 into 4 + 4
    classes[15, 15] = 1  # 1 px
    got = _stitch(classes, block=10, min_size=5)
    assert got.max() == 1 and (got > 0).sum() == 8


def test_overlap_matching_keeps_touching_cells_apart() -> None:
    # two touching cells in a strip; the two blocks disagree slightly about their border
    a = np.zeros((6, 10), np.uint32)
    b = np.zeros((6, 10), np.uint32)
    a[:, :5], a[:, 5:] = 1, 2
    b[:, :6], b[:, 6:] = 7, 3
    pairs = overlap_pairs(a, b)
    assert sorted(map(tuple, pairs.tolist())) == [(1, 7), (2, 3)]
    # a label seen only as a sliver in the other block is not merged
    b[:] = 0
    b[:, 4] = 5
    assert len(overlap_pairs(a, b)) == 0
