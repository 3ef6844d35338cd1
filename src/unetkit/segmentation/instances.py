"""Instance metrics on instance-label images (0 = background, each object one positive
integer, labels need not be consecutive): the ISBI 2012 Rand error and one-to-one instance
matching with the 2018 Data Science Bowl average precision. The empty-mask rules are those of
``segmentation.metrics`` (empty agrees with empty = perfect score).

Example:
    >>> import numpy as np
    >>> instance_ap(np.array([[1, 1, 0]]), np.array([[2, 2, 0]]))
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from unetkit.errors import ConfigError, DataError
from unetkit.segmentation.labels import as_labels, as_numpy, check_same_shape, compact_labels

#: IoU thresholds of the 2018 Data Science Bowl score: 0.50, 0.55, …, 0.95.
DSB_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float(np.sum(counts * (counts - 1) / 2))


def rand_error(pred_labels: Any, target_labels: Any) -> float:
    """Foreground-restricted Rand error of the ISBI 2012 EM segmentation challenge.

    Implements the challenge's 2012 definition (Arganda-Carreras et al. 2015, Front.
    Neuroanat. 9:142; Fiji ``RandError``, N-choose-2 form): 1 − F-score of the Rand index
    restricted to the target's foreground. Over all unordered pairs of *distinct* pixels
    that are foreground (≠ 0) in the target:

    * TP = pairs in one target segment and one predicted segment,
    * precision = TP / (pairs in one predicted segment), recall = TP / (pairs in one
      target segment), F = 2PR / (P + R) = 2·TP / (pairs_pred + pairs_true).

    Target background (0) pixels are left out. Predicted label 0 inside the target
    foreground means "unassigned" (boundary): such a pixel is paired with nothing.
    The later (2013+) challenge score V_rand uses p_ij² (self-pairs included) after border
    thinning; it differs from this one by O(1/n). The challenge reports the *best* score
    over thresholds of a probability map: see :func:`best_rand_error`.

    Empty rule: fewer than 2 target-foreground pixels means no pair to score → 0.0. If
    the target has pairs but the prediction joins none of them (TP = 0) → 1.0.

    Args:
        pred_labels: predicted segment labels (0 = boundary / unassigned).
        target_labels: ground-truth segment labels (0 = background), same shape.

    Example:
        >>> t = np.array([1, 1, 2, 2]); rand_error(np.array([1, 1, 1, 1]), t)
        0.5
    """
    tp, pairs_pred, pairs_true = rand_pair_counts(pred_labels, target_labels)
    denominator = pairs_pred + pairs_true
    if denominator == 0:
        return 0.0
    return 1.0 - 2.0 * tp / denominator


def rand_pair_counts(pred_labels: Any, target_labels: Any) -> tuple[float, float, float]:
    """The pair counts behind :func:`rand_error`: (TP, pairs in one predicted segment,
    pairs in one target segment), over pairs of distinct target-foreground pixels.

    Counts of several images add up to the counts of the stack, which is how the ISBI 2012
    evaluation scores a stack (``segmentation.isbi``).

    Example:
        >>> rand_pair_counts(np.array([1, 1, 1, 1]), np.array([1, 1, 2, 2]))
        (2.0, 6.0, 2.0)
    """
    p = as_labels(pred_labels, "rand_error pred_labels").ravel()
    t = as_labels(target_labels, "rand_error target_labels").ravel()
    check_same_shape(p, t, "rand_error")
    fg = t != 0
    p, t = p[fg], t[fg]
    t_idx = compact_labels(t)[1]
    pairs_true = _pairs(np.bincount(t_idx))
    assigned = p != 0
    p_ids, p_idx = compact_labels(p[assigned])
    pairs_pred = _pairs(np.bincount(p_idx))
    joint = t_idx[assigned] * len(p_ids) + p_idx
    tp = _pairs(np.bincount(compact_labels(joint)[1]))
    return tp, pairs_pred, pairs_true


def best_rand_error(
    probabilities: Any,
    target_labels: Any,
    *,
    thresholds: Sequence[float] = tuple(round(0.1 * i, 1) for i in range(10)),
    connectivity: int = 1,
) -> tuple[float, float]:
    """Minimal :func:`rand_error` over thresholds of a foreground probability map.

    As in the ISBI 2012 evaluation: for each threshold t the proposal is the connected
    components (``connectivity`` 1 = 4-neighbourhood in 2D) of ``probabilities > t``.
    Pass the probability of *cell interior*; for a membrane probability map use 1 − p.

    Returns:
        (error, threshold) at the best threshold (the first one on ties).

    Example:
        >>> prob = np.array([[0.9, 0.2, 0.8]]); truth = np.array([[1, 0, 2]])
        >>> best_rand_error(prob, truth)
        (0.0, 0.2)
    """
    prob = as_numpy(probabilities, "best_rand_error probabilities").astype(np.float64)
    structure = ndimage.generate_binary_structure(prob.ndim, connectivity)
    best = (math.inf, float("nan"))
    for thr in thresholds:
        labels = ndimage.label(prob > thr, structure=structure)[0]
        err = rand_error(labels, target_labels)
        if err < best[0]:
            best = (err, float(thr))
    if not math.isfinite(best[0]):
        raise ConfigError("best_rand_error: thresholds is empty; give at least one")
    return best


@dataclass(frozen=True)
class InstanceMatch:
    """One-to-one matching of predicted to true instances at an IoU threshold.

    Attributes:
        pairs: (pred_label, true_label, iou) for each match (IoU > threshold).
        false_positives: unmatched predicted labels. false_negatives: unmatched true labels.
        threshold: the IoU threshold used.
    """

    pairs: tuple[tuple[int, int, float], ...]
    false_positives: tuple[int, ...]
    false_negatives: tuple[int, ...]
    threshold: float

    @property
    def tp(self) -> int:
        return len(self.pairs)

    @property
    def fp(self) -> int:
        return len(self.false_positives)

    @property
    def fn(self) -> int:
        return len(self.false_negatives)

    @property
    def ap(self) -> float:
        """DSB2018 "precision": TP / (TP + FP + FN); 1.0 when both sides are empty."""
        total = self.tp + self.fp + self.fn
        return 1.0 if total == 0 else self.tp / total

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN); 1.0 when both sides are empty."""
        total = 2 * self.tp + self.fp + self.fn
        return 1.0 if total == 0 else 2 * self.tp / total


