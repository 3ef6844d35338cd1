"""The U-Net expanding path: up-sample, merge the skip, DoubleConv; reused by the families."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from unetkit.nn.conv import DoubleConv
from unetkit.nn.sampling import Upsample, merge_skip


class DecoderStage(nn.Module):
    """Up-sample ``x`` (halving channels), concatenate the (centre-cropped) skip, DoubleConv."""

    def __init__(self, up: Upsample, block: DoubleConv) -> None:
        super().__init__()
        self.up, self.block = up, block

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(merge_skip(self.up(x), skip))


class UNetDecoder(nn.Module):
    """Consumes the encoder's features (finest first, bottleneck last).

    Args:
        dims: 1, 2 or 3.
        encoder_channels: the encoder's ``out_channels``.
        up: transposed | interp | pixelshuffle.
        padding, norm, act: passed to every DoubleConv.
    """

    def __init__(
        self,
        dims: int,
        encoder_channels: Sequence[int],
        *,
        up: str = "transposed",
        padding: str = "same",
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        stages = []
        chans = list(encoder_channels)
        for deep, skip in zip(chans[:0:-1], chans[-2::-1], strict=True):
            stages.append(
                DecoderStage(
                    Upsample(dims, deep, skip, mode=up),
                    DoubleConv(dims, 2 * skip, skip, padding=padding, norm=norm, act=act),
                )
            )
        self.stages = nn.ModuleList(stages)
        self.out_channels = chans[0]
        self.shrink = tuple(s.block.shrink() for s in stages)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        skips = list(features)
        x = skips.pop()
        for stage in self.stages:
            x = stage(x, skips.pop())
        return x

    def output_length(self, n: int) -> int | None:
        for shrink in self.shrink:
            n = 2 * n - shrink
            if n <= 0:
                return None
        return n
