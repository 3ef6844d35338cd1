"""From probabilities to labels, instances and a per-object table (cells can be counted).

* :func:`probabilities_to_labels` — argmax (C ≥ 2) or sigmoid threshold (C == 1).
* :func:`instances_from_semantic` — connected components of each foreground class. Right
  for the output of a model trained with the U-Net border-weighted loss, which learns to
  predict the thin background gaps between touching cells.
* :func:`instances_from_boundary` — seeded watershed for a 3-class (background / interior /
  boundary) prediction: seeds are the interior components, grown into interior + boundary,
  so touching cells separate along their shared boundary.
* :func:`instances_from_distance` — distance-transform watershed for a plain foreground
  mask where touching cells are not separated by a predicted gap.
* :func:`object_table` / :func:`write_object_table_csv` — label, area, centroid (and mean
  intensity) per object.

All functions take numpy arrays or torch tensors without a batch axis and return numpy
arrays; instance images are int32, 0 = background, objects labelled 1..n.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((8, 8), np.uint8); mask[1:3, 1:3] = 1; mask[5:7, 4:8] = 1
    >>> [row["area"] for row in object_table(instances_from_semantic(mask))]
    [4, 8]
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

from unetkit._atomic import atomic_write_text
from unetkit.errors import ConfigError, DataError
from unetkit.segmentation.labels import as_numpy as _as_numpy
from unetkit.segmentation.labels import compact_labels as _compact

__all__ = [
    "count_instances",
    "instances_from_boundary",
    "instances_from_distance",
    "instances_from_semantic",
    "object_columns",
    "object_table",
    "probabilities_to_labels",
    "remove_small_objects",
    "write_object_table_csv",
]

logger = logging.getLogger(__name__)

_AXES = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not 1 <= connectivity <= ndim:
        raise ConfigError(f"connectivity={connectivity}; expected 1..{ndim} for {ndim}-D images")
    return ndimage.generate_binary_structure(ndim, connectivity)


def _instances(x: Any, name: str) -> np.ndarray:
    arr = _as_numpy(x, name)
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name}: expected an integer label image, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise DataError(f"{name}: labels must be ≥ 0 (0 = background), found {arr.min()}")
    return arr


def probabilities_to_labels(probs: Any, *, threshold: float = 0.5) -> np.ndarray:
    """Class-index map from C×*spatial probabilities (no batch axis).

    C ≥ 2: argmax over channels (logits work too). C == 1: ``probs[0] > threshold``.

    Returns:
        int64 array of shape *spatial.

    Example:
        >>> probabilities_to_labels(np.array([[0.2, 0.7]])).tolist()
        [0, 1]
    """
    p = _as_numpy(probs, "probabilities_to_labels probs")
    if p.ndim < 2:
        raise DataError(
            f"probabilities_to_labels: expected C×*spatial, got shape {p.shape}; add the "
            f"channel axis (probs[None]) for a single foreground map"
        )
    if p.shape[0] == 1:
        return (p[0] > threshold).astype(np.int64)
    return np.argmax(p, axis=0).astype(np.int64)


def remove_small_objects(
    instances: Any, min_size: int, *, connectivity: int = 1, relabel: bool = False
) -> np.ndarray:
    """Remove objects with fewer than ``min_size`` pixels (area ≥ min_size is kept).

    An integer image is taken as instance labels (labels kept unless ``relabel``, which
    renumbers the survivors 1..n); a boolean mask is split into connected components
    first and a boolean mask is returned.

    Example:
        >>> remove_small_objects(np.array([1, 1, 0, 2]), 2).tolist()
        [1, 1, 0, 0]
    """
    arr = _instances(instances, "remove_small_objects instances")
    if arr.dtype == bool:
        labels = ndimage.label(arr, structure=_structure(arr.ndim, connectivity))[0]
        return remove_small_objects(labels, min_size) > 0
    ids, inverse = _compact(arr)
    small = (np.bincount(inverse, minlength=len(ids)) < min_size) & (ids > 0)
    out = np.where(small[inverse].reshape(arr.shape), 0, arr)
    if relabel:
        out = relabel_sequential(out)[0]
    return out


def _finish(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects below ``min_size`` and number the rest 1..n in raster-scan order."""
    if min_size > 1:
        labels = remove_small_objects(labels, min_size)
    ids, inverse = _compact(labels)
    first = np.full(len(ids), labels.size)
    np.minimum.at(first, inverse, np.arange(labels.size))
    new = np.zeros(len(ids), np.int32)
    fg = np.flatnonzero(ids > 0)
    new[fg[np.argsort(first[fg], kind="stable")]] = np.arange(1, len(fg) + 1, dtype=np.int32)
    return new[inverse].reshape(labels.shape)


