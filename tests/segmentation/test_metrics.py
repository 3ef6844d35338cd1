"""Metrics against brute-force float64 references and hand-built cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from unetkit.errors import ConfigError, DataError
from unetkit.segmentation.instances import (
    DSB_THRESHOLDS,
    best_rand_error,
    instance_ap,
    instance_ap_range,
    match_instances,
    rand_error,
)
from unetkit.segmentation.metrics import (
    MetricAccumulator,
    dice,
    evaluate_segmentation,
    iou,
    pixel_error,
)


def _set_scores(pred, target, c):
    p, t = set(np.flatnonzero(pred == c)), set(np.flatnonzero(target == c))
    if not p and not t:
        return 1.0, 1.0
    inter = len(p & t)
    return 2 * inter / (len(p) + len(t)), inter / len(p | t)


@pytest.mark.parametrize("shape", [(9,), (4, 5), (2, 3, 4)])
def test_dice_iou_match_set_reference(shape):
    rng = np.random.default_rng(len(shape))
    pred, target = rng.integers(0, 4, shape), rng.integers(0, 4, shape)
    pred[pred == 3] = 0  # class 3 only in target: score 0
    d = dice(pred, target, num_classes=5)
    j = iou(torch.from_numpy(pred), torch.from_numpy(target), num_classes=5)
    for c in range(1, 5):
        ref_d, ref_j = _set_scores(pred, target, c)
        assert d.per_class[c] == pytest.approx(ref_d)
        assert j.per_class[c] == pytest.approx(ref_j)
    assert d.per_class[3] == 0.0 and d.per_class[4] == 1.0  # 4 absent from both
    assert d.mean == pytest.approx(np.mean([d.per_class[c] for c in range(1, 5)]))
    assert set(dice(pred, target, num_classes=5, ignore_background=False).per_class) == {
        0,
        1,
        2,
        3,
        4,
    }


def test_empty_mask_rules_dice_iou():
    empty = np.zeros((4, 4), int)
    full = np.ones((4, 4), int)
    assert dice(empty, empty, num_classes=2).mean == 1.0
    assert iou(empty, empty, num_classes=2).mean == 1.0
    assert dice(empty, full, num_classes=2).mean == 0.0
    assert iou(full, empty, num_classes=2).mean == 0.0


def test_ignore_index_and_errors():
    pred = np.array([1, 1, 0, 1])
    target = np.array([1, 255, 0, 0])
    assert dice(pred, target, num_classes=2, ignore_index=255).per_class[1] == pytest.approx(2 / 3)
    assert pixel_error(pred, target, ignore_index=255) == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="num_classes"):
        dice(pred, target, num_classes=2)
    with pytest.raises(DataError, match="probabilities_to_labels"):
        dice(pred.astype(float), target, num_classes=2)
    with pytest.raises(DataError, match="shape"):
        iou(pred[:3], target, num_classes=256)


def test_pixel_error_hand_case():
    target = np.array([[0, 1, 1], [0, 0, 1]])
    pred = np.array([[0, 1, 0], [1, 0, 1]])
    assert pixel_error(pred, target) == pytest.approx(2 / 6)
    assert pixel_error(torch.from_numpy(target), torch.from_numpy(target)) == 0.0


def _rand_error_bruteforce(pred, target):
    """ISBI 2012 foreground-restricted Rand error by explicit pair counting (float64)."""
    p, t = pred.ravel().astype(np.int64), target.ravel()
    idx = np.flatnonzero(t != 0)
    # predicted 0 = unassigned: give each such pixel its own (negative) singleton label
    p = np.where(p == 0, -1 - np.arange(p.size), p)
    tp = same_p = same_t = 0.0
    for a, b in itertools.combinations(idx, 2):
        sp, st = p[a] == p[b], t[a] == t[b]
        tp += sp and st
        same_p += sp
        same_t += st
    if same_p + same_t == 0:
        return 0.0
    precision = tp / same_p if same_p else 0.0
    recall = tp / same_t if same_t else 0.0
    return 1.0 - (0.0 if tp == 0 else 2 * precision * recall / (precision + recall))


@pytest.mark.parametrize("seed", range(6))
def test_rand_error_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    shape = (5, 6) if seed % 2 else (3, 3, 3)
    target = rng.integers(0, 4, shape)
    pred = rng.integers(0, 3 + seed, shape) * 7  # labels need not be consecutive
    assert rand_error(pred, target) == pytest.approx(_rand_error_bruteforce(pred, target))


def test_rand_error_hand_cases():
    t = np.array([1, 1, 2, 2, 0, 0])
    assert rand_error(t, t) == 0.0
    assert rand_error(t * 3 + 1, t) == 0.0  # relabelling does not matter...
    assert rand_error(np.array([1, 1, 2, 2, 5, 5]), t) == 0.0  # ...nor target background
    # merge the two objects: TP = 2, pairs_pred = 6, pairs_true = 2 -> F = 4/8
    assert rand_error(np.array([1, 1, 1, 1, 0, 0]), t) == pytest.approx(0.5)
    # everything unassigned (boundary) inside the target: no TP -> error 1
    assert rand_error(np.zeros(6, int), t) == 1.0
    # fewer than two target-foreground pixels: nothing to score -> 0
    assert rand_error(np.array([1, 2, 3]), np.array([0, 4, 0])) == 0.0


def test_best_rand_error_picks_the_separating_threshold():
    truth = np.array([[1, 1, 0, 2, 2]])
    prob = np.array([[0.9, 0.8, 0.35, 0.7, 0.95]])
    err, thr = best_rand_error(prob, truth, thresholds=(0.1, 0.3, 0.5, 0.9))
    assert (err, thr) == (0.0, 0.5)
    assert rand_error((prob > 0.3).astype(int), truth) > 0  # merged at 0.3


def _square(shape, y0, x0, size, label, out=None):
    out = np.zeros(shape, np.int64) if out is None else out
    out[y0 : y0 + size, x0 : x0 + size] = label
    return out


def test_instance_ap_on_constructed_overlaps():
    shape = (30, 40)
    true = _square(shape, 0, 0, 10, 5)
    true = _square(shape, 15, 0, 10, 9, true)
    true = _square(shape, 0, 20, 10, 2, true)  # missed entirely -> FN
    pred = _square(shape, 0, 2, 10, 1)  # IoU with 5: 80/120 = 2/3
    pred = _square(shape, 15, 1, 10, 3, pred)  # IoU with 9: 90/110 = 9/11
    pred = _square(shape, 20, 25, 4, 4, pred)  # background -> FP
    m = match_instances(pred, true)
    assert sorted(m.pairs) == [(1, 5, pytest.approx(2 / 3)), (3, 9, pytest.approx(9 / 11))]
    assert m.false_positives == (4,) and m.false_negatives == (2,)
    assert instance_ap(pred, true) == pytest.approx(2 / 4)
    assert instance_ap(pred, true, threshold=0.7) == pytest.approx(1 / 5)  # only 9/11 left
    # DSB thresholds: 0.50..0.65 -> 2 matches; 0.70..0.80 -> 1; 0.85..0.95 -> 0
    per_t = [2 / 4] * 4 + [1 / 5] * 3 + [0.0] * 3
    assert instance_ap_range(pred, true) == pytest.approx(np.mean(per_t))
    assert len(DSB_THRESHOLDS) == 10 and DSB_THRESHOLDS[-1] == 0.95


def test_instance_ap_empty_rules():
    empty = np.zeros((5, 5), int)
    one = _square((5, 5), 1, 1, 2, 1)
    assert instance_ap(empty, empty) == 1.0 and instance_ap_range(empty, empty) == 1.0
    assert instance_ap(one, empty) == 0.0 and instance_ap(empty, one) == 0.0


def test_low_threshold_matching_is_one_to_one_and_maximal():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred = rng.integers(0, 4, (6, 6))
        true = rng.integers(0, 4, (6, 6))
        m = match_instances(pred, true, threshold=0.1)
        ps, ts = [p for p, _, _ in m.pairs], [t for _, t, _ in m.pairs]
        assert len(set(ps)) == len(ps) and len(set(ts)) == len(ts)
        # brute force: the largest number of pairs with IoU > 0.1
        p_ids, t_ids = np.unique(pred[pred > 0]), np.unique(true[true > 0])

        ious = {
            (a, b): ((pred == a) & (true == b)).sum() / ((pred == a) | (true == b)).sum()
            for a in p_ids
            for b in t_ids
        }
        best = 0
        for perm in itertools.permutations(t_ids, min(len(p_ids), len(t_ids))):
            for subset in itertools.permutations(p_ids, len(perm)):
                hits = sum(ious[a, b] > 0.1 for a, b in zip(subset, perm, strict=True))
                best = max(best, hits)
        assert m.tp == best
        assert m.tp + m.fp == len(p_ids) and m.tp + m.fn == len(t_ids)


def test_evaluate_segmentation_and_accumulator():
    target = np.zeros((6, 6), int)
    target[1:3, 1:3] = 1
    target[4:6, 3:6] = 2
    pred = target.copy()
    pred[4, 3] = 0
    inst_true = target.copy()
    inst_pred = pred.copy()
    m = evaluate_segmentation(
        pred, target, num_classes=3, instances_pred=inst_pred, instances_true=inst_true
    )
    assert m["dice_1"] == 1.0 and m["dice_2"] == pytest.approx(10 / 11)
    assert m["iou_mean"] == pytest.approx((1 + 5 / 6) / 2)
    assert m["pixel_error"] == pytest.approx(1 / 36)
    assert m["ap_50"] == 1.0 and m["n_instances_pred"] == 2.0
    # object 2 has IoU 5/6: above 0.85 it is one FP + one FN -> AP = 1/3
    per_t = [1.0 if t < 5 / 6 else 1 / 3 for t in DSB_THRESHOLDS]
    assert m["ap_50_95"] == pytest.approx(np.mean(per_t))
    assert m["rand_error"] == pytest.approx(rand_error(inst_pred, inst_true))
    with pytest.raises(ConfigError, match="both"):
        evaluate_segmentation(pred, target, num_classes=3, instances_pred=inst_pred)

    acc = MetricAccumulator(num_classes=3)
    acc.update(pred, target, instances_pred=inst_pred, instances_true=inst_true)
    acc.update(target, target)
    acc.add({"pixel_error": math.nan, "extra": 4.0})
    mean = acc.compute()
    assert len(acc) == 3
    assert mean["pixel_error"] == pytest.approx((1 / 36 + 0) / 2)  # NaN skipped
    assert mean["ap_50"] == 1.0 and mean["extra"] == 4.0
    other = MetricAccumulator()
    other.add({"extra": 2.0})
    acc.merge(other)
    assert acc.compute()["extra"] == 3.0 and len(acc) == 4
    with pytest.raises(ConfigError, match="num_classes"):
        other.update(pred, target)
