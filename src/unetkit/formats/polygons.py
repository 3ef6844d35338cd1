"""Outlines of labelled objects as polygons in pixel-corner coordinates (QuPath, ImageJ).

QuPath and ImageJ put the origin (0, 0) at the top-left *corner* of the top-left pixel, so
a pixel's centre is at (col + 0.5, row + 0.5), and both fill a polygon with the pixels
whose centres lie inside it. The outline traced here runs half-way between an object's
pixel centres and its neighbours' (``skimage.measure.find_contours`` at level 0.5), so
filling it gives back the object's pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, find_contours

from unetkit.errors import DataError

__all__ = ["ObjectOutline", "object_outlines"]


@dataclasses.dataclass
class ObjectOutline:
    """One object's outline: ``parts`` is a list of (exterior, holes) with every ring an
    N×2 float array of (x, y) pixel-corner coordinates, closed (first point == last)."""

    label: int
    parts: list[tuple[np.ndarray, list[np.ndarray]]]


def _ring(mask: np.ndarray, offset: tuple[int, int]) -> np.ndarray | None:
    """The longest 0.5-contour of a padded mask, as closed (x, y) pixel-corner points."""
    contours = find_contours(mask.astype(np.float32), 0.5)
    if not contours:
        return None
    rc = approximate_polygon(max(contours, key=len), tolerance=0)  # drop collinear points
    xy = np.stack([rc[:, 1] + offset[1] + 0.5, rc[:, 0] + offset[0] + 0.5], axis=1)
    if not np.array_equal(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])
    return xy


def object_outlines(instances: np.ndarray) -> Iterator[ObjectOutline]:
    """Outline every object of a 2-D instance image (0 = background), in label order.

    An object in several pieces gets one part per 8-connected piece; holes (background
    enclosed by the object) become interior rings.

    Example:
        >>> labels = np.zeros((5, 5), np.int32); labels[1:4, 1:3] = 7
        >>> [o.label for o in object_outlines(labels)]
        [7]
    """
    labels = np.asarray(instances)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise DataError(f"object outlines need a 2-D integer label image, got {labels.shape}")
    eight = np.ones((3, 3), bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        # one pixel of background around the crop, so every contour closes
        crop = np.pad(labels[box] == index, 1)
        offset = (box[0].start - 1, box[1].start - 1)
        pieces, n = ndimage.label(crop, structure=eight)
        parts = []
        for k in range(1, n + 1):
            piece = pieces == k
            filled = ndimage.binary_fill_holes(piece)
            exterior = _ring(filled, offset)
            if exterior is None:
                continue
            hole_labels, n_holes = ndimage.label(filled & ~piece)
            holes = [_ring(hole_labels == h, offset) for h in range(1, n_holes + 1)]
            parts.append((exterior, [h for h in holes if h is not None]))
        if parts:
            yield ObjectOutline(index, parts)
