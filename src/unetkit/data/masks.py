"""Mask files: decode class indices, binary masks and instance labels, and refuse what is
ambiguous or lossy (JPEG masks, binary masks read as instance labels).

Every failure raises :class:`~unetkit.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "LOSSY_EXTENSIONS",
    "MASK_MODES",
    "check_mask_options",
    "decode_mask",
    "looks_like_instances",
]

MASK_MODES = ("auto", "index", "binary", "instances")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")


def decode_mask(
    arr: np.ndarray,
    num_classes: int,
    *,
    path: str | os.PathLike | None = None,
    mode: str = "auto",
    spatial_dims: int = 2,
) -> np.ndarray:
    """Decode a mask file's array into int64 class indices or instance labels.

    Modes:
        ``"index"``: values are class indices 0..num_classes-1.
        ``"binary"``: values ⊆ {0, 255} or {0, 1}, decoded to 0/1.
        ``"instances"``: an instance label image (0 = background, 1..N = objects); the labels
        are returned, and the semantic mask is ``labels > 0``.
        ``"auto"``: binary when num_classes == 2 and values ⊆ {0, 255} or {0, 1}, else index;
        folder data sets read a 2-class mask with other values as instance labels
        (see :func:`looks_like_instances`).

    Args:
        arr: H×W (or D×H×W) integer array; a grey mask saved as RGB(A) is accepted.
        num_classes: number of classes (≥ 2), background included.
        path: the source file, named in errors.
        mode: one of the modes above.
        spatial_dims: 2 or 3.

    Returns:
        int64 array with the spatial shape of ``arr``.

    Raises:
        DataError: values that do not fit the mode, e.g. ``masks/img3.png: mask values
            [0, 1, 7] do not fit num_classes=2 (...)``.

    Example:
        >>> decode_mask(np.array([[0, 255]], np.uint8), 2).tolist()
        [[0, 1]]
    """
    check_mask_options(num_classes, mode)
    name = str(path) if path is not None else "mask"
    if path is not None and Path(path).suffix.lower() in LOSSY_EXTENSIONS:
        raise DataError(
            f"{name}: JPEG masks are lossy (compression changes label values at every "
            "edge); save masks as PNG or TIFF"
        )
    labels = _mask_to_integers(np.asarray(arr), name, spatial_dims)
    values = np.unique(labels)
    if mode == "instances":
        if values[0] < 0:
            raise DataError(f"{name}: instance labels must be ≥ 0, found {_fmt_values(values)}")
        if values[-1] > 0 and _binary_scale(values) and ndimage.label(labels > 0)[1] > 1:
            raise DataError(
                f"{name}: mask is binary ({_fmt_values(values)}) with several separate regions, "
                "so as instance labels they would be one object; use --mask-mode binary "
                "(objects are then the connected components)"
            )
        return labels
    binary = _binary_scale(values)
    if mode == "binary" or (mode == "auto" and num_classes == 2 and binary):
        if not binary:
            raise DataError(
                f"{name}: mask values {_fmt_values(values)} are not binary (expected 0/1 or "
                "0/255); use mask_mode='index' (--mask-mode index) for class indices"
            )
        return (labels > 0).astype(np.int64)
    if values[0] < 0 or values[-1] >= num_classes:
        raise DataError(
            f"{name}: mask values {_fmt_values(values)} do not fit num_classes={num_classes} "
            f"(expected 0..{num_classes - 1}, or 0/255 for binary); set --num-classes or "
            "--mask-mode (num_classes= / mask_mode= in the API; 'instances' for label images)"
        )
    return labels


def looks_like_instances(arr: np.ndarray, num_classes: int) -> bool:
    """True for what folder data sets in ``mode="auto"`` read as an instance label image.

    A 2-class task whose single-channel integer mask is 16/32-bit with values beyond 0/1, or
    8-bit with at least three objects (values 0 plus three or more labels, not 0/255). A mask
    with one stray value (e.g. 0, 1, 7) stays a class mask, so the error names the value.
    """
    arr = np.asarray(arr)
    if num_classes != 2 or arr.dtype.kind not in "ui" or arr.ndim > 3:
        return False
    values = np.unique(arr)
    if values[0] < 0 or values[-1] <= 1 or _binary_scale(values):
        return False
    return arr.dtype.itemsize >= 2 or values.size >= 4


def check_mask_options(num_classes: int, mode: str) -> None:
    """Raise ConfigError unless ``mode`` is a mask mode and ``num_classes`` ≥ 2."""
    if mode not in MASK_MODES:
        raise ConfigError(
            f"mask_mode={mode!r}{did_you_mean(mode, MASK_MODES)}: "
            f"use one of {', '.join(MASK_MODES)}"
        )
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}: need at least 2 (background + 1 class)")


def _mask_to_integers(arr: np.ndarray, name: str, spatial_dims: int) -> np.ndarray:
    if arr.ndim == spatial_dims + 1 and arr.shape[-1] in (3, 4):
        colour = arr[..., :3]
        if not (colour == colour[..., :1]).all():
            raise DataError(
                f"{name}: colour mask of shape {arr.shape}; masks must hold class indices or "
                "instance labels in one grey channel (colour palettes: save as palette PNG)"
            )
        arr = colour[..., 0]
    if arr.ndim != spatial_dims:
        raise DataError(f"{name}: mask of shape {arr.shape} is not a {spatial_dims}D label image")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not (arr == np.round(arr)).all():
            raise DataError(
                f"{name}: mask holds non-integer or NaN values; masks must be integer labels"
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name}: unsupported mask dtype {arr.dtype}")
    return arr.astype(np.int64)


def _binary_scale(values: np.ndarray) -> bool:
    present = set(values.tolist())
    return present <= {0, 1} or present <= {0, 255}


def _fmt_values(values: Sequence[int] | np.ndarray, limit: int = 8) -> str:
    vals = [int(v) for v in values]
    if len(vals) <= limit:
        return str(vals)
    head = ", ".join(str(v) for v in vals[: limit - 1])
    return f"[{head}, ..., {vals[-1]}] ({len(vals)} distinct values)"
