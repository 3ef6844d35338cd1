from __future__ import annotations

import numpy as np
import pytest
import torch

from unetkit.errors import ConfigError, DataError
from unetkit.regression.losses import (
    LOG_DEPTH_LIMIT,
    build_regression_loss,
    l1_loss,
    l2_loss,
    scale_invariant_log_loss,
    to_depth,
    to_prediction,
)


def _data(seed=0, shape=(3, 2, 6, 7)):
    g = np.random.default_rng(seed)
    target = g.uniform(0.5, 10.0, size=shape)
    pred = target * np.exp(g.normal(0, 0.3, size=shape))
    valid = g.random((shape[0],) + shape[2:]) > 0.3
    valid[1] = False  # an image without ground truth
    return pred, target, valid


def _silog_ref(pred, target, valid, lam):
    """Eigen et al. (2014) eq. 4 per image, float64, mean over images with valid pixels."""
    losses = []
    for p, t, v in zip(pred, target, valid, strict=True):
        m = np.broadcast_to(v, t.shape)
        if not m.any():
            continue
        d = np.log(p[m]) - np.log(t[m])
        n = d.size
        losses.append((d**2).sum() / n - lam * d.sum() ** 2 / n**2)
    return float(np.mean(losses))


def _t(a):
    return torch.from_numpy(np.asarray(a))


def test_l1_l2_match_float64_references_and_ignore_nan_in_invalid_pixels():
    pred, target, valid = _data()
    target_nan = target.copy()
    target_nan[np.broadcast_to(~valid[:, None], target.shape)] = np.nan
    m = np.broadcast_to(valid[:, None], target.shape)
    ref_l1 = np.abs(pred - target)[m].mean()
    ref_l2 = ((pred - target) ** 2)[m].mean()
    p = _t(pred).float().requires_grad_()
    l1 = l1_loss(p, _t(target_nan).float(), _t(valid))
    l1.backward()
    assert torch.isfinite(p.grad).all()
    assert p.grad[1].abs().sum() == 0  # no gradient from the image without ground truth
    np.testing.assert_allclose(float(l1.detach()), ref_l1, rtol=1e-5)
    l2 = l2_loss(_t(pred).float(), _t(target_nan).float(), _t(valid))
    np.testing.assert_allclose(float(l2), ref_l2, rtol=1e-5)
    # without a mask: every finite target counts
    np.testing.assert_allclose(
        float(l1_loss(_t(pred), _t(target))), np.abs(pred - target).mean(), rtol=1e-6
    )
    assert float(l1_loss(_t(pred), _t(target), torch.zeros_like(_t(valid)))) == 0.0


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.85, 1.0])
def test_silog_matches_eigen_formula(lam):
    pred, target, valid = _data(1)
    out = scale_invariant_log_loss(_t(pred), _t(target), _t(valid), lam=lam)
    np.testing.assert_allclose(float(out), _silog_ref(pred, target, valid, lam), rtol=1e-6)


def test_silog_scale_invariance_and_invalid_targets():
    pred, target, valid = _data(2)
    base = scale_invariant_log_loss(_t(pred), _t(target), _t(valid), lam=1.0)
    scaled = scale_invariant_log_loss(_t(3.7 * pred), _t(target), _t(valid), lam=1.0)
    np.testing.assert_allclose(float(scaled), float(base), rtol=1e-6, atol=1e-12)
    # lam = 0.5 is not invariant: a global scale costs (1 - lam) * log(s)^2 on top
    half = scale_invariant_log_loss(_t(pred), _t(target), _t(valid), lam=0.5)
    half_s = scale_invariant_log_loss(_t(2 * pred), _t(target), _t(valid), lam=0.5)
    assert float(half_s) > float(half)
    # zero / negative / NaN targets are missing pixels, even without a valid mask
    t = target.copy()
    t[0, :, 0, 0], t[0, :, 0, 1], t[0, :, 0, 2] = 0.0, -1.0, np.nan
    v = np.ones_like(valid)
    v[0, 0, :3] = False
    p = _t(pred).requires_grad_()
    out = scale_invariant_log_loss(p, _t(t), None)
    out.backward()
    assert torch.isfinite(p.grad).all()
    np.testing.assert_allclose(float(out.detach()), _silog_ref(pred, target, v, 0.5), rtol=1e-6)
    with pytest.raises(ConfigError, match="lam"):
        scale_invariant_log_loss(_t(pred), _t(target), lam=1.5)


