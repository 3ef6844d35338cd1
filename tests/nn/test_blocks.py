from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unetkit.errors import ConfigError
from unetkit.nn.conv import ConvNormAct, DoubleConv
from unetkit.nn.dims import activation, norm_nd
from unetkit.nn.init import he_init
from unetkit.nn.sampling import (
    Downsample,
    Upsample,
    center_crop,
    crop_to,
    merge_skip,
    pad_to_multiple,
    pixel_shuffle_nd,
)


def _x(dims: int, c: int = 3, s: int = 9) -> torch.Tensor:
    return torch.randn(2, c, *([s] * dims))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("norm", ["none", "batch", "group", "instance", "layer"])
def test_conv_norm_act_same_and_valid(dims: int, norm: str) -> None:
    same = ConvNormAct(dims, 3, 4, norm=norm, padding="same")
    valid = ConvNormAct(dims, 3, 4, norm=norm, padding="valid")
    assert same(_x(dims)).shape == (2, 4, *([9] * dims))
    assert valid(_x(dims)).shape == (2, 4, *([7] * dims))
    assert valid.shrink() == 2 and same.shrink() == 0
    # bias is redundant before a norm layer
    assert (same.conv.bias is None) == (norm != "none")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_double_conv_and_dilation(dims: int) -> None:
    block = DoubleConv(dims, 3, 5, padding="valid", dropout=0.5)
    assert block(_x(dims, s=11)).shape == (2, 5, *([7] * dims))
    dil = ConvNormAct(dims, 3, 2, dilation=2, padding="same")
    assert dil(_x(dims)).shape[2:] == _x(dims).shape[2:]


def test_conv_matches_functional_reference() -> None:
    block = ConvNormAct(2, 2, 3, norm="none", act="relu", padding="valid").double()
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    ref = F.relu(F.conv2d(x, block.conv.weight, block.conv.bias))
    torch.testing.assert_close(block(x), ref)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["maxpool", "avgpool", "conv"])
def test_downsample(dims: int, mode: str) -> None:
    assert Downsample(dims, 3, mode=mode)(_x(dims, s=8)).shape == (2, 3, *([4] * dims))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["transposed", "interp", "pixelshuffle"])
def test_upsample(dims: int, mode: str) -> None:
    up = Upsample(dims, 4, 2, mode=mode)
    assert up(_x(dims, c=4, s=5)).shape == (2, 2, *([10] * dims))


def test_pixel_shuffle_nd_matches_torch_2d() -> None:
    x = torch.randn(2, 12, 3, 5)
    torch.testing.assert_close(pixel_shuffle_nd(x, 2), F.pixel_shuffle(x, 2))


def test_pixel_shuffle_nd_3d_places_subpixels() -> None:
    # channel k = (c, fz, fy, fx) lands at spatial offset (fz, fy, fx)
    x = torch.arange(8.0).reshape(1, 8, 1, 1, 1)
    y = pixel_shuffle_nd(x, 2)[0, 0]
    expect = np.arange(8).reshape(2, 2, 2)
    np.testing.assert_array_equal(y.numpy(), expect)


def test_center_crop_and_merge_skip() -> None:
    skip = torch.arange(36.0).reshape(1, 1, 6, 6)
    x = torch.zeros(1, 2, 2, 2)
    merged = merge_skip(x, skip)
    assert merged.shape == (1, 3, 2, 2)
    torch.testing.assert_close(merged[0, 0], skip[0, 0, 2:4, 2:4])
    assert center_crop(skip, (3, 4)).shape == (1, 1, 3, 4)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pad_to_multiple_round_trip(dims: int) -> None:
    x = _x(dims, s=5)
    padded, size = pad_to_multiple(x, 4)
    assert padded.shape[2:] == (8,) * dims and size == (5,) * dims
    torch.testing.assert_close(crop_to(padded, size), x)
    tiny, _ = pad_to_multiple(_x(dims, s=1), 8)  # too short to reflect: replicate instead
    assert tiny.shape[2:] == (8,) * dims


def test_norm_and_activation_errors_suggest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'batch'"):
        norm_nd("bacth", 2, 4)
    with pytest.raises(ConfigError, match="did you mean 'relu'"):
        activation("relu6x")
    with pytest.raises(ConfigError, match="dims=4"):
        ConvNormAct(4, 1, 1)


def test_group_norm_groups_divide_channels() -> None:
    gn = norm_nd("group", 2, 24)
    assert 24 % gn.num_groups == 0


def test_he_init_std() -> None:
    block = ConvNormAct(2, 64, 128, norm="none")
    he_init(block)
    fan_in = 64 * 9
    std = block.conv.weight.std().item()
    assert abs(std - (2 / fan_in) ** 0.5) < 0.01 * (2 / fan_in) ** 0.5 * 10
    assert torch.all(block.conv.bias == 0)
