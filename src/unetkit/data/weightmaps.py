"""The U-Net border weight map and class-balance weights.

Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation" (MICCAI 2015), eq. 2:

    w(x) = w_c(x) + w0 · exp(−(d1(x) + d2(x))² / (2σ²))

with w_c the class-balance weight, d1 and d2 the distances to the nearest and the
second-nearest cell. The border term makes the thin background gaps between touching cells
expensive to miss, so the network learns to separate them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping

import numpy as np
from scipy import ndimage

from unetkit.errors import ConfigError

__all__ = [
    "border_weight_map",
    "class_balance_weights",
    "instance_borders",
    "nearest_two_distances",
    "separate_touching",
]

# The border term is dropped where it is below this (relative to w0); it bounds how far from
# each cell distances are computed, which is what makes the map fast on large images.
_REL_TOL = 1e-7


def class_balance_weights(mask: np.ndarray) -> np.ndarray:
    """Per-pixel weights that balance class frequencies: w_c = N / (K · n_c).

    N is the number of pixels, n_c the pixels of class c and K the number of classes present,
    so every present class carries the same total weight and the mean weight is 1.

    Args:
        mask: integer class map of any shape (H×W, D×H×W).

    Returns:
        float32 array shaped like ``mask``.

    Example:
        >>> class_balance_weights(np.array([[0, 0, 0, 1]])).tolist()
        [[0.6666666865348816, 0.6666666865348816, 0.6666666865348816, 2.0]]
    """
    mask = np.asarray(mask)
    if mask.size == 0:
        return np.zeros(mask.shape, np.float32)
    classes, inverse, counts = np.unique(mask, return_inverse=True, return_counts=True)
    per_class = mask.size / (len(classes) * counts.astype(np.float64))
    return per_class[inverse.reshape(mask.shape)].astype(np.float32)


def nearest_two_distances(
    instances: np.ndarray, *, max_distance: float = math.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from every pixel to the nearest and second-nearest instance.

    The distance to instance k is the Euclidean distance to its closest pixel (0 inside k),
    computed by ``scipy.ndimage.distance_transform_edt`` on k's bounding box grown by
    ``max_distance``: every pixel of k lies in that box, so the distance is exact there, and
    pixels outside it are farther than ``max_distance``, where it is reported as inf.

    Args:
        instances: integer labels (0 = background), H×W or D×H×W.
        max_distance: distances beyond this may be reported as inf.

    Returns:
        (d1, d2) float64 arrays shaped like ``instances``; inf where there is no such cell.
    """
    instances = np.asarray(instances)
    d1 = np.full(instances.shape, np.inf)
    d2 = np.full(instances.shape, np.inf)
    margin = int(math.ceil(max_distance)) if math.isfinite(max_distance) else max(instances.shape)
    for label, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        grown = tuple(
            slice(max(s.start - margin, 0), min(s.stop + margin, n))
            for s, n in zip(box, instances.shape, strict=True)
        )
        dist = ndimage.distance_transform_edt(instances[grown] != label)
        b1, b2 = d1[grown], d2[grown]  # views: updated in place
        np.minimum(b2, np.maximum(b1, dist), out=b2)
        np.minimum(b1, dist, out=b1)
    return d1, d2