def instances_from_semantic(mask: Any, *, min_size: int = 0, connectivity: int = 1) -> np.ndarray:
    """Instances as connected components of each foreground class (values > 0).

    Components of different classes never merge, even when they touch.

    Args:
        mask: *spatial class map (0 = background) or boolean mask.
        min_size: remove components with fewer pixels.
        connectivity: 1 = faces only (4-neighbourhood in 2D) … ndim = full (8 in 2D).

    Example:
        >>> instances_from_semantic(np.array([1, 1, 0, 2, 1])).tolist()
        [1, 1, 0, 2, 3]
    """
    m = _instances(mask, "instances_from_semantic mask").astype(np.int64)
    structure = _structure(m.ndim, connectivity)
    out = np.zeros(m.shape, np.int64)
    offset = 0
    for c in np.unique(m[m > 0]):
        comp, n = ndimage.label(m == c, structure=structure)
        out[comp > 0] = comp[comp > 0] + offset
        offset += n
    return _finish(out, min_size)


def _three_class(probs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background, interior, boundary) probability maps from probs or a 0/1/2 label map."""
    p = _as_numpy(probs, "instances_from_boundary probs")
    if np.issubdtype(p.dtype, np.integer):
        if p.size and (p.min() < 0 or p.max() > 2):
            raise DataError(
                f"instances_from_boundary: a label map must hold 0 (background), "
                f"1 (interior), 2 (boundary); found range [{p.min()}, {p.max()}]"
            )
        return tuple((p == k).astype(np.float64) for k in range(3))  # type: ignore[return-value]
    if p.ndim < 2 or p.shape[0] != 3:
        raise DataError(
            f"instances_from_boundary: expected 3×*spatial probabilities (background, "
            f"interior, boundary) or an integer 0/1/2 map, got shape {p.shape} ({p.dtype})"
        )
    p = p.astype(np.float64)
    return p[0], p[1], p[2]


def instances_from_boundary(
    probs_3class: Any,
    *,
    interior_threshold: float = 0.5,
    min_size: int = 0,
    min_seed_size: int = 1,
    keep_unseeded: bool = True,
    connectivity: int = 1,
) -> np.ndarray:
    """Separate touching objects from a background / interior / boundary prediction.

    Seeds are connected components of the interior minus the boundary
    (p_interior > ``interior_threshold`` and p_interior ≥ p_boundary); components smaller
    than ``min_seed_size`` are dropped as noise. A watershed on the boundary probability
    (skimage.segmentation.watershed) grows the seeds through the foreground
    (p_background < 0.5, i.e. interior + boundary), so touching cells split along the
    ridge of their shared boundary (the 3-class target used by several DSB2018 nuclei
    solutions). The border-weighted 2-class U-Net output is better served by
    :func:`instances_from_semantic`.

    Args:
        probs_3class: 3×*spatial probabilities (channel 0 background, 1 interior,
            2 boundary), or an integer *spatial map with values 0/1/2.
        interior_threshold: seed threshold on p_interior.
        min_size: remove final objects with fewer pixels.
        min_seed_size: ignore seeds with fewer pixels.
        keep_unseeded: foreground components that contain no seed (e.g. small objects
            predicted as all-boundary) become objects of their own; else they are dropped.
        connectivity: neighbourhood of seeds, components and watershed (1 = faces).

    Returns:
        int32 instance image (*spatial), objects 1..n.

    Example:
        >>> m = np.array([[1, 1, 2, 1, 1]])          # two cells touching at a boundary
        >>> count_instances(instances_from_boundary(m))
        2
    """
    background, interior, boundary = _three_class(probs_3class)
    structure = _structure(interior.ndim, connectivity)
    foreground = background < 0.5
    seeds_mask = (interior > interior_threshold) & (interior >= boundary) & foreground
    seeds = ndimage.label(seeds_mask, structure=structure)[0]
    if min_seed_size > 1:
        seeds = remove_small_objects(seeds, min_seed_size)
    labels = watershed(boundary, markers=seeds, mask=foreground, connectivity=connectivity)
    if keep_unseeded:
        rest, n = ndimage.label(foreground & (labels == 0), structure=structure)
        if n:
            labels = np.where(rest > 0, rest + labels.max(), labels)
    return _finish(labels, min_size)


def instances_from_distance(
    mask: Any,
    *,
    h: float = 2.0,
    min_size: int = 0,
    connectivity: int = 1,
) -> np.ndarray:
    """Split touching objects of a plain foreground mask by a distance-transform watershed.

    Seeds are the h-maxima of the Euclidean distance to the background: two blobs are
    split when each centre lies more than ``h`` pixels deeper than the neck between them.

    Args:
        mask: *spatial foreground mask (nonzero = foreground).
        h: minimal depth (pixels) of a distance maximum to start its own object.
        min_size: remove final objects with fewer pixels.
        connectivity: neighbourhood of seeds and watershed (1 = faces).

    Example:
        >>> yy, xx = np.mgrid[:20, :32]
        >>> two = ((yy - 10) ** 2 + (xx - 9) ** 2 < 49) | ((yy - 10) ** 2 + (xx - 21) ** 2 < 49)
        >>> int(instances_from_distance(two).max())
        2
    """
    fg = _as_numpy(mask, "instances_from_distance mask") != 0
    if h <= 0:
        raise ConfigError(f"instances_from_distance: h={h}; expected a positive depth")
    distance = ndimage.distance_transform_edt(fg)
    structure = _structure(fg.ndim, connectivity)
    peaks = h_maxima(distance, h, footprint=ndimage.generate_binary_structure(fg.ndim, fg.ndim))
    seeds = ndimage.label(peaks & fg, structure=structure)[0]
    labels = watershed(-distance, markers=seeds, mask=fg, connectivity=connectivity)
    # Components whose depth is below h got no seed: keep them as single objects.
    rest, n = ndimage.label(fg & (labels == 0), structure=structure)
    if n:
        labels = np.where(rest > 0, rest + labels.max(), labels)
    return _finish(labels, min_size)


def count_instances(instances: Any) -> int:
    """Number of distinct positive labels (objects) in an instance image."""
    arr = _instances(instances, "count_instances instances")
    return int(np.count_nonzero(np.unique(arr) > 0))


def object_table(
    instances: Any, image: Any = None, *, pixel_size: Sequence[float] | None = None
) -> list[dict[str, float | int]]:
    """One row per object: label, area (pixels), centroid and optional mean intensity.

    Centroid keys follow the array axes: ``centroid_x`` (1-D); ``centroid_y``,
    ``centroid_x`` (2-D, y = row); ``centroid_z``, ``centroid_y``, ``centroid_x`` (3-D),
    in pixel units. ``image`` of the instance shape adds ``mean_intensity``; a
    C×*spatial image adds ``mean_intensity_0`` … ``mean_intensity_<C-1>``.
    ``pixel_size`` (µm per pixel along each axis, e.g. (0.5, 0.5)) adds the physical
    columns ``area_um2`` (``volume_um3`` in 3-D, ``length_um`` in 1-D) and
    ``centroid_<axis>_um``.

    Example:
        >>> object_table(np.array([[0, 3], [0, 3]]))
        [{'label': 3, 'area': 2, 'centroid_y': 0.5, 'centroid_x': 1.0}]
    """
    labels = _instances(instances, "object_table instances").astype(np.int64)
    if labels.ndim not in _AXES:
        raise DataError(f"object_table: expected a 1-3 D instance image, got {labels.ndim}-D")
    all_ids, flat = _compact(labels)
    areas = np.bincount(flat, minlength=len(all_ids))
    keep = all_ids > 0
    ids = all_ids[keep]
    columns: dict[str, np.ndarray] = {}
    coords = np.indices(labels.shape).reshape(labels.ndim, -1)
    for axis, name in enumerate(_AXES[labels.ndim]):
        sums = np.bincount(flat, weights=coords[axis], minlength=len(areas))
        columns[f"centroid_{name}"] = sums[keep] / areas[keep]
    if image is not None:
        img = _as_numpy(image, "object_table image").astype(np.float64)
        if img.shape == labels.shape:
            channels, names = img[None], ["mean_intensity"]
        elif img.ndim == labels.ndim + 1 and img.shape[1:] == labels.shape:
            channels, names = img, [f"mean_intensity_{c}" for c in range(img.shape[0])]
        else:
            raise DataError(
                f"object_table: image shape {img.shape} does not match instances "
                f"{labels.shape}; give *spatial or C×*spatial"
            )
        for chan, name in zip(channels, names, strict=True):
            sums = np.bincount(flat, weights=chan.ravel(), minlength=len(areas))
            columns[name] = sums[keep] / areas[keep]
    if pixel_size is not None:
        columns.update(_physical_columns(columns, areas[keep], pixel_size, labels.ndim))
    rows: list[dict[str, float | int]] = []
    for k, (label, area) in enumerate(zip(ids, areas[keep], strict=True)):
        row: dict[str, float | int] = {"label": int(label), "area": int(area)}
        row.update({name: float(col[k]) for name, col in columns.items()})
        rows.append(row)
    return rows


def object_columns(
    ids: np.ndarray,
    areas: np.ndarray,
    columns: dict[str, np.ndarray],
    *,
    pixel_size: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """:func:`object_table`'s columns in its order from per-object ``ids``, ``areas`` and
    ``columns`` (``centroid_<axis>`` per axis, then e.g. ``mean_intensity_<c>``), e.g.
    summed block by block; ``pixel_size`` (µm per axis) adds the µm columns."""
    ndim = sum(1 for name in columns if name.startswith("centroid_"))
    table = {"label": np.asarray(ids), "area": np.asarray(areas), **columns}
    if pixel_size is not None:
        table.update(_physical_columns(columns, np.asarray(areas), pixel_size, ndim))
    return table


_MEASURE = {1: "length_um", 2: "area_um2", 3: "volume_um3"}


def _physical_columns(
    columns: dict[str, np.ndarray], areas: np.ndarray, pixel_size: Sequence[float], ndim: int
) -> dict[str, np.ndarray]:
    """µm columns: the object's size (µm, µm², µm³) and its centroid in µm."""
    sizes = [float(s) for s in pixel_size]
    if len(sizes) != ndim or not all(np.isfinite(s) and s > 0 for s in sizes):
        raise ConfigError(
            f"object_table: pixel_size={tuple(pixel_size)}; expected {ndim} positive µm sizes"
        )
    out = {_MEASURE[ndim]: areas * float(np.prod(sizes))}
    for axis, name in enumerate(_AXES[ndim]):
        out[f"centroid_{name}_um"] = columns[f"centroid_{name}"] * sizes[axis]
    return out


def write_object_table_csv(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    columns: Sequence[str] | None = None,
) -> None:
    """Write :func:`object_table` rows to a CSV file atomically (header + one line per row).

    Columns default to the keys of the rows in first-seen order (``label, area,
    centroid_y, centroid_x`` when there are no rows); missing values are left empty.

    Example:
        >>> write_object_table_csv(object_table(np.array([[1, 0]])), "cells.csv")  # doctest: +SKIP
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row)) or [
            "label",
            "area",
            "centroid_y",
            "centroid_x",
        ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    try:
        writer.writerows(rows)
    except ValueError as e:  # a row has a key that is not a column
        raise ConfigError(f"write_object_table_csv {os.fspath(path)!r}: {e}") from None
    atomic_write_text(path, buffer.getvalue())
    logger.debug("wrote %d objects to %s", len(rows), path)
