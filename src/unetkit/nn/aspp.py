"""Atrous separable convolution and Atrous Spatial Pyramid Pooling (DeepLabV3/V3+), any ``dims``.

ASPP (Chen et al., "Rethinking Atrous Convolution", 2017, §3.3; kept in DeepLabV3+, Chen et
al. ECCV 2018, §3.1) probes the deepest features in parallel with a 1×1 conv, three 3×3
atrous convs (rates 6/12/18 at output stride 16, doubled at output stride 8) and image-level
features (global average pool → 1×1 conv → norm → act → broadcast back), concatenates the
branches and projects them with a 1×1 conv. DeepLabV3+ optionally makes the 3×3 convs
depthwise separable ("atrous separable convolution", §3.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError, InputSizeError
from unetkit.nn.conv import ConvNormAct
from unetkit.nn.dims import NORMS, activation, check_dims, conv_nd, norm_nd

_GROUPS = 32  # norm_nd's default group count: up to 32 channels, one channel per group


class SeparableConvNormAct(nn.Module):
    """Atrous separable conv: depthwise dilated k×k conv → norm → act → 1×1 conv → norm → act.

    The norm and activation after the depthwise conv follow the official DeepLab
    implementation (its ``split_separable_conv2d``); the paper (Chen et al. 2018, §3.2,
    Fig. 3) factorises a k×k conv into a per-channel spatial conv and a 1×1 channel mix,
    cutting its parameters from ``k^d·C_in·C_out`` to ``k^d·C_in + C_in·C_out``.

    Args:
        dims: 1, 2 or 3.
        in_channels, out_channels: channels in and out.
        kernel_size: odd kernel size (default 3); same padding, output size = input size.
        dilation: atrous rate of the depthwise conv.
        norm: none | batch | group | instance | layer (convs have a bias only without norm).
        act: activation by short name.

    Example:
        >>> conv = SeparableConvNormAct(2, 8, 16, dilation=6)
        >>> conv(torch.zeros(2, 8, 13, 17)).shape
        torch.Size([2, 16, 13, 17])
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        dilation: int = 1,
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        conv = conv_nd(dims)
        bias = norm == "none"
        pad = dilation * (kernel_size - 1) // 2
        self.depthwise = conv(
            in_channels,
            in_channels,
            kernel_size,
            padding=pad,
            dilation=dilation,
            groups=in_channels,
            bias=bias,
        )
        self.depthwise_norm = norm_nd(norm, dims, in_channels)
        self.depthwise_act = activation(act, in_channels)
        self.pointwise = conv(in_channels, out_channels, 1, bias=bias)
        self.norm = norm_nd(norm, dims, out_channels)
        self.act = activation(act, out_channels)
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise_act(self.depthwise_norm(self.depthwise(x)))
        return self.act(self.norm(self.pointwise(x)))


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool → 1×1 conv → norm → act → broadcast.

    The pooled map holds one value per channel and image, so norms over a single value are
    undefined: ``instance``, and ``group`` when its groups hold one channel each (32 or fewer
    channels), use layer norm (one group over all channels) here instead.
    """

    def __init__(
        self, dims: int, in_channels: int, out_channels: int, *, norm: str, act: str
    ) -> None:
        super().__init__()
        single = norm == "instance" or (norm == "group" and out_channels <= _GROUPS)
        self.block = ConvNormAct(
            dims, in_channels, out_channels, 1, norm="layer" if single else norm, act=act
        )
        self.batch_norm = norm == "batch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, x.dim()))
        if self.training and self.batch_norm and x.shape[0] == 1:
            raise InputSizeError(
                f"ASPP image pooling with norm='batch' needs a batch of at least 2 in training "
                f"mode (got input shape {tuple(x.shape)}): it normalises one pooled value per "
                f"image; use a larger batch, norm='group', or call model.eval() for inference"
            )
        pooled = self.block(x.mean(dim=spatial, keepdim=True))  # N×C×1×1
        # upsampling a 1×1 map (bilinear or nearest) is a broadcast of its value
        return pooled.expand(-1, -1, *x.shape[2:])


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLabV3 §3.3, DeepLabV3+ §3.1), for any ``dims``.

    Branches (in this order, concatenated along channels): a 1×1 conv, one 3×3 atrous conv
    per rate, and image pooling; then a 1×1 projection with norm, act and dropout.

    Args:
        dims: 1, 2 or 3.
        in_channels: channels of the deepest encoder features (2048 for ResNet-50/101).
        out_channels: channels of every branch and of the output (paper: 256).
        rates: atrous rates of the 3×3 branches; (6, 12, 18) at output stride 16, doubled
            (12, 24, 36) at output stride 8 (paper §4.1). The caller scales them.
        separable: use SeparableConvNormAct for the atrous branches (DeepLabV3+ §3.2).
        dropout: element-wise dropout after the projection.
        norm, act: as in ConvNormAct.

    Shapes: N×in_channels×S… → N×out_channels×S… (same spatial size).

    Example:
        >>> aspp = ASPP(2, 64, 32, rates=(6, 12, 18))
        >>> aspp(torch.randn(2, 64, 9, 11)).shape
        torch.Size([2, 32, 9, 11])
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        *,
        separable: bool = False,
        dropout: float = 0.1,
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        check_dims(dims)
        check_choice("norm", norm, NORMS)
        if not rates or any(int(r) < 1 for r in rates):
            raise ConfigError(f"ASPP rates={tuple(rates)} must be one or more integers >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"ASPP dropout={dropout} must be in [0, 1)")
        opts = dict(norm=norm, act=act)
        branches: list[nn.Module] = [ConvNormAct(dims, in_channels, out_channels, 1, **opts)]
        for r in rates:
            if separable:
                branches.append(
                    SeparableConvNormAct(dims, in_channels, out_channels, dilation=int(r), **opts)
                )
            else:
                branches.append(
                    ConvNormAct(dims, in_channels, out_channels, 3, dilation=int(r), **opts)
                )
        branches.append(ImagePooling(dims, in_channels, out_channels, **opts))
        self.branches = nn.ModuleList(branches)
        self.project = ConvNormAct(dims, len(branches) * out_channels, out_channels, 1, **opts)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rates = tuple(int(r) for r in rates)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([branch(x) for branch in self.branches], dim=1)  # N×(R+2)·C×S
        return self.dropout(self.project(x))  # N×C×S