def test_to_depth_is_exp_of_clamped_output():
    o = torch.tensor([-1000.0, -1.0, 0.0, 2.0, 1000.0])
    d = to_depth(o)
    assert torch.isfinite(d).all() and (d > 0).all()
    np.testing.assert_allclose(d[1:4].numpy(), np.exp([-1.0, 0.0, 2.0]), rtol=1e-6)
    np.testing.assert_allclose(float(d[-1]), np.exp(LOG_DEPTH_LIMIT), rtol=1e-6)
    assert torch.equal(to_prediction(o[1:4], "linear"), o[1:4])
    with pytest.raises(ConfigError, match="did you mean 'linear'"):
        to_prediction(o, "lineer")


def test_built_losses_read_the_batch_and_map_outputs():
    pred, target, valid = _data(3)
    outputs = _t(np.log(pred)).float()
    batch = {"target": _t(target).float(), "valid": _t(valid)}
    silog = build_regression_loss("silog")(outputs, batch)
    np.testing.assert_allclose(float(silog), _silog_ref(pred, target, valid, 0.5), rtol=1e-5)
    l1 = build_regression_loss("l1")(outputs, batch)  # on exp(outputs) = depth
    m = np.broadcast_to(valid[:, None], target.shape)
    np.testing.assert_allclose(float(l1), np.abs(pred - target)[m].mean(), rtol=1e-5)
    raw = _t(pred - 5.0).float()  # linear: signed predictions and targets, 0 is a value
    lin = {"target": _t(target - 5.0).float(), "valid": _t(valid)}
    l2 = build_regression_loss("l2", output="linear")(raw, lin)
    np.testing.assert_allclose(float(l2), ((pred - target) ** 2)[m].mean(), rtol=1e-5)


def test_loss_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'silog'"):
        build_regression_loss("silgo")
    with pytest.raises(ConfigError, match="output='depth'"):
        build_regression_loss("silog", output="linear")
    with pytest.raises(DataError, match="'target'"):
        build_regression_loss("l1")(torch.zeros(1, 1, 2, 2), {"image": torch.zeros(1)})
    with pytest.raises(DataError, match="out_channels=2"):
        build_regression_loss("l1")(torch.zeros(1, 1, 2, 2), {"target": torch.ones(1, 2, 2, 2)})


def test_valid_padding_outputs_are_compared_with_the_centre_of_the_target():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 10, 12, generator=g) + 0.5
    valid = torch.rand(2, 10, 12, generator=g) > 0.2
    outputs = torch.randn(2, 1, 6, 6, generator=g)
    loss = build_regression_loss("l1")(outputs, {"target": target, "valid": valid})
    crop_t, crop_v = target[:, :, 2:8, 3:9], valid[:, 2:8, 3:9]
    expected = l1_loss(torch.exp(outputs), crop_t, crop_v)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


def test_a_small_cnn_learns_depth_from_synthetic_scenes():
    """End to end on the built-in data: the silog loss falls when fitting 4 small scenes."""
    from unetkit.data.transforms import Normalize
    from unetkit.regression.datasets import SyntheticDepthDataset

    torch.manual_seed(0)
    ds = SyntheticDepthDataset(4, shape=(24, 24), transform=Normalize())
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("image", "target", "valid")}
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 1, 3, padding=1),
    )
    loss_fn = build_regression_loss("silog")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(batch["image"]), batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
