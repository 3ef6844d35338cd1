"""Timestep-conditioned residual block and the conv down/up-samplers of the diffusion U-Net.

The residual block is the one of DDPM (Ho et al. 2020) / LDM (Rombach et al. 2022):
GroupNorm -> SiLU -> conv, add a projection of the timestep embedding, GroupNorm -> SiLU ->
dropout -> conv, plus a (1x1-projected) shortcut. Attribute names follow diffusers
(``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``) because
module names are part of the file format (STYLE.md §8). All blocks take ``dims``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.nn.dims import check_dims, conv_nd
from unetkit.nn.init import zero_module


class TimestepResBlock(nn.Module):
    """Residual block conditioned on a timestep embedding (added as a per-channel bias).

    Args:
        in_channels: input channels.
        out_channels: output channels (a 1x1 ``conv_shortcut`` is added when they differ).
        emb_channels: width of the (already SiLU-activated) embedding passed to ``forward``.
        dims: 1, 2 or 3.
        groups: GroupNorm groups (must divide both channel counts).
        eps: GroupNorm epsilon.
        dropout: dropout before the second conv.

    ``conv2`` starts at zero, so a fresh block is the identity on its shortcut (STYLE.md §9).

    Example:
        >>> block = TimestepResBlock(32, 64, 128, groups=8)
        >>> block(torch.randn(2, 32, 9, 9), torch.randn(2, 128)).shape
        torch.Size([2, 64, 9, 9])
    """

    takes_emb = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        dims: int = 2,
        groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        conv = conv_nd(check_dims(dims))
        self.dims = dims
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv(out_channels, out_channels, 3, padding=1))
        self.conv_shortcut = (
            conv(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, *spatial); emb: (B, E), already passed through SiLU by the caller."""
        # the norms return fresh tensors, so SiLU may overwrite them when no graph is recorded
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        bias = self.time_emb_proj(emb)
        h = h + bias.view(*bias.shape, *(1,) * self.dims)
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class ConvDownsample(nn.Module):
    """3x3 conv with stride 2 and padding 1 (odd sizes give ceil(n/2)); attribute ``conv``.

    Example:
        >>> ConvDownsample(8)(torch.randn(1, 8, 9, 9)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(self, channels: int, *, dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(check_dims(dims))(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NearestUpsample(nn.Module):
    """Nearest-neighbour up-sampling to a given size, then a 3x3 conv; attribute ``conv``.

    The target size comes from the skip it will be merged with, so odd sizes round-trip.

    Example:
        >>> NearestUpsample(8)(torch.randn(1, 8, 5, 5), (9, 9)).shape
        torch.Size([1, 8, 9, 9])
    """

    def __init__(self, channels: int, *, dims: int = 2) -> None:
        super().__init__()
        self.conv = conv_nd(check_dims(dims))(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
