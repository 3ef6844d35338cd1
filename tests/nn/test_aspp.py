"""ASPP and atrous separable convolution, checked against float64 functional references."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.errors import ConfigError, InputSizeError
from unetkit.nn.aspp import ASPP, ImagePooling, SeparableConvNormAct
from unetkit.nn.conv import ConvNormAct

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _x(dims: int, c: int = 4, s: int = 9) -> torch.Tensor:
    return torch.randn(2, c, *([s] * dims), dtype=torch.float64)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_separable_equals_full_conv_with_factorised_kernel(dims: int) -> None:
    # depthwise k×k (rate r) then pointwise 1×1 is one k×k conv of rate r whose kernel is
    # K[o, c] = pw[o, c] · dw[c] and whose bias is pw_b + pw · dw_b (Chen et al. 2018, §3.2)
    sep = SeparableConvNormAct(dims, 4, 5, dilation=2, norm="none", act="none").double()
    dw, pw = sep.depthwise, sep.pointwise
    kernel = pw.weight.reshape(5, 4, *([1] * dims)) * dw.weight.reshape(1, 4, *dw.kernel_size)
    bias = pw.bias + pw.weight.reshape(5, 4) @ dw.bias
    x = _x(dims)
    ref = CONV[dims](x, kernel, bias, padding=2, dilation=2)
    torch.testing.assert_close(sep(x), ref)
    assert dw.groups == 4 and dw.dilation == (2,) * dims


def test_separable_parameter_count_with_norm() -> None:
    sep = SeparableConvNormAct(2, 2048, 256, dilation=12)  # an ASPP branch of the paper
    # depthwise 3·3·2048 + BN 2·2048 + pointwise 2048·256 + BN 2·256, no conv biases
    expected = 9 * 2048 + 2 * 2048 + 2048 * 256 + 2 * 256
    assert sum(p.numel() for p in sep.parameters()) == expected


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("separable", [False, True])
def test_aspp_shapes_any_dims(dims: int, separable: bool) -> None:
    aspp = ASPP(dims, 6, 4, rates=(1, 2, 3), separable=separable, norm="group")
    x = torch.randn(2, 6, *([7] * dims))
    assert aspp(x).shape == (2, 4, *([7] * dims))


def test_aspp_branches_and_rates() -> None:
    aspp = ASPP(2, 32, 16, rates=(12, 24, 36))
    # 1×1, three 3×3 atrous, image pooling -> 5 branches, projected from 5·16 channels
    assert len(aspp.branches) == 5
    assert isinstance(aspp.branches[-1], ImagePooling)
    kinds = [b.conv.kernel_size for b in aspp.branches[:4]]
    assert kinds == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert [b.conv.dilation for b in aspp.branches[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert [b.conv.padding for b in aspp.branches[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert aspp.project.conv.in_channels == 80 and aspp.rates == (12, 24, 36)
    sep = ASPP(2, 32, 16, rates=(6, 12, 18), separable=True)
    assert [b.depthwise.dilation for b in sep.branches[1:4]] == [(6, 6), (12, 12), (18, 18)]


def test_aspp_matches_functional_reference() -> None:
    torch.manual_seed(1)
    aspp = ASPP(2, 3, 2, rates=(1, 2), norm="none", dropout=0.0).double().eval()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    b = aspp.branches

    def conv(m: ConvNormAct, t: torch.Tensor, r: int = 1) -> torch.Tensor:
        pad = r * (m.conv.kernel_size[0] - 1) // 2
        return F.relu(F.conv2d(t, m.conv.weight, m.conv.bias, padding=pad, dilation=r))

    pooled = conv(b[3].block, x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, 6, 7)
    cat = torch.cat([conv(b[0], x), conv(b[1], x, 1), conv(b[2], x, 2), pooled], dim=1)
    torch.testing.assert_close(aspp(x), conv(aspp.project, cat))


def test_image_pooling_is_constant_over_space() -> None:
    pool = ImagePooling(3, 4, 3, norm="group", act="relu")
    y = pool(torch.randn(2, 4, 5, 6, 3))
    assert y.shape == (2, 3, 5, 6, 3)
    assert torch.equal(y, y[..., :1, :1, :1].expand_as(y))


FALLBACKS = [("instance", 8, 1), ("group", 8, 1), ("group", 64, 32)]


@pytest.mark.parametrize(("norm", "channels", "groups"), FALLBACKS)
def test_image_pooling_norm_of_one_value(norm: str, channels: int, groups: int) -> None:
    pool = ImagePooling(2, 4, channels, norm=norm, act="relu")
    assert isinstance(pool.block.norm, nn.GroupNorm) and pool.block.norm.num_groups == groups
    assert pool(torch.randn(1, 4, 5, 5)).shape == (1, channels, 5, 5)  # batch 1 trains


def test_batch_of_one_with_batch_norm_is_a_clear_error() -> None:
    aspp = ASPP(2, 4, 4)
    with pytest.raises(InputSizeError, match="batch of at least 2"):
        aspp(torch.randn(1, 4, 5, 5))
    assert aspp.eval()(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


def test_aspp_config_errors() -> None:
    with pytest.raises(ConfigError, match="rates"):
        ASPP(2, 4, 4, rates=(6, 0))
    with pytest.raises(ConfigError, match="dropout"):
        ASPP(2, 4, 4, dropout=1.0)
    with pytest.raises(ConfigError, match="did you mean 'batch'"):
        ASPP(2, 4, 4, norm="bacth")
