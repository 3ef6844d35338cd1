"""Instance labels of a block grid stitched into one labelling (no object split at a border).

Each block is labelled on its own (local ids 1..n). Objects that cross a block border are
then found as edges of a graph whose nodes are the blocks' local labels, and merged by its
connected components (the union-find of dask-image's ``ndmeasure.label`` and of Cellpose's
distributed segmentation):

* :func:`face_pairs` — semantic masks: two labels touching across a face (same class) are
  one object. Exact: equals connected components of the whole mask.
* :func:`overlap_pairs` — watershed instances labelled with a halo: the two blocks' labels
  of the strip around their shared face, matched by IoU > 0.5 (a one-to-one matching, so
  touching cells that both cross the border stay apart).
* :func:`merge_labels` — the components, objects smaller than ``min_size`` (summed over
  blocks) dropped, and per block a look-up table local id -> final id (1..N);
  :func:`stream_luts` gives them block by block, holding only the labels on borders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

__all__ = [
    "core_labels",
    "face_pairs",
    "label_classes",
    "merge_labels",
    "overlap_pairs",
    "stream_luts",
]


def face_pairs(
    labels_a: np.ndarray, labels_b: np.ndarray, classes_a: np.ndarray, classes_b: np.ndarray
) -> np.ndarray:
    """Label pairs (a, b) touching across a face: the facing pixel lines of two blocks.

    Args:
        labels_a, labels_b: local labels along the face (1D, same length), 0 = background.
        classes_a, classes_b: the class of each of those pixels; only equal classes merge.

    Returns:
        int64 array K×2 of unique pairs of local ids.
    """
    hit = (labels_a > 0) & (labels_b > 0) & (classes_a == classes_b)
    pairs = np.stack([labels_a[hit], labels_b[hit]], axis=1).astype(np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def overlap_pairs(strip_a: np.ndarray, strip_b: np.ndarray, min_iou: float = 0.5) -> np.ndarray:
    """Label pairs (a, b) that are the same object in the strip both blocks labelled.

    Args:
        strip_a, strip_b: the two blocks' local labels of the same strip of pixels
            (0 = background or an object outside that block's core).
        min_iou: intersection over union within the strip above which two labels match;
            > 0.5 makes the matching one-to-one.

    Returns:
        int64 array K×2 of matched pairs.
    """
    a, b = strip_a.ravel().astype(np.int64), strip_b.ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    size_a, size_b = np.bincount(a), np.bincount(b)
    pairs, inter = np.unique(np.stack([a[both], b[both]], axis=1), axis=0, return_counts=True)
    iou = inter / (size_a[pairs[:, 0]] + size_b[pairs[:, 1]] - inter)
    return pairs[iou > min_iou]


def merge_labels(
    counts: Sequence[int],
    areas: Sequence[np.ndarray],
    links: Sequence[tuple[int, int, np.ndarray]],
    *,
    min_size: int = 0,
) -> list[np.ndarray]:
    """Merge linked block labels into objects and number them 1..N.

    Args:
        counts: per block, its number of local labels n (ids 1..n).
        areas: per block, pixel count per local id (length n + 1, index 0 unused).
        links: (block i, block j, K×2 pairs of local ids of i and j) that are one object.
        min_size: drop objects with fewer pixels in all blocks together.

    Returns:
        per block, a look-up table (length n + 1, uint32) from local id to final id;
        0 stays 0, dropped objects map to 0. Final ids follow the blocks' order.
        (:func:`stream_luts` gives the same tables one block at a time.)

    Example:
        >>> luts = merge_labels([1, 1], [np.array([0, 5]), np.array([0, 3])],
        ...                     [(0, 1, np.array([[1, 1]]))])
        >>> [lut.tolist() for lut in luts]
        [[0, 1], [0, 1]]
    """
    return [lut for lut, _ in stream_luts(counts, areas.__getitem__, links, min_size=min_size)]


def stream_luts(
    counts: Sequence[int],
    areas: Callable[[int], np.ndarray],
    links: Sequence[tuple[int, int, np.ndarray]],
    *,
    min_size: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`merge_labels` block by block, holding only the linked labels (those on block
    borders) and one block's labels at a time, never every label of the image.

    A label no link touches is an object of its own; the graph's components are the
    objects that cross borders. Final ids go to the kept objects in the order of their
    first label (block by block, then local id), as :func:`merge_labels` numbers them.

    Args:
        counts: per block, its number of local labels n (ids 1..n).
        areas: ``areas(i)``: block i's pixel count per local id (length n + 1); called
            twice for blocks with links (sizes first, then ids), once for the others.
        links: (block i, block j, K×2 pairs of local ids of i and j) that are one object.
        min_size: drop objects with fewer pixels in all blocks together.

    Yields:
        per block in order: (look-up table local id -> final id, uint32 of length n + 1;
        the final ids, ascending, of the linked objects whose first label is in this
        block: the objects that other blocks add pixels to).
    """
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ends = [(offsets[i] + p[:, 0] - 1, offsets[j] + p[:, 1] - 1) for i, j, p in links if len(p)]
    a = np.concatenate([e[0] for e in ends]) if ends else np.zeros(0, np.int64)
    b = np.concatenate([e[1] for e in ends]) if ends else np.zeros(0, np.int64)
    nodes = np.unique(np.concatenate([a, b]))  # global ids of the linked labels, sorted
    graph = sparse.coo_matrix(
        (np.ones(len(a), np.int8), (np.searchsorted(nodes, a), np.searchsorted(nodes, b))),
        shape=(len(nodes), len(nodes)),
    )
    n_comp, comp = connected_components(graph, directed=False)
    starts = np.searchsorted(nodes, offsets)  # block i's linked labels: starts[i]:starts[i+1]
    block_of = np.searchsorted(offsets, nodes, side="right") - 1
    size = np.zeros(n_comp, np.int64)
    for i in np.unique(block_of):
        lo, hi = starts[i], starts[i + 1]
        np.add.at(size, comp[lo:hi], np.asarray(areas(i), np.int64)[nodes[lo:hi] - offsets[i] + 1])
    first = np.full(n_comp, offsets[-1], np.int64)
    np.minimum.at(first, comp, nodes)
    smallest = max(min_size, 1)
    kept = size >= smallest
    final = np.zeros(n_comp, np.uint32)  # a component's id, once its first label has one
    next_id = 1
    for i, n in enumerate(counts):
        linked, c = nodes[starts[i] : starts[i + 1]] - offsets[i], comp[starts[i] : starts[i + 1]]
        is_kept = np.asarray(areas(i), np.int64)[1 : n + 1] >= smallest
        is_first = np.ones(n, bool)
        is_kept[linked] = kept[c]
        is_first[linked] = first[c] == linked + offsets[i]
        new = np.flatnonzero(is_kept & is_first)
        lut = np.zeros(n + 1, np.uint32)
        lut[new + 1] = np.arange(next_id, next_id + len(new), dtype=np.uint32)
        next_id += len(new)
        starting = is_first[linked]
        final[c[starting]] = lut[linked[starting] + 1]
        lut[linked[~starting] + 1] = final[c[~starting]]  # first label earlier: id set
        yield lut, lut[linked[starting & kept[c]] + 1]


def label_classes(classes: np.ndarray) -> np.ndarray:
    """Connected components (faces) of each class > 0 of a block; classes never merge, as
    in ``postprocess.instances_from_semantic`` (no size filter: sizes are summed later)."""
    out = np.zeros(classes.shape, np.int64)
    offset = 0
    for c in np.unique(classes[classes > 0]):
        comp, n = ndimage.label(classes == c)
        out[comp > 0] = comp[comp > 0] + offset
        offset += n
    return out


def core_labels(raw: np.ndarray, core: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Local ids 1..n for the labels of ``raw`` present in its ``core`` part, and the
    look-up table raw id -> local id (0 for labels outside the core).

    Returns:
        (uint32 local labels of the core, uint32 table indexed by raw id).
    """
    present = np.unique(raw[core])
    present = present[present > 0]
    table = np.zeros(int(raw.max(initial=0)) + 1, np.uint32)
    table[present] = np.arange(1, len(present) + 1, dtype=np.uint32)
    return table[raw[core]], table
