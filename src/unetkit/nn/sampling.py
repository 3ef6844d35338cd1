"""Down-sampling, up-sampling, skip merging and pad/crop helpers for any ``dims``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.config import check_choice
from unetkit.nn.dims import INTERP_MODES, conv_nd, conv_transpose_nd, pool_nd

DOWN_MODES = ("maxpool", "avgpool", "conv")
UP_MODES = ("transposed", "interp", "pixelshuffle")


class Downsample(nn.Module):
    """Halve every spatial axis: 2×2 max-pool (paper), average pool, or strided 2×2 conv.

    Args:
        dims: 1, 2 or 3.
        channels: input channels (kept unless ``out_channels`` is given; only ``conv`` may
            change them).
        mode: maxpool | avgpool | conv.

    Example:
        >>> Downsample(2, 8)(torch.zeros(1, 8, 10, 10)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(
        self, dims: int, channels: int, *, mode: str = "maxpool", out_channels: int | None = None
    ) -> None:
        super().__init__()
        check_choice("down", mode, DOWN_MODES)
        out = out_channels or channels
        if mode == "conv":
            self.op = conv_nd(dims)(channels, out, 2, stride=2)
        else:
            if out != channels:
                raise ValueError(f"down={mode!r} cannot change channels ({channels}->{out})")
            self.op = pool_nd(dims, "max" if mode == "maxpool" else "avg")(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double every spatial axis and map ``in_channels`` to ``out_channels``.

    Modes:
        transposed: the paper's 2×2 "up-convolution" (transposed conv, stride 2).
        interp: (bi/tri)linear interpolation followed by a 1×1 conv.
        pixelshuffle: 1×1 conv to out·2^dims channels, then a sub-pixel shuffle
            (Shi et al. 2016); works for 1D, 2D and 3D.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, *, mode: str) -> None:
        super().__init__()
        check_choice("up", mode, UP_MODES)
        self.dims, self.mode = dims, mode
        if mode == "transposed":
            self.op = conv_transpose_nd(dims)(in_channels, out_channels, 2, stride=2)
        elif mode == "interp":
            self.op = conv_nd(dims)(in_channels, out_channels, 1)
        else:
            self.op = conv_nd(dims)(in_channels, out_channels * 2**dims, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transposed":
            return self.op(x)
        if self.mode == "interp":
            x = F.interpolate(
                x, scale_factor=2.0, mode=INTERP_MODES[self.dims], align_corners=False
            )
            return self.op(x)
        return pixel_shuffle_nd(self.op(x), 2)


def pixel_shuffle_nd(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Dimension-generic pixel shuffle: N×(C·f^d)×S... -> N×C×(S·f)..."""
    n, c, *spatial = x.shape
    d = len(spatial)
    out_c = c // factor**d
    x = x.reshape(n, out_c, *([factor] * d), *spatial)
    # interleave: (n, c, f1..fd, s1..sd) -> (n, c, s1, f1, s2, f2, ...)
    perm = [0, 1] + [i for k in range(d) for i in (2 + d + k, 2 + k)]
    x = x.permute(*perm)
    return x.reshape(n, out_c, *[s * factor for s in spatial])


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the trailing spatial axes of ``x`` to ``size`` around the centre (paper's skip crop)."""
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], size, strict=True):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


def merge_skip(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Concatenate ``skip`` to ``x`` along channels, centre-cropping ``skip`` if it is larger."""
    if skip.shape[2:] != x.shape[2:]:
        skip = center_crop(skip, x.shape[2:])
    return torch.cat([skip, x], dim=1)


def pad_to_multiple(
    x: torch.Tensor, multiple: int, *, mode: str = "reflect"
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad spatial axes at the end up to a multiple of ``multiple``; return (padded, original size).

    Reflect padding (falling back to replicate where the axis is too short to reflect) keeps
    image statistics at the border instead of adding an artificial black frame.
    """
    size = tuple(x.shape[2:])
    extra = [(-s) % multiple for s in size]
    if not any(extra):
        return x, size
    pads: list[int] = []
    for e in reversed(extra):
        pads += [0, e]
    too_short = any(e >= s for e, s in zip(extra, size, strict=True))
    return F.pad(x, pads, mode="replicate" if mode == "reflect" and too_short else mode), size


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the trailing spatial axes to ``size`` from the start (inverse of pad_to_multiple)."""
    return x[(slice(None), slice(None), *(slice(0, s) for s in size))]