def border_weight_map(
    instances: np.ndarray,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str | Mapping[int, float] | None = "balanced",
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The U-Net paper's pixel weight map (eq. 2) from an instance label image.

    The border term w0·exp(−(d1+d2)²/(2σ²)) is added on background pixels (label 0), the gaps
    between cells; pixels with fewer than two cells in the image get no border term.

    Args:
        instances: integer instance labels (0 = background), H×W (or D×H×W).
        w0: border weight (paper: 10).
        sigma: border width in pixels (paper: ≈ 5).
        class_weights: w_c: ``"balanced"`` (:func:`class_balance_weights` of ``mask``),
            ``None`` (1 everywhere) or a {class: weight} mapping.
        mask: class map for w_c; default ``instances > 0`` (background/foreground).

    Returns:
        float32 weight map shaped like ``instances``.

    Example:
        >>> labels = np.zeros((32, 32), np.int32); labels[4:14, 4:14] = 1
        >>> labels[4:14, 16:26] = 2
        >>> w = border_weight_map(labels, w0=10, sigma=5)
        >>> bool(w[8, 15] > w[8, 30])   # the gap between the cells weighs most
        True
    """
    instances = np.asarray(instances)
    if not np.issubdtype(instances.dtype, np.integer):
        raise ConfigError(f"instances: expected integer labels, got dtype {instances.dtype}")
    if sigma <= 0 or w0 < 0:
        raise ConfigError(f"border weight map: need sigma > 0 and w0 ≥ 0, got {sigma=}, {w0=}")
    classes = (instances > 0).astype(np.int64) if mask is None else np.asarray(mask)
    weights = _class_weight_map(classes, class_weights)
    if w0 == 0 or instances.max(initial=0) <= 0:
        return weights
    # Beyond this distance the term is below _REL_TOL·w0 (d1 + d2 ≥ d2 > margin).
    margin = sigma * math.sqrt(2.0 * math.log(1.0 / _REL_TOL))
    d1, d2 = nearest_two_distances(instances, max_distance=margin)
    background = (instances == 0) & np.isfinite(d2)
    total = d1[background] + d2[background]
    weights[background] += (w0 * np.exp(-(total**2) / (2.0 * sigma**2))).astype(np.float32)
    return weights


def _class_weight_map(
    mask: np.ndarray, class_weights: str | Mapping[int, float] | None
) -> np.ndarray:
    if class_weights is None:
        return np.ones(mask.shape, np.float32)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ConfigError(
                f"class_weights={class_weights!r}: use 'balanced', None or a {{class: weight}} dict"
            )
        return class_balance_weights(mask)
    lookup = {int(k): float(v) for k, v in class_weights.items()}
    missing = sorted(set(np.unique(mask).tolist()) - set(lookup))
    if missing:
        raise ConfigError(
            f"class_weights={lookup}: no weight for classes {missing} found in the mask"
        )
    classes, inverse = np.unique(mask, return_inverse=True)
    table = np.array([lookup[int(c)] for c in classes], np.float32)
    return table[inverse.reshape(mask.shape)]


def _neighbour_pairs(
    labels: np.ndarray, connectivity: int
) -> Iterator[tuple[tuple[slice, ...], np.ndarray, np.ndarray]]:
    """For every neighbour offset: (centre slice, centre labels, neighbour labels).

    Offsets have up to ``connectivity`` non-zero components (1: face neighbours, 4 in 2D;
    ``labels.ndim``: all, 8 in 2D); pixels beyond the image edge are not neighbours.
    """
    for offset in itertools.product((-1, 0, 1), repeat=labels.ndim):
        if not 0 < sum(map(abs, offset)) <= connectivity:
            continue
        pairs = list(zip(offset, labels.shape, strict=True))
        centre = tuple(slice(max(-o, 0), n - max(o, 0)) for o, n in pairs)
        neigh = tuple(slice(max(o, 0), n - max(-o, 0)) for o, n in pairs)
        yield centre, labels[centre], labels[neigh]


def instance_borders(
    instances: np.ndarray, *, touching_only: bool = False, connectivity: int = 1
) -> np.ndarray:
    """Inner border pixels of every instance: a neighbour has a different label.

    Args:
        instances: integer labels (0 = background), H×W or D×H×W.
        touching_only: only borders with another instance (not with the background).
        connectivity: 1 = face neighbours (a 1-pixel border), ``ndim`` = all neighbours.

    Returns:
        bool array shaped like ``instances``.

    Example:
        >>> instance_borders(np.array([[1, 1, 1, 2]])).astype(int).tolist()
        [[0, 0, 1, 1]]
    """
    instances = np.asarray(instances)
    border = np.zeros(instances.shape, bool)
    for centre, c, nb in _neighbour_pairs(instances, connectivity):
        hit = (c != nb) & (c > 0)
        border[centre] |= hit & (nb > 0) if touching_only else hit
    return border


def separate_touching(instances: np.ndarray) -> np.ndarray:
    """Set to background the pixels where two instances touch, leaving a 1-pixel gap.

    Where labels a > b meet (8-neighbourhood in 2D), a's pixels become 0, so no two instances
    touch afterwards, not even diagonally. The result is the kind of ground truth the U-Net
    paper trains on: cells separated by thin background lines that the border weight map
    emphasises.

    Args:
        instances: integer labels (0 = background), H×W or D×H×W.

    Returns:
        a copy of ``instances`` with the touching pixels set to 0.

    Example:
        >>> separate_touching(np.array([[1, 1, 2, 2]])).tolist()
        [[1, 1, 0, 2]]
    """
    instances = np.asarray(instances)
    carve = np.zeros(instances.shape, bool)
    for centre, c, nb in _neighbour_pairs(instances, instances.ndim):
        carve[centre] |= (nb > 0) & (nb < c)
    out = instances.copy()
    out[carve] = 0
    return out
