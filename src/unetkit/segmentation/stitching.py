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
  blocks) dropped, and per block a look-up table local id -> final id (1..N).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

__all__ = ["core_labels", "face_pairs", "label_classes", "merge_labels", "overlap_pairs"]


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

    Example:
        >>> luts = merge_labels([1, 1], [np.array([0, 5]), np.array([0, 3])],
        ...                     [(0, 1, np.array([[1, 1]]))])
        >>> [lut.tolist() for lut in luts]
        [[0, 1], [0, 1]]
    """
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    rows = [offsets[i] + p[:, 0] - 1 for i, _, p in links if len(p)]
    cols = [offsets[j] + p[:, 1] - 1 for _, j, p in links if len(p)]
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = sparse.coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    area = np.concatenate([np.asarray(a[1:], np.int64) for a in areas]) if total else np.zeros(0)
    size = np.bincount(component, weights=area, minlength=component.max(initial=-1) + 1)
    keep = size >= max(min_size, 1)
    # number the kept components in order of their first node: stable, block by block
    first = np.full(len(size), total, np.int64)
    np.minimum.at(first, component, np.arange(total))
    order = np.argsort(np.where(keep, first, total + np.arange(len(size))), kind="stable")
    final = np.zeros(len(size), np.uint32)
    n_kept = int(keep.sum())
    final[order[:n_kept]] = np.arange(1, n_kept + 1, dtype=np.uint32)
    luts = []
    for i in range(len(counts)):
        lut = np.zeros(int(counts[i]) + 1, np.uint32)
        lut[1:] = final[component[offsets[i] : offsets[i + 1]]]
        luts.append(lut)
    return luts


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
