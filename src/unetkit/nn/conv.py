"""Convolution blocks: ConvNormAct and the U-Net's DoubleConv, for any ``dims``."""

from __future__ import annotations

import torch.nn as nn

from unetkit.config import check_choice
from unetkit.nn.dims import activation, conv_nd, dropout_nd, norm_nd

PADDINGS = ("same", "valid")


class ConvNormAct(nn.Sequential):
    """Convolution, then normalisation, then activation.

    Args:
        dims: 1, 2 or 3.
        in_channels, out_channels: channels in and out.
        kernel_size: odd kernel size (default 3).
        padding: ``"same"`` (output size = input size / stride) or ``"valid"`` (no padding:
            each 3-conv removes 2 pixels per axis, as in Ronneberger et al. 2015).
        stride, dilation: as in ``torch.nn.ConvNd``.
        norm: none | batch | group | instance | layer. The conv has a bias only without norm.
        act: relu | leaky_relu | prelu | gelu | silu | elu | none.

    Example:
        >>> block = ConvNormAct(2, 1, 8, norm="batch")
        >>> block(torch.zeros(1, 1, 9, 9)).shape
        torch.Size([1, 8, 9, 9])
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        padding: str = "same",
        stride: int = 1,
        dilation: int = 1,
        norm: str = "none",
        act: str = "relu",
    ) -> None:
        check_choice("padding", padding, PADDINGS)
        pad = dilation * (kernel_size - 1) // 2 if padding == "same" else 0
        conv = conv_nd(dims)(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=pad,
            dilation=dilation,
            bias=norm == "none",
        )
        super().__init__()
        self.conv = conv
        self.norm = norm_nd(norm, dims, out_channels)
        self.act = activation(act, out_channels)
        self.kernel_size, self.padding_mode, self.dilation = kernel_size, padding, dilation

    def shrink(self) -> int:
        """Pixels lost per axis (0 for same padding)."""
        return 0 if self.padding_mode == "same" else self.dilation * (self.kernel_size - 1)


class DoubleConv(nn.Sequential):
    """Two ConvNormAct layers: the U-Net paper's block (two 3×3 convs, each followed by ReLU).

    Args:
        dims, in_channels, out_channels: as in ConvNormAct.
        mid_channels: channels after the first conv (default ``out_channels``).
        padding, norm, act, kernel_size: passed to both convs.
        dropout: channel dropout after the block (the paper uses 0.5 at the end of the
            contracting path).

    Example:
        >>> DoubleConv(2, 1, 64, padding="valid")(torch.zeros(1, 1, 572, 572)).shape
        torch.Size([1, 64, 568, 568])
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        *,
        mid_channels: int | None = None,
        kernel_size: int = 3,
        padding: str = "same",
        norm: str = "none",
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        mid = mid_channels or out_channels
        opts = dict(kernel_size=kernel_size, padding=padding, norm=norm, act=act)
        super().__init__()
        self.conv1 = ConvNormAct(dims, in_channels, mid, **opts)
        self.conv2 = ConvNormAct(dims, mid, out_channels, **opts)
        self.dropout = dropout_nd(dims, dropout)

    def shrink(self) -> int:
        return self.conv1.shrink() + self.conv2.shrink()
