"""The ISBI 2012 challenge errors (segmentation.isbi) against independent references:
scikit-image's adapted Rand error, scikit-learn's F1, and a hand-computed stack."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as sk_label
from skimage.metrics import adapted_rand_error

from unetkit.errors import ConfigError, DataError
from unetkit.segmentation.instances import rand_error, rand_pair_counts
from unetkit.segmentation.isbi import ISBI_THRESHOLDS, isbi2012_errors, isbi2012_fscores


def _unassigned_as_singletons(pred: np.ndarray) -> np.ndarray:
    """Our rule "prediction 0 = paired with nothing" is a singleton segment per pixel in a
    tool that has no such rule (scikit-image treats test label 0 as one segment)."""
    out = pred.astype(np.int64).copy()
    zeros = out == 0
    out[zeros] = out.max() + 1 + np.arange(np.count_nonzero(zeros))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_rand_error_matches_skimage_adapted_rand_error(seed):
    rng = np.random.default_rng(seed)
    shape = (24, 31) if seed % 2 else (6, 7, 8)
    truth = rng.integers(0, 6, shape)  # 0 = background, ignored as in the challenge
    pred = rng.integers(0, 5, shape) * 3  # 0 = unassigned (boundary)
    reference = adapted_rand_error(truth, _unassigned_as_singletons(pred), ignore_labels=(0,))[0]
    assert rand_error(pred, truth) == pytest.approx(reference, abs=1e-12)
    tp, pairs_pred, pairs_true = rand_pair_counts(pred, truth)
    assert 0 <= tp <= min(pairs_pred, pairs_true)


def _smooth_stack(rng, n, shape):
    field = ndimage.gaussian_filter(rng.random((n, *shape)), sigma=(0, 2.5, 2.5))
    lo, hi = field.min(), field.max()
    return (field - lo) / (hi - lo)


def test_stack_fscores_match_skimage_and_sklearn_per_threshold():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    prob = _smooth_stack(rng, 3, (40, 48))  # blobby maps: many components per threshold
    truth = (_smooth_stack(rng, 3, (40, 48)) > 0.35).astype(np.uint8) * 255
    f = isbi2012_fscores(prob, truth)
    for i, thr in enumerate(ISBI_THRESHOLDS):
        # the stack = the slices side by side, each slice's segments labelled on its own
        true_seg, pred_seg, offset_t, offset_p = [], [], 0, 0
        for p, t in zip(prob, truth, strict=True):
            ts = sk_label(t > 0, connectivity=1)
            ps = sk_label(p > thr, connectivity=1)
            true_seg.append(np.where(ts > 0, ts + offset_t, 0))
            pred_seg.append(np.where(ps > 0, ps + offset_p, 0))
            offset_t, offset_p = offset_t + ts.max(), offset_p + ps.max()
        true_seg, pred_seg = np.hstack(true_seg), np.hstack(pred_seg)
        are = adapted_rand_error(true_seg, _unassigned_as_singletons(pred_seg), ignore_labels=(0,))
        assert f["rand"][i] == pytest.approx(1.0 - are[0], abs=1e-12), thr
        f1 = metrics.f1_score((truth > 0).ravel(), (prob > thr).ravel(), zero_division=0)
        assert f["pixel"][i] == pytest.approx(f1, abs=1e-12), thr


def test_maximum_is_taken_per_metric_over_thresholds():
    # Two 4x4 cells split by a 1-px membrane column. The cells' edge columns have p = 0.25
    # and the membrane p = 0.35: merging everything (t < 0.25) is best pixel-wise, but the
    # Rand index wants the cells apart (t >= 0.3), at the price of their edges.
    truth = np.ones((4, 9), np.uint8)
    truth[:, 4] = 0
    prob = np.full((4, 9), 0.9)
    prob[:, [3, 5]] = 0.25
    prob[:, 4] = 0.35
    s = isbi2012_errors(prob, truth)
    # t = 0.0: TP 32, predicted 36, true 32 -> F = 64/68
    assert (s.pixel_error, s.pixel_threshold) == (pytest.approx(4 / 68), 0.0)
    # t = 0.3: 12-px cells apart, edges unassigned: 2*C(12,2)=132 pairs, all true;
    # true pairs 2*C(16,2) = 240 -> F = 264/372 (t = 0.0: 480/736 = 0.652 is worse)
    assert (s.rand_error, s.rand_threshold) == (pytest.approx(1 - 264 / 372), 0.3)
    f = isbi2012_fscores(prob, truth)
    assert f["rand"][0] == pytest.approx(480 / 736)
    assert f["pixel"][-1] == 0.0 and f["rand"][-1] == 0.0  # t = 0.9: nothing is cell
    # a perfect map scores 0 at every threshold below 1
    assert isbi2012_errors(truth.astype(float), truth).rand_error == 0.0


def test_counts_are_summed_over_the_stack_not_averaged():
    good = np.ones((4, 4), np.uint8)
    bad_truth = np.ones((2, 9), np.uint8)
    bad_truth[:, 4] = 0
    bad_prob = np.ones((2, 9))  # the two true 2x4 cells merged through the membrane
    f = isbi2012_fscores([good.astype(float), bad_prob], [good, bad_truth])
    # slice 1: 120 = C(16,2) pairs, all right; slice 2: true 2*C(8,2) = 56,
    # predicted C(16,2) = 120 over the true-cell pixels, TP 56
    summed = 2 * (120 + 56) / ((120 + 120) + (120 + 56))
    assert f["rand"][0] == pytest.approx(summed)
    assert summed != pytest.approx((1.0 + 2 * 56 / (120 + 56)) / 2)  # not the slice mean


def test_bad_inputs_are_refused_with_one_line():
    with pytest.raises(DataError, match="do not match"):
        isbi2012_errors(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(DataError, match="2-D slices"):
        isbi2012_errors(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4)))
    with pytest.raises(DataError, match="NaN"):
        isbi2012_errors(np.full((4, 4), np.nan), np.ones((4, 4)))
    with pytest.raises(ConfigError, match="thresholds is empty"):
        isbi2012_errors(np.zeros((4, 4)), np.ones((4, 4)), thresholds=())
