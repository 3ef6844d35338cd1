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
    stream_luts,
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


def _all_labels_at_once(counts, areas, links, min_size):
    """The reference: one graph over every label of every block (``merge_labels`` as it
    was before it streamed), components by scipy, numbered by their first label."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    r = np.concatenate([offsets[i] + p[:, 0] - 1 for i, _, p in links] + [np.zeros(0, int)])
    c = np.concatenate([offsets[j] + p[:, 1] - 1 for _, j, p in links] + [np.zeros(0, int)])
    graph = sparse.coo_matrix((np.ones(len(r)), (r, c)), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    area = np.concatenate([a[1:] for a in areas]).astype(np.float64)
    size = np.bincount(component, weights=area)
    keep = size >= max(min_size, 1)
    first = np.full(len(size), total)
    np.minimum.at(first, component, np.arange(total))
    order = np.argsort(np.where(keep, first, total + np.arange(len(size))), kind="stable")
    final = np.zeros(len(size), np.uint32)
    final[order[: keep.sum()]] = np.arange(1, keep.sum() + 1)
    return [
        np.concatenate([[0], final[component[offsets[i] : offsets[i + 1]]]]).astype(np.uint32)
        for i in range(len(counts))
    ]


@pytest.mark.parametrize("seed", range(8))
def test_streamed_tables_equal_one_graph_of_all_labels(seed: int) -> None:
    """``stream_luts`` (holding only the linked labels) numbers every label as one graph
    of all labels does, and names the objects that span blocks where they start."""
    rng = np.random.default_rng(seed)
    counts = [int(n) for n in rng.integers(0, 40, rng.integers(2, 12))]
    areas = [np.concatenate([[0], rng.integers(1, 30, n)]) for n in counts]
    links = []
    for _ in range(rng.integers(0, 30)):
        i, j = sorted(rng.choice(len(counts), 2, replace=False))
        if counts[i] and counts[j]:
            k = rng.integers(1, 4)
            pairs = np.stack([rng.integers(1, counts[i] + 1, k), rng.integers(1, counts[j] + 1, k)])
            links.append((int(i), int(j), pairs.T.astype(np.int64)))
    min_size = int(rng.integers(0, 40))
    calls: list[int] = []

    def area_of(i: int) -> np.ndarray:
        calls.append(i)
        return areas[i]

    streamed = list(stream_luts(counts, area_of, links, min_size=min_size))
    expected = _all_labels_at_once(counts, areas, links, min_size)
    for (lut, _), want in zip(streamed, expected, strict=True):
        np.testing.assert_array_equal(lut, want)
    assert max(np.bincount(calls, minlength=len(counts))) <= 2  # each block read twice at most
    # the spanning objects: final ids given to more than one label, at their first block
    ids = np.concatenate([want[1:] for want in expected])
    shared = set(np.flatnonzero(np.bincount(ids) > 1)) - {0}
    first_block = {}
    for i, want in enumerate(expected):
        for v in want[1:]:
            first_block.setdefault(int(v), i)
    for i, (_, starting) in enumerate(streamed):
        assert starting.tolist() == sorted(v for v in shared if first_block[v] == i)
