"""Losses against torch.nn.functional and float64 hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unetkit.errors import ConfigError, DataError, InputSizeError
from unetkit.segmentation.losses import (
    build_loss,
    cross_entropy,
    deep_supervision_loss,
    dice_ce_loss,
    soft_dice_loss,
)

SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}


def _data(dims: int, c: int = 3, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, *SPATIAL[dims], generator=g)
    target = torch.randint(0, max(c, 2), (n, *SPATIAL[dims]), generator=g)
    return logits, target


def _log_softmax64(logits: torch.Tensor) -> np.ndarray:
    x = logits.double().numpy()
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ce_matches_torch_with_class_weights_and_ignore(dims):
    logits, target = _data(dims)
    target[0, ..., 0] = -100
    cw = torch.tensor([0.2, 1.0, 3.0])
    ours = cross_entropy(logits, target, class_weights=cw)
    ref = F.cross_entropy(logits, target, weight=cw, ignore_index=-100)
    torch.testing.assert_close(ours, ref)
    ours_sum = cross_entropy(logits, target, reduction="sum")
    torch.testing.assert_close(ours_sum, F.cross_entropy(logits, target, reduction="sum"))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_weighted_ce_equals_float64_manual_sum_and_mean(dims):
    logits, target = _data(dims, seed=dims)
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(9)) * 10
    target[1, ..., -1] = 7  # ignored via ignore_index below
    logp = _log_softmax64(logits)
    t = target.numpy()
    valid = t != 7
    nll = -np.take_along_axis(logp, np.where(valid, t, 0)[:, None], axis=1)[:, 0]
    manual_sum = float((weight.double().numpy() * nll * valid).sum())
    manual_mean = manual_sum / valid.sum()
    got_sum = cross_entropy(logits, target, weight=weight, ignore_index=7, reduction="sum")
    got_mean = cross_entropy(logits, target, weight=weight, ignore_index=7)
    assert got_sum.item() == pytest.approx(manual_sum, rel=1e-5)
    assert got_mean.item() == pytest.approx(manual_mean, rel=1e-5)
    per_pixel = cross_entropy(logits, target, weight=weight, ignore_index=7, reduction="none")
    assert per_pixel.shape == target.shape
    assert torch.all(per_pixel[~torch.from_numpy(valid)] == 0)


def test_unit_weight_map_is_plain_ce():
    logits, target = _data(2)
    ones = torch.ones(target.shape)
    torch.testing.assert_close(
        cross_entropy(logits, target, weight=ones), F.cross_entropy(logits, target)
    )
    # An N×1×*spatial weight map and target are accepted too.
    torch.testing.assert_close(
        cross_entropy(logits, target[:, None], weight=ones[:, None]),
        F.cross_entropy(logits, target),
    )


def test_bce_single_channel_float_int_and_class_weights():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 6, 6, generator=g)
    soft = torch.rand(2, 6, 6, generator=g)
    ref = F.binary_cross_entropy_with_logits(logits[:, 0], soft)
    torch.testing.assert_close(cross_entropy(logits, soft), ref)
    hard = (soft > 0.5).long()
    ref_hard = F.binary_cross_entropy_with_logits(logits[:, 0], hard.float())
    torch.testing.assert_close(cross_entropy(logits, hard), ref_hard)
    # class weights [bg, fg] in float64 by hand: Σ a·ℓ / Σ a
    x, t = logits[:, 0].double().numpy(), hard.double().numpy()
    ell = np.logaddexp(0, x) - t * x
    a = np.where(t == 1, 4.0, 0.5)
    got = cross_entropy(logits, hard, class_weights=[0.5, 4.0]).item()
    assert got == pytest.approx(float((a * ell).sum() / a.sum()), rel=1e-5)


def test_gradient_flows_and_ignored_pixels_get_none():
    logits, target = _data(2)
    logits.requires_grad_(True)
    target[0, 0, :] = -100
    loss = dice_ce_loss(logits, target, weight=torch.full(target.shape, 2.0))
    loss.backward()
    grad = logits.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.all(grad[0, :, 0, :] == 0)


def test_all_ignored_gives_zero_with_graph():
    logits, target = _data(2)
    logits.requires_grad_(True)
    target[:] = -100
    loss = cross_entropy(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def _dice64(logits, target, include_background, smooth):
    p = np.exp(_log_softmax64(logits))
    c = logits.shape[1]
    onehot = np.moveaxis(np.eye(c)[target.numpy()], -1, 1)
    axes = (0, *range(2, p.ndim))
    inter = (p * onehot).sum(axes)
    den = p.sum(axes) + onehot.sum(axes)
    d = (2 * inter + smooth) / (den + smooth)
    return 1 - (d if include_background else d[1:]).mean()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("include_background", [False, True])
def test_soft_dice_matches_float64_batch_dice(dims, include_background):
    logits, target = _data(dims, c=4, seed=5)
    got = soft_dice_loss(logits, target, include_background=include_background, smooth=1e-3)
    ref = _dice64(logits, target, include_background, 1e-3)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_soft_dice_perfect_prediction_near_zero_and_empty_class_rule():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:5, 2:5] = 1
    perfect = 60.0 * F.one_hot(target, 3).movedim(-1, 1).float() - 30.0
    # class 2 absent from target and (practically) from prediction: empty == empty -> perfect
    assert soft_dice_loss(perfect, target).item() < 1e-5
    # predicting class 2 where the target has none costs ~1 for that class
    wrong = perfect.clone()
    wrong[:, 2, 0, 0], wrong[:, 0, 0, 0] = 30.0, -30.0
    assert soft_dice_loss(wrong, target).item() == pytest.approx(0.5, abs=1e-3)
    # sigmoid head: [1 - p, p] scored as classes 0 and 1
    single = perfect[:, 1:2] - perfect[:, 0:1]
    assert soft_dice_loss(single, target.clamp(max=1)).item() < 1e-5


def test_dice_ce_is_weighted_sum():
    logits, target = _data(2)
    expected = 0.3 * cross_entropy(logits, target) + 2.0 * soft_dice_loss(logits, target)
    torch.testing.assert_close(
        dice_ce_loss(logits, target, ce_weight=0.3, dice_weight=2.0), expected
    )


def test_input_errors():
    logits, target = _data(2)
    with pytest.raises(InputSizeError, match="center_crop"):
        cross_entropy(logits, target[:, :-1])
    with pytest.raises(DataError, match="long"):
        cross_entropy(logits, target.float())
    with pytest.raises(DataError, match=r"\[0, 2\]"):
        soft_dice_loss(logits, target + 1)
    with pytest.raises(DataError, match="1-channel"):
        cross_entropy(logits[:, :1], target * 2)
    with pytest.raises(ConfigError, match="class_weights"):
        cross_entropy(logits, target, class_weights=[1.0, 2.0])


def test_build_loss_names_options_and_weight_requirement():
    with pytest.raises(ConfigError, match="did you mean 'dice_ce'"):
        build_loss("dice-ce")
    with pytest.raises(ConfigError, match="did you mean 'smooth'"):
        build_loss("dice", smoth=1.0)
    logits, target = _data(2)
    weight = torch.rand(target.shape)
    wce = build_loss("weighted_ce")
    assert wce.needs_weight and not build_loss("ce").needs_weight
    with pytest.raises(ConfigError, match=r"batch\['weight'\]"):
        wce(logits, {"mask": target})
    torch.testing.assert_close(
        wce(logits, {"mask": target, "weight": weight}),
        cross_entropy(logits, target, weight=weight),
    )
    # "ce" ignores a weight map that happens to be in the batch
    torch.testing.assert_close(
        build_loss("ce")(logits, {"mask": target, "weight": weight}),
        F.cross_entropy(logits, target),
    )
    with pytest.raises(ConfigError, match="reduction"):
        build_loss("ce", reduction="none")  # a Loss always returns a scalar
    with pytest.raises(DataError, match="mask"):
        build_loss("dice")(logits, {"image": logits})
    dc = build_loss("dice_ce", dice_weight=0.5, include_background=True)
    torch.testing.assert_close(
        dc(logits, {"mask": target}),
        dice_ce_loss(logits, target, dice_weight=0.5, include_background=True),
    )


def test_deep_supervision_resizes_targets_nearest():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    outs = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)]
    got = deep_supervision_loss(outs, target, cross_entropy, weights=[2.0, 1.0])
    small = target[:, ::2, ::2]  # nearest down-sampling by 2 picks the even pixels
    expected = (2 / 3) * F.cross_entropy(outs[0], target) + (1 / 3) * F.cross_entropy(
        outs[1], small
    )
    torch.testing.assert_close(got, expected)
    # default weights 1, 1/2 normalised; the Loss object resizes the weight map too
    weight = torch.rand(2, 8, 8, generator=g)
    got = build_loss("weighted_ce")(outs, {"mask": target, "weight": weight})
    expected = (2 / 3) * cross_entropy(outs[0], target, weight=weight) + (1 / 3) * cross_entropy(
        outs[1], small, weight=weight[:, ::2, ::2]
    )
    torch.testing.assert_close(got, expected)
    with pytest.raises(ConfigError, match="one per head"):
        deep_supervision_loss(outs, target, cross_entropy, weights=[1.0])
