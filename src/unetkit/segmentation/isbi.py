"""The ISBI 2012 EM segmentation challenge's own error definitions (the leaderboard the
U-Net paper reports: pixel error 0.0611, Rand error 0.0382).

The challenge scored a submitted *probability map* of a stack of 2-D slices, not one
segmentation (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142; Fiji's
``trainableSegmentation.metrics`` ``PixelError`` / ``RandError``, called by the
challenge's evaluation script with thresholds 0.0, 0.1, …, 0.9). For each threshold t the
map is binarised (``p > t`` = cell, the polarity of the labels: 1 = cell interior,
0 = membrane), and

* **pixel error** = 1 − the *maximal* F-score of pixel similarity: F of the cell class
  (TP = predicted and true cell pixels, precision TP/(TP+FP), recall TP/(TP+FN));
* **Rand error** = 1 − the *maximal* F-score of the foreground-restricted Rand index: the
  proposal's cells are the 4-connected components of ``p > t``, the truth's the
  4-connected components of its cell pixels, and F = 2·TP / (pairs_pred + pairs_true) over
  pairs of true-cell pixels (:func:`unetkit.segmentation.instances.rand_pair_counts`).

Counts are summed over the slices of the stack before the F-score (as Fiji sums them over
an ImageStack), and the maximum is taken over thresholds, each metric at its own best
threshold. For a membrane probability map pass ``1 - p_membrane``.

This is not the fraction of wrongly labelled pixels of one argmax segmentation
(:func:`unetkit.segmentation.metrics.pixel_error`): that is usually larger.

Example:
    >>> import numpy as np
    >>> truth = np.array([[1, 1, 0, 1, 1]])
    >>> prob = np.array([[0.9, 0.8, 0.45, 0.7, 0.95]])
    >>> s = isbi2012_errors(prob, truth)
    >>> (s.pixel_error, s.pixel_threshold, s.rand_error, s.rand_threshold)
    (0.0, 0.5, 0.0, 0.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from unetkit.errors import ConfigError, DataError
from unetkit.segmentation.instances import rand_pair_counts
from unetkit.segmentation.labels import as_numpy

__all__ = ["ISBI_THRESHOLDS", "ISBIScores", "isbi2012_errors", "isbi2012_fscores"]

#: The thresholds of the challenge's Fiji evaluation script: 0.0, 0.1, …, 0.9.
ISBI_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))


@dataclass(frozen=True)
class ISBIScores:
    """Challenge errors of a stack and the threshold at which each was reached.

    Attributes:
        pixel_error: 1 − maximal F-score of pixel similarity (cell class).
        pixel_threshold: the threshold of that maximum (the first one on ties).
        rand_error: 1 − maximal F-score of the foreground-restricted Rand index.
        rand_threshold: the threshold of that maximum (the first one on ties).
    """

    pixel_error: float
    pixel_threshold: float
    rand_error: float
    rand_threshold: float


def _slices(x: Any, name: str) -> list[np.ndarray]:
    """A 2-D slice, an (N, H, W) stack, or a sequence of 2-D slices -> list of slices."""
    if isinstance(x, (list, tuple)):
        slices = [as_numpy(s, name) for s in x]
    else:
        arr = as_numpy(x, name)
        slices = list(arr) if arr.ndim == 3 else [arr]  # other ranks are refused below
    for s in slices:
        if s.ndim != 2:
            raise DataError(
                f"{name}: expected 2-D slices (H, W) or a stack (N, H, W), got shape {s.shape}"
            )
    if not slices:
        raise DataError(f"{name}: no slice to score")
    return slices


def _fscore(tp: float, n_pred: float, n_true: float) -> float:
    """2·TP / (predicted + true positives); 1.0 when both are empty (empty agrees with empty,
    the rule of ``segmentation.metrics``; Fiji would report NaN and skip that threshold)."""
    return 1.0 if n_pred + n_true == 0 else 2.0 * tp / (n_pred + n_true)


def isbi2012_fscores(
    cell_probability: Any,
    cell_truth: Any,
    *,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
) -> dict[str, np.ndarray]:
    """The challenge's F-scores at each threshold, counts summed over the stack.

    Args:
        cell_probability: probability of *cell interior* per pixel (1 − membrane
            probability): one 2-D slice, an (N, H, W) stack or a sequence of slices.
        cell_truth: true labels of the same shape(s), nonzero = cell, 0 = membrane.
        thresholds: binarisation thresholds (``p > t`` is cell).

    Returns:
        ``{"pixel": F per threshold, "rand": F per threshold}`` (float64 arrays).
    """
    probs = _slices(cell_probability, "cell_probability")
    truths = _slices(cell_truth, "cell_truth")
    if len(probs) != len(truths) or any(
        p.shape != t.shape for p, t in zip(probs, truths, strict=False)
    ):
        raise DataError(
            f"cell_probability: {len(probs)} slice(s) of shape {probs[0].shape} do not match "
            f"cell_truth: {len(truths)} slice(s) of shape {truths[0].shape}"
        )
    if len(thresholds) == 0:
        raise ConfigError("isbi2012_fscores: thresholds is empty; give at least one")
    four = ndimage.generate_binary_structure(2, 1)  # Fiji labels 4-connected components
    pixel = np.zeros((len(thresholds), 3))  # TP, predicted cell, true cell
    rand = np.zeros((len(thresholds), 3))  # TP, pairs predicted, pairs true
    for prob, truth in zip(probs, truths, strict=True):
        prob = prob.astype(np.float64)
        if not np.isfinite(prob).all():
            raise DataError("cell_probability: contains NaN or infinite values")
        cells = truth > 0
        true_segments = ndimage.label(cells, structure=four)[0]
        for i, thr in enumerate(thresholds):
            proposal = prob > thr
            pixel[i] += (np.count_nonzero(proposal & cells), proposal.sum(), cells.sum())
            segments = ndimage.label(proposal, structure=four)[0]
            rand[i] += rand_pair_counts(segments, true_segments)
    return {
        "pixel": np.array([_fscore(*row) for row in pixel]),
        "rand": np.array([_fscore(*row) for row in rand]),
    }


def isbi2012_errors(
    cell_probability: Any,
    cell_truth: Any,
    *,
    thresholds: Sequence[float] = ISBI_THRESHOLDS,
) -> ISBIScores:
    """Pixel error and Rand error as the ISBI 2012 challenge defined them (module docs):
    1 − the maximal F-score over ``thresholds``, each at its own best threshold.

    Args:
        cell_probability: probability of cell interior (1 − membrane probability), one
            2-D slice, an (N, H, W) stack or a sequence of slices.
        cell_truth: true labels, nonzero = cell, 0 = membrane, same shape(s).
        thresholds: binarisation thresholds; default the challenge's 0.0, 0.1, …, 0.9.

    Example:
        >>> isbi2012_errors(np.array([[0.2, 0.9]]), np.array([[0, 1]])).pixel_error
        0.0
    """
    f = isbi2012_fscores(cell_probability, cell_truth, thresholds=thresholds)
    best_pixel, best_rand = int(np.argmax(f["pixel"])), int(np.argmax(f["rand"]))
    return ISBIScores(
        pixel_error=1.0 - float(f["pixel"][best_pixel]),
        pixel_threshold=float(thresholds[best_pixel]),
        rand_error=1.0 - float(f["rand"][best_rand]),
        rand_threshold=float(thresholds[best_rand]),
    )
