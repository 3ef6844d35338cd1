from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from unetkit.errors import DataError
from unetkit.regression.metrics import DEPTH_METRICS, RegressionMetrics, depth_metrics, psnr
from unetkit.training.tasks import SupervisedTask, reduce_sums


def test_ten_percent_overestimate():
    t = np.linspace(1.0, 10.0, 30).reshape(5, 6)
    m = depth_metrics(1.1 * t, t)
    assert m["abs_rel"] == pytest.approx(0.1)
    assert m["sq_rel"] == pytest.approx(np.mean(0.01 * t))
    assert m["rmse"] == pytest.approx(0.1 * np.sqrt(np.mean(t**2)))
    assert m["rmse_log"] == pytest.approx(math.log(1.1))
    assert m["log10"] == pytest.approx(math.log10(1.1))
    assert m["silog"] == pytest.approx(0.0, abs=1e-5)  # a pure scale error
    assert (m["delta1"], m["delta2"], m["delta3"]) == (1.0, 1.0, 1.0)
    m = depth_metrics(1.3 * t, t)  # 1.25 < 1.3 < 1.25²
    assert (m["delta1"], m["delta2"]) == (0.0, 1.0)


def test_hand_computed_example_with_mask_and_missing_pixels():
    t = np.array([1.0, 2.0, 4.0, 8.0, 0.0, np.nan, 3.0])
    p = np.array([1.0, 3.0, 4.0, 4.0, 5.0, 5.0, 100.0])
    valid = np.array([1, 1, 1, 1, 1, 1, 0], bool)  # the last pixel is masked out
    m = depth_metrics(p, t, valid)
    # valid: (p, t) = (1, 1), (3, 2), (4, 4), (4, 8); the 0 and NaN targets are missing
    assert m["abs_rel"] == pytest.approx((0 + 0.5 + 0 + 0.5) / 4)
    assert m["sq_rel"] == pytest.approx((0 + 1 / 2 + 0 + 16 / 8) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 1 + 0 + 16) / 4))
    d = [0.0, math.log(1.5), 0.0, math.log(0.5)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(np.mean(np.square(d))))
    assert m["silog"] == pytest.approx(100 * math.sqrt(np.mean(np.square(d)) - np.mean(d) ** 2))
    assert m["delta1"] == pytest.approx(0.5)  # ratios 1, 1.5, 1, 2
    assert m["delta2"] == pytest.approx(0.75)  # 1.5 < 1.5625
    assert m["delta3"] == pytest.approx(0.75)  # 2 > 1.953
    capped = depth_metrics(p, t, valid, max_depth=5.0)  # drops t = 8; clips p to 5
    assert capped["abs_rel"] == pytest.approx(0.5 / 3)
    assert all(math.isnan(v) for v in depth_metrics(p, t, np.zeros(7, bool)).values())
    assert set(m) == set(DEPTH_METRICS)
    with pytest.raises(DataError, match="differ in shape"):
        depth_metrics(p[:3], t)


def test_psnr_matches_skimage_and_hand_value():
    g = np.random.default_rng(0)
    clean = g.random((3, 16, 16))
    noisy = clean + g.normal(0, 0.05, clean.shape)
    expected = peak_signal_noise_ratio(clean, noisy, data_range=1.0)
    assert psnr(noisy, clean, data_range=1.0) == pytest.approx(expected)
    assert psnr(np.full((4, 4), 25.5), np.zeros((4, 4)), data_range=255) == pytest.approx(20.0)
    assert psnr(clean, clean) == math.inf
    v = np.zeros((16, 16), bool)
    v[:8] = True
    half = peak_signal_noise_ratio(clean[:, :8], noisy[:, :8], data_range=1.0)
    assert psnr(noisy, clean, valid=v) == pytest.approx(half)


def _batch(seed=0):
    g = np.random.default_rng(seed)
    target = g.uniform(1.0, 10.0, (3, 1, 8, 9))
    pred = target * np.exp(g.normal(0, 0.25, target.shape))
    valid = g.random((3, 8, 9)) > 0.25
    valid[2] = False  # no ground truth in the third image
    return pred, target, valid


def test_regression_metrics_are_per_image_sums_of_depth_metrics():
    pred, target, valid = _batch()
    batch = {"target": torch.from_numpy(target).float(), "valid": torch.from_numpy(valid)}
    outputs = torch.from_numpy(np.log(pred)).float()
    rm = RegressionMetrics("depth")
    sums = rm(outputs, batch)
    per = [depth_metrics(p, t, v) for p, t, v in zip(pred, target, valid, strict=True)][:2]
    for name in ("abs_rel", "rmse", "delta1"):
        assert sums[name] == pytest.approx(sum(m[name] for m in per), rel=1e-5)
        assert sums[name + "/count"] == 2.0
    assert (rm.monitor, rm.mode) == ("val/abs_rel", "min")
    # through the trainer's task: averages over the 2 images that have ground truth
    task = SupervisedTask(lambda o, b: o.sum() * 0, rm, monitor=rm.monitor, mode=rm.mode)
    stats = task.validation_metrics(torch.nn.Identity(), {"image": outputs, **batch})
    means = reduce_sums(stats)
    assert means["val/abs_rel"] == pytest.approx(np.mean([m["abs_rel"] for m in per]), rel=1e-5)


def test_regression_metrics_linear_output_reports_psnr():
    g = np.random.default_rng(1)
    clean = g.random((2, 1, 12, 12))
    noisy = clean + g.normal(0, 0.1, clean.shape)
    batch = {"target": torch.from_numpy(clean).float()}
    rm = RegressionMetrics("linear")
    sums = rm(torch.from_numpy(noisy).float(), batch)
    ref = [peak_signal_noise_ratio(c, n, data_range=1.0) for c, n in zip(clean, noisy, strict=True)]
    assert sums["psnr"] == pytest.approx(sum(ref), rel=1e-4)
    assert sums["mae"] == pytest.approx(np.abs(noisy - clean).mean(axis=(1, 2, 3)).sum(), 1e-4)
    assert (rm.monitor, rm.mode) == ("val/psnr", "max")
