"""Segmentation metrics on label arrays (numpy arrays or torch tensors, any number of dims):
the semantic ones here, the instance ones (Rand error, matching, AP) in
``segmentation.instances``, and one evaluation of an image over both.

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
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from unetkit.errors import ConfigError, DataError
from unetkit.segmentation.instances import (
    DSB_THRESHOLDS,
    instance_overlaps,
    match_overlaps,
    rand_error,
)
from unetkit.segmentation.labels import as_labels, check_same_shape

__all__ = [
    "ClassScores",
    "MetricAccumulator",
    "dice",
    "evaluate_segmentation",
    "iou",
    "pixel_error",
]


class ClassScores(NamedTuple):
    """Per-class scores (class index → score) and their mean over the scored classes."""

    per_class: dict[int, float]
    mean: float


def _confusion(pred, target, num_classes: int, ignore_index: int | None, where: str):
    """num_classes × num_classes counts; rows = target class, columns = predicted class."""
    if num_classes < 2:
        raise ConfigError(f"{where}: num_classes={num_classes}; need at least 2 (bg + fg)")
    p, t = as_labels(pred, f"{where} pred"), as_labels(target, f"{where} target")
    check_same_shape(p, t, where)
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
    p, t = as_labels(pred, "pixel_error pred"), as_labels(target, "pixel_error target")
    check_same_shape(p, t, "pixel_error")
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    if t.size == 0:
        raise DataError("pixel_error: no pixel to score (empty array or all ignored)")
    return float(np.count_nonzero(p != t)) / t.size


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
        ov = instance_overlaps(instances_pred, instances_true)
        m50 = match_overlaps(ov, 0.5)
        out["ap_50"], out["f1_50"] = m50.ap, m50.f1
        out["ap_50_95"] = float(np.mean([match_overlaps(ov, t).ap for t in DSB_THRESHOLDS]))
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
