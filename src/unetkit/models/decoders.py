"""The U-Net expanding path: up-sample, merge the skip, DoubleConv; reused by the families.

Besides the up-sampling modes of :class:`~unetkit.nn.sampling.Upsample`, decoders accept
``up="resize"``: plain (bi/tri)linear interpolation that keeps the channels, so the merge
conv sees ``skip + deep`` channels (the decoder of Oktay et al.'s official Attention U-Net).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.nn.conv import DoubleConv
from unetkit.nn.dims import INTERP_MODES
from unetkit.nn.sampling import UP_MODES, Upsample, merge_skip

DECODER_UP_MODES = (*UP_MODES, "resize")


def up_block(dims: int, in_channels: int, out_channels: int, mode: str) -> tuple[nn.Module, int]:
    """The up-sampler of one decoder stage and the channels it outputs.

    Args:
        dims: 1, 2 or 3.
        in_channels: channels of the coarser feature map.
        out_channels: channels wanted after up-sampling (ignored by ``"resize"``).
        mode: transposed | interp | pixelshuffle (see Upsample) | resize (interpolation
            only; keeps ``in_channels``).

    Example:
        >>> up, ch = up_block(2, 16, 8, "resize")
        >>> up(torch.zeros(1, 16, 4, 4)).shape, ch
        (torch.Size([1, 16, 8, 8]), 16)
    """
    check_choice("up", mode, DECODER_UP_MODES)
    if mode == "resize":
        up = nn.Upsample(scale_factor=2.0, mode=INTERP_MODES[dims], align_corners=False)
        return up, in_channels
    return Upsample(dims, in_channels, out_channels, mode=mode), out_channels


class DecoderStage(nn.Module):
    """Up-sample ``x``, concatenate the (centre-cropped) skip, DoubleConv."""

    def __init__(self, up: nn.Module, block: DoubleConv) -> None:
        super().__init__()
        self.up, self.block = up, block

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(merge_skip(self.up(x), skip))


class UNetDecoder(nn.Module):
    """Consumes the encoder's features (finest first, bottleneck last).

    Args:
        dims: 1, 2 or 3.
        encoder_channels: the encoder's ``out_channels``.
        up: transposed | interp | pixelshuffle | resize (see :func:`up_block`).
        padding, norm, act: passed to every DoubleConv.

    ``stage_channels`` lists each stage's output channels, coarsest stage first.
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
            sampler, up_channels = up_block(dims, deep, skip, up)
            block = DoubleConv(dims, skip + up_channels, skip, padding=padding, norm=norm, act=act)
            stages.append(DecoderStage(sampler, block))
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(chans[-2::-1])
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
