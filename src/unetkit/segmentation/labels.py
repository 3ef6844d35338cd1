"""Label-array helpers shared by the metrics and post-processing: numpy views of arrays or
tensors, integer label checks, and a fast ``np.unique`` for label images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unetkit.errors import DataError


def as_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view of an array-like or (detached, CPU) torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise DataError(f"{name}: expected a numeric array, got {type(x).__name__}")
    return arr


def as_labels(x: Any, name: str) -> np.ndarray:
    arr = as_numpy(x, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"{name}: expected an integer label array, got dtype {arr.dtype}; turn "
            f"probabilities into labels first (unetkit.segmentation.postprocess."
            f"probabilities_to_labels)"
        )
    return arr.astype(np.int64, copy=False)


def check_same_shape(a: np.ndarray, b: np.ndarray, where: str) -> None:
    if a.shape != b.shape:
        raise DataError(
            f"{where}: prediction shape {a.shape} differs from target shape {b.shape}; "
            f"both must be the same label image (no channel axis)"
        )


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct labels, index of each element's label): ``np.unique`` in O(n)."""
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi > 4 * flat.size + 1024:  # sparse / negative labels: sort instead
        ids, inverse = np.unique(flat, return_inverse=True)
        return ids, inverse.ravel()
    present = np.bincount(flat) > 0
    lut = np.cumsum(present) - 1
    return np.flatnonzero(present), lut[flat]
