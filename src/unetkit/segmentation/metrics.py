"""Segmentation metrics on label arrays (numpy arrays or torch tensors, any number of dims).

Semantic metrics take class-index maps (``pred`` and ``target`` of equal shape); instance
metrics take instance-label images (0 = background, each object one positive integer,
labels need not be consecutive). Everything is computed in float64 / int64.

Empty-mask rules — one rule throughout, *empty agrees with empty = perfect score*::

    metric                  both empty   only prediction empty   only target empty
    dice / iou, per class   1.0          0.0                     0.0
    dice / iou, mean        mean of the per-class values above
    instance_ap (any thr.)  1.0          0.0                     0.0
    instance_ap_range       1.0          0.0                     0.0  (mean over thresholds)
    rand_error              0.0 when the target has < 2 foreground pixels (no pair to
                            score; the prediction outside the target foreground is ignored)
    pixel_error             no special case; an array with no pixel raises DataError

"Empty" means: no pixel of that class (Dice/IoU), no instance (AP). Pixels whose target
equals ``ignore_index`` (when given) are dropped before anything is counted.

Example:
    >>> import numpy as np
    >>> target = np.array([[0, 1], [1, 1]]); pred = np.array([[0, 1], [0, 1]])
    >>> round(dice(pred, target, num_classes=2).mean, 4)
    0.8
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from unetkit.errors import ConfigError, DataError

__all__ = [
    "DSB_THRESHOLDS",
    "ClassScores",
    "InstanceMatch",
    "MetricAccumulator",
    "best_rand_error",
    "dice",
    "evaluate_segmentation",
    "instance_ap",
    "instance_ap_range",
    "iou",
    "match_instances",
    "pixel_error",
    "rand_error",
]

#: IoU thresholds of the 2018 Data Science Bowl score: 0.50, 0.55, …, 0.95.
DSB_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _as_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view of an array-like or (detached, CPU) torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise DataError(f"{name}: expected a numeric array, got {type(x).__name__}")
    return arr


def _as_labels(x: Any, name: str) -> np.ndarray:
    arr = _as_numpy(x, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"{name}: expected an integer label array, got dtype {arr.dtype}; turn "
            f"probabilities into labels first (unetkit.segmentation.postprocess."
            f"probabilities_to_labels)"
        )
    return arr.astype(np.int64, copy=False)


def _same_shape(a: np.ndarray, b: np.ndarray, where: str) -> None:
    if a.shape != b.shape:
        raise DataError(
            f"{where}: prediction shape {a.shape} differs from target shape {b.shape}; "
            f"both must be the same label image (no channel axis)"
        )


class ClassScores(NamedTuple):
    """Per-class scores (class index → score) and their mean over the scored classes."""

    per_class: dict[int, float]
    mean: float


def _confusion(pred, target, num_classes: int, ignore_index: int | None, where: str):
    """num_classes × num_classes counts; rows = target class, columns = predicted class."""
    if num_classes < 2:
        raise ConfigError(f"{where}: num_classes={num_classes}; need at least 2 (bg + fg)")
    p, t = _as_labels(pred, f"{where} pred"), _as_labels(target, f"{where} target")
    _same_shape(p, t, where)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    for arr, role in ((p, "pred"), (t, "target")):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise DataError(
                f"{where}: {role} values span [{arr.min()}, {arr.max()}] but num_classes="
                f"{num_classes}; pass the right num_classes or an ignore_index"
            )
    flat = t.ravel() * num_classes + p.ravel()
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _overlap_scores(pred, target, num_classes, ignore_background, ignore_index, kind):
    cm = _confusion(pred, target, num_classes, ignore_index, kind)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    num = 2 * tp if kind == "dice" else tp
    den = 2 * tp + fp + fn if kind == "dice" else tp + fp + fn
    # Empty-mask rule: class absent from both -> 1.0 (den == 0 only then).
    score = np.where(den > 0, num / np.maximum(den, 1), 1.0)
    classes = range(1 if ignore_background else 0, num_classes)
    per_class = {c: float(score[c]) for c in classes}
    return ClassScores(per_class, float(np.mean(list(per_class.values()))))


def dice(
    pred: Any,
    target: Any,
    *,
    num_classes: int,
    ignore_background: bool = True,
    ignore_index: int | None = None,
) -> ClassScores:
    """Dice (F1) per class, 2TP / (2TP + FP + FN), and the mean over scored classes.

    A class absent from both prediction and target scores 1.0; absent from one only, 0.0.

    Args:
        pred, target: integer class maps of equal shape (any dims), values in [0, num_classes).
        num_classes: number of classes including background (2 for binary masks).
        ignore_background: leave class 0 out of the scores.
        ignore_index: target value whose pixels are dropped.

    Example:
        >>> dice(np.array([0, 1, 1]), np.array([0, 1, 0]), num_classes=2).per_class
        {1: 0.6666666666666666}
    """
    return _overlap_scores(pred, target, num_classes, ignore_background, ignore_index, "dice")


def iou(
    pred: Any,
    target: Any,
    *,
    num_classes: int,
    ignore_background: bool = True,
    ignore_index: int | None = None,
) -> ClassScores:
    """Intersection over union (Jaccard) per class, TP / (TP + FP + FN), and the mean.

    Same arguments and empty-mask rule as :func:`dice`.

    Example:
        >>> iou(np.array([0, 1, 1]), np.array([0, 1, 0]), num_classes=2).mean
        0.5
    """
    return _overlap_scores(pred, target, num_classes, ignore_background, ignore_index, "iou")


def pixel_error(pred: Any, target: Any, *, ignore_index: int | None = None) -> float:
    """Fraction of pixels whose label differs: 1 − pixel accuracy.

    The ISBI 2012 EM challenge's pixel error (reported in Ronneberger et al. 2015, Table 1)
    for binary membrane / cell maps; for multi-class maps it is 1 − overall accuracy.

    Example:
        >>> pixel_error(np.array([0, 1, 1, 1]), np.array([0, 1, 0, 1]))
        0.25
    """
    p, t = _as_labels(pred, "pixel_error pred"), _as_labels(target, "pixel_error target")
    _same_shape(p, t, "pixel_error")
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    if t.size == 0:
        raise DataError("pixel_error: no pixel to score (empty array or all ignored)")
    return float(np.count_nonzero(p != t)) / t.size


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    p = _as_labels(pred_labels, "rand_error pred_labels").ravel()
    t = _as_labels(target_labels, "rand_error target_labels").ravel()
    _same_shape(p, t, "rand_error")
    fg = t != 0
    p, t = p[fg], t[fg]
    t_idx = _compact(t)[1]
    pairs_true = _pairs(np.bincount(t_idx))
    assigned = p != 0
    p_ids, p_idx = _compact(p[assigned])
    pairs_pred = _pairs(np.bincount(p_idx))
    joint = t_idx[assigned] * len(p_ids) + p_idx
    tp = _pairs(np.bincount(_compact(joint)[1]))
    denominator = pairs_pred + pairs_true
    if denominator == 0:
        return 0.0
    return 1.0 - 2.0 * tp / denominator


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
    prob = _as_numpy(probabilities, "best_rand_error probabilities").astype(np.float64)
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


def _overlaps(pred_instances: Any, true_instances: Any) -> _Overlaps:
    # Sparse on purpose: a dense P×T matrix of a 3-D volume with 10^4 cells would not fit.
    p = _as_labels(pred_instances, "pred_instances")
    t = _as_labels(true_instances, "true_instances")
    _same_shape(p, t, "instance matching")
    if (p.size and p.min() < 0) or (t.size and t.min() < 0):
        raise DataError("instance matching: instance labels must be ≥ 0 (0 = background)")
    p_ids, p_inv = _compact(p)
    t_ids, t_inv = _compact(t)
    area_p, area_t = np.bincount(p_inv), np.bincount(t_inv)
    both = (p.ravel() > 0) & (t.ravel() > 0)
    keys, key_inv = _compact(p_inv[both] * len(t_ids) + t_inv[both])
    inter = np.bincount(key_inv, minlength=len(keys)).astype(np.float64)
    rows, cols = np.divmod(keys, max(len(t_ids), 1))
    iou_values = inter / (area_p[rows] + area_t[cols] - inter)
    return _Overlaps(p_ids[p_ids > 0], t_ids[t_ids > 0], p_ids[rows], t_ids[cols], iou_values)


def _match(ov: _Overlaps, threshold: float) -> InstanceMatch:
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
    return _match(_overlaps(pred_instances, true_instances), threshold)


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
    ov = _overlaps(pred_instances, true_instances)
    return float(np.mean([_match(ov, float(t)).ap for t in thresholds]))


def evaluate_segmentation(
    pred: Any,
    target: Any,
    *,
    num_classes: int,
    instances_pred: Any = None,
    instances_true: Any = None,
    ignore_index: int | None = None,
) -> dict[str, float]:
    """All metrics of one image as a flat dict (for logs and the metrics CSV).

    Keys: ``dice_mean``, ``iou_mean``, ``dice_<c>`` and ``iou_<c>`` for foreground classes
    c ≥ 1, ``pixel_error``; with instance images also ``ap_50`` (DSB AP at IoU > 0.5),
    ``ap_50_95`` (mean over DSB thresholds), ``f1_50``, ``rand_error`` and the counts
    ``n_instances_pred`` / ``n_instances_true``. Empty-mask rules: see the module docs.

    Example:
        >>> m = evaluate_segmentation(np.array([0, 1]), np.array([0, 1]), num_classes=2)
        >>> m["dice_mean"], m["pixel_error"]
        (1.0, 0.0)
    """
    out: dict[str, float] = {}
    for name, fn in (("dice", dice), ("iou", iou)):
        scores = fn(pred, target, num_classes=num_classes, ignore_index=ignore_index)
        out[f"{name}_mean"] = scores.mean
        out.update({f"{name}_{c}": v for c, v in scores.per_class.items()})
    out["pixel_error"] = pixel_error(pred, target, ignore_index=ignore_index)
    if (instances_pred is None) != (instances_true is None):
        raise ConfigError(
            "evaluate_segmentation: pass both instances_pred and instances_true, or neither"
        )
    if instances_pred is not None:
        ov = _overlaps(instances_pred, instances_true)
        m50 = _match(ov, 0.5)
        out["ap_50"], out["f1_50"] = m50.ap, m50.f1
        out["ap_50_95"] = float(np.mean([_match(ov, t).ap for t in DSB_THRESHOLDS]))
        out["rand_error"] = rand_error(instances_pred, instances_true)
        out["n_instances_pred"] = float(len(ov.pred_ids))
        out["n_instances_true"] = float(len(ov.true_ids))
    return out


class MetricAccumulator:
    """Average per-image metric dicts over a data set.

    Each key is averaged over the images that reported it with a finite value (NaN is
    skipped), so images with and without instance labels can be mixed.

    Args:
        num_classes: used by :meth:`update` (not needed if you only :meth:`add` dicts).
        ignore_index: passed on by :meth:`update`.

    Example:
        >>> acc = MetricAccumulator(num_classes=2)
        >>> _ = acc.update(np.array([0, 1]), np.array([0, 1]))
        >>> _ = acc.update(np.array([1, 1]), np.array([0, 1]))
        >>> acc.compute()["pixel_error"]
        0.25
    """

    def __init__(self, num_classes: int | None = None, *, ignore_index: int | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._images = 0

    def __len__(self) -> int:
        return self._images

    def add(self, metrics: Mapping[str, float]) -> None:
        """Add one image's metrics."""
        self._images += 1
        for key, value in metrics.items():
            v = float(value)
            if math.isfinite(v):
                self._sums[key] = self._sums.get(key, 0.0) + v
                self._counts[key] = self._counts.get(key, 0) + 1

    def update(
        self, pred: Any, target: Any, *, instances_pred: Any = None, instances_true: Any = None
    ) -> dict[str, float]:
        """Evaluate one image with :func:`evaluate_segmentation`, add it and return it."""
        if self.num_classes is None:
            raise ConfigError("MetricAccumulator.update needs num_classes=... at construction")
        metrics = evaluate_segmentation(
            pred,
            target,
            num_classes=self.num_classes,
            instances_pred=instances_pred,
            instances_true=instances_true,
            ignore_index=self.ignore_index,
        )
        self.add(metrics)
        return metrics

    def merge(self, other: MetricAccumulator) -> None:
        """Fold in another accumulator (e.g. gathered from another process)."""
        self._images += other._images
        for key, s in other._sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + s
            self._counts[key] = self._counts.get(key, 0) + other._counts[key]

    def compute(self) -> dict[str, float]:
        """Mean of each metric over the images that reported it."""
        return {k: self._sums[k] / self._counts[k] for k in sorted(self._sums)}

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
        self._images = 0
