"""Encoders return their skip features; decoders consume them (the skip contract).

``ConvEncoder.forward`` returns one feature map per stage, finest first, the last being the
bottleneck. ``out_channels`` and ``strides`` say what each entry is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from unetkit.nn.conv import DoubleConv
from unetkit.nn.sampling import Downsample


class EncoderStage(nn.Module):
    """Optional down-sampling, then a DoubleConv."""

    def __init__(self, down: nn.Module, block: DoubleConv) -> None:
        super().__init__()
        self.down, self.block = down, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.down(x))


class ConvEncoder(nn.Module):
    """The U-Net contracting path: DoubleConv stages separated by 2× down-sampling.

    Args:
        dims: 1, 2 or 3.
        in_channels: image channels.
        channels: width per stage, finest first; ``len(channels) - 1`` down-samplings.
        padding, norm, act: passed to every DoubleConv.
        down: maxpool | avgpool | conv.
        dropout: channel dropout after the deepest stage (the paper's "drop-out layers at the
            end of the contracting path").
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        channels: Sequence[int],
        *,
        padding: str = "same",
        norm: str = "batch",
        act: str = "relu",
        down: str = "maxpool",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stages = []
        prev = in_channels
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            block = DoubleConv(
                dims,
                prev,
                ch,
                padding=padding,
                norm=norm,
                act=act,
                dropout=dropout if last else 0.0,
            )
            sampler = nn.Identity() if i == 0 else Downsample(dims, prev, mode=down)
            stages.append(EncoderStage(sampler, block))
            prev = ch
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(channels)
        self.strides = tuple(2**i for i in range(len(channels)))
        self.shrink = tuple(s.block.shrink() for s in stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def output_length(self, n: int) -> int | None:
        """Length of the bottleneck axis for input length ``n``; None if a pool gets odd input."""
        for i, shrink in enumerate(self.shrink):
            if i > 0:
                if n % 2:
                    return None
                n //= 2
            n -= shrink
            if n <= 0:
                return None
        return n