class _Overlaps(NamedTuple):
    """Positive labels of each image and the IoU of every overlapping (pred, true) pair."""

    pred_ids: np.ndarray
    true_ids: np.ndarray
    pair_pred: np.ndarray
    pair_true: np.ndarray
    pair_iou: np.ndarray


def instance_overlaps(pred_instances: Any, true_instances: Any) -> _Overlaps:
    # Sparse on purpose: a dense P×T matrix of a 3-D volume with 10^4 cells would not fit.
    p = as_labels(pred_instances, "pred_instances")
    t = as_labels(true_instances, "true_instances")
    check_same_shape(p, t, "instance matching")
    if (p.size and p.min() < 0) or (t.size and t.min() < 0):
        raise DataError("instance matching: instance labels must be ≥ 0 (0 = background)")
    p_ids, p_inv = compact_labels(p)
    t_ids, t_inv = compact_labels(t)
    area_p, area_t = np.bincount(p_inv), np.bincount(t_inv)
    both = (p.ravel() > 0) & (t.ravel() > 0)
    keys, key_inv = compact_labels(p_inv[both] * len(t_ids) + t_inv[both])
    inter = np.bincount(key_inv, minlength=len(keys)).astype(np.float64)
    rows, cols = np.divmod(keys, max(len(t_ids), 1))
    iou_values = inter / (area_p[rows] + area_t[cols] - inter)
    return _Overlaps(p_ids[p_ids > 0], t_ids[t_ids > 0], p_ids[rows], t_ids[cols], iou_values)


def match_overlaps(ov: _Overlaps, threshold: float) -> InstanceMatch:
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"instance matching: threshold={threshold}; expected 0 <= t < 1")
    ok = ov.pair_iou > threshold
    pp, pt, values = ov.pair_pred[ok], ov.pair_true[ok], ov.pair_iou[ok]
    if threshold < 0.5 and len(values):
        # Hungarian matching: maximise the number of matches, then their total IoU.
        # (At IoU > 0.5 an object can overlap only one other that much: no choice to make.)
        rows_u, r = np.unique(pp, return_inverse=True)
        cols_u, c = np.unique(pt, return_inverse=True)
        score = np.zeros((len(rows_u), len(cols_u)))
        score[r, c] = 1.0 + values / (2 * min(score.shape))
        ri, ci = linear_sum_assignment(-score)
        keep = score[ri, ci] > 0
        chosen = set(zip(rows_u[ri[keep]].tolist(), cols_u[ci[keep]].tolist(), strict=True))
        sel = np.array([(a, b) in chosen for a, b in zip(pp.tolist(), pt.tolist(), strict=True)])
        pp, pt, values = pp[sel], pt[sel], values[sel]
    pairs = tuple((int(a), int(b), float(v)) for a, b, v in zip(pp, pt, values, strict=True))
    fp = tuple(int(x) for x in np.setdiff1d(ov.pred_ids, pp))
    fn = tuple(int(x) for x in np.setdiff1d(ov.true_ids, pt))
    return InstanceMatch(pairs, fp, fn, float(threshold))


def match_instances(pred_instances: Any, true_instances: Any, threshold: float = 0.5):
    """Match predicted to true instances one-to-one where IoU > ``threshold``.

    For ``threshold`` ≥ 0.5 every candidate pair is unique; below it, matching is the
    assignment with the most matches (ties broken by total IoU).

    Args:
        pred_instances, true_instances: instance-label images of equal shape (0 = bg).
        threshold: IoU must be strictly greater than this (0 ≤ t < 1).

    Example:
        >>> m = match_instances(np.array([1, 1, 0, 2]), np.array([3, 3, 3, 0]))
        >>> m.pairs, m.false_positives, m.false_negatives
        (((1, 3, 0.6666666666666666),), (2,), ())
    """
    return match_overlaps(instance_overlaps(pred_instances, true_instances), threshold)


def instance_ap(pred_instances: Any, true_instances: Any, threshold: float = 0.5) -> float:
    """Instance "average precision" of the 2018 Data Science Bowl at one IoU threshold.

    AP = TP / (TP + FP + FN) with one-to-one matching at IoU > ``threshold``
    (:func:`match_instances`). Both images without instances → 1.0; one side empty → 0.0.

    Example:
        >>> instance_ap(np.array([1, 1, 0, 2]), np.array([3, 3, 3, 0]))
        0.5
    """
    return match_instances(pred_instances, true_instances, threshold).ap


def instance_ap_range(
    pred_instances: Any,
    true_instances: Any,
    thresholds: Sequence[float] = DSB_THRESHOLDS,
) -> float:
    """Mean of :func:`instance_ap` over ``thresholds`` (DSB2018: 0.5, 0.55, …, 0.95).

    Example:
        >>> instance_ap_range(np.array([1, 1, 0]), np.array([1, 1, 0]))
        1.0
    """
    if len(thresholds) == 0:
        raise ConfigError("instance_ap_range: thresholds is empty; give at least one")
    ov = instance_overlaps(pred_instances, true_instances)
    return float(np.mean([match_overlaps(ov, float(t)).ap for t in thresholds]))
