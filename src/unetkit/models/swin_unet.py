"""Swin-Unet (Cao et al. 2021, "Swin-Unet: Unet-like Pure Transformer for Medical Image
Segmentation"), for 1D, 2D and 3D.

Patch partition (4×4) + linear embedding (C = 96, LayerNorm); an encoder of Swin Transformer
blocks (window / shifted-window attention with relative position bias; depths (2, 2, 2, 2),
heads (3, 6, 12, 24), window 7) with patch merging between stages, the deepest stage being the
bottleneck; a symmetric decoder in which each stage expands the patches (×2, halving the
channels), concatenates the skip, maps 2C -> C with a linear layer and runs Swin blocks; a final
4× patch expanding and a linear (1×1) projection to the classes.

As in the official code (networks/swin_transformer_unet_skip_expand_decoder_sys.py), a stage's
skip is its input (after patch embedding / merging, before its Swin blocks), the decoder stage
at a level uses the encoder's depth and heads of that level, and stochastic depth rises
linearly to 0.1. Reference size: 224×224, 3 channels, 9 classes (Synapse) give 27,168,900
parameters, the official count.

Any input size: the image is padded to a multiple of patch_size·2^(stages-1) (so patch merging
always sees even grids) and the logits are cropped back; inside each Swin block the token grid
is padded to a multiple of the window, with the padding masked out of the attention. A grid
axis no longer than the window uses one window of that length without shift (the official
code's rule for small resolutions). At 224×224 this is exactly the official computation.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from unetkit.errors import ConfigError
from unetkit.models.base import SegmentationModel
from unetkit.nn.dims import check_dims, conv_nd
from unetkit.nn.sampling import crop_to, pad_to_multiple
from unetkit.nn.swin import (
    PatchExpanding,
    PatchMerging,
    WindowAttention,
    init_transformer_weights,
)
from unetkit.nn.vit import PatchEmbed, PreNormBlock, to_channels_first
from unetkit.registry import register_model


def swin_stage(
    dims: int,
    dim: int,
    depth: int,
    heads: int,
    window: int,
    *,
    mlp_ratio: float,
    dropout: float,
    drop_path: list[float],
) -> nn.Sequential:
    """``depth`` Swin Transformer blocks (Liu et al. 2021, Fig. 3b), pre-norm, alternating
    regular (W-MSA) and shifted (SW-MSA) windows."""
    return nn.Sequential(
        *(
            PreNormBlock(
                WindowAttention(dims, dim, heads, window, shift=i % 2 == 1),
                dim,
                int(dim * mlp_ratio),
                dropout=dropout,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
    )


class SwinEncoderStage(nn.Module):
    """Patch merging (identity at the first level), then Swin blocks."""

    def __init__(self, down: nn.Module, blocks: nn.Sequential) -> None:
        super().__init__()
        self.down, self.blocks = down, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x))


class SwinDecoderStage(nn.Module):
    """Patch expanding (×2, C -> C/2), concatenate the skip, linear 2C -> C, Swin blocks."""

    def __init__(self, up: PatchExpanding, dim: int, blocks: nn.Sequential) -> None:
        super().__init__()
        self.up = up
        self.fuse = nn.Linear(2 * dim, dim)
        self.blocks = blocks

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # N×(2S)…×C
        return self.blocks(self.fuse(torch.cat([x, skip], dim=-1)))


@dataclasses.dataclass(frozen=True)
class SwinUnetConfig:
    """Config of Swin-Unet (defaults: the paper's Swin-T-based model).

    Args:
        in_channels: image channels.   out_channels: classes (softmax) or 1 (sigmoid).
        dims: 1, 2 or 3.
        patch_size: patch edge of the partition and of the final expanding (4).
        embed_dim: C, the first stage's token width (96); stage i has C·2^i.
        depths: Swin blocks per stage, finest first; the last stage is the bottleneck.
        num_heads: attention heads per stage (3, 6, 12, 24).
        window_size: attention window edge in tokens (7).
        mlp_ratio: MLP width / token width (4).
        dropout: dropout in the MLPs and after attention (0).   drop_path: stochastic depth
            at the deepest block, rising linearly from 0 (0.1).
    """

    in_channels: int = 3
    out_channels: int = 2
    dims: int = 2
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    drop_path: float = 0.1

    def __post_init__(self) -> None:
        check_dims(self.dims)
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ConfigError(
                f"depths={self.depths} and num_heads={self.num_heads} need one entry per "
                f"stage each (e.g. (2, 2, 2, 2) and (3, 6, 12, 24))"
            )
        if any(d < 1 for d in self.depths):
            raise ConfigError(f"depths={self.depths} must all be at least 1")
        for i, h in enumerate(self.num_heads):
            width = self.embed_dim * 2**i
            if h < 1 or width % h:
                raise ConfigError(
                    f"num_heads[{i}]={h} must divide stage {i}'s width embed_dim·2^{i}={width}"
                )
        if self.patch_size < 1 or self.window_size < 1:
            raise ConfigError(
                f"patch_size={self.patch_size} and window_size={self.window_size} must be ≥ 1"
            )
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")


@register_model(
    "swin_unet",
    config=SwinUnetConfig,
    description="Swin-Unet (Cao 2021): pure-transformer U-Net of (shifted-)window attention "
    "blocks, patch merging/expanding, skip concatenation; any input size",
    presets={"swin-t": {}, "synapse": dict(out_channels=9)},
    test_overrides=dict(patch_size=2, embed_dim=8, depths=(2, 1), num_heads=(1, 2), window_size=3),
)
class SwinUnet(SegmentationModel):
    """Swin-Unet: patch embedding -> Swin encoder (skips) -> bottleneck -> Swin decoder
    with patch expanding -> 4× expanding -> 1×1 projection. See module docstring.

    Example:
        >>> net = SwinUnet(SwinUnetConfig(in_channels=1, embed_dim=12, depths=(2, 2),
        ...     num_heads=(1, 2)))
        >>> net(torch.zeros(1, 1, 50, 37)).shape
        torch.Size([1, 2, 50, 37])
    """

    def __init__(self, config: SwinUnetConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.in_channels, self.out_channels, self.dims = c.in_channels, c.out_channels, c.dims
        n = len(c.depths)
        widths = [c.embed_dim * 2**i for i in range(n)]
        total = sum(c.depths)  # stochastic depth rises linearly over the encoder's blocks
        rates = [c.drop_path * i / max(total - 1, 1) for i in range(total)]
        drop = [rates[sum(c.depths[:i]) : sum(c.depths[: i + 1])] for i in range(n)]
        opts = dict(mlp_ratio=c.mlp_ratio, dropout=c.dropout)

        def blocks(i: int) -> nn.Sequential:
            return swin_stage(
                c.dims,
                widths[i],
                c.depths[i],
                c.num_heads[i],
                c.window_size,
                drop_path=drop[i],
                **opts,
            )

        self.patch_embed = PatchEmbed(c.dims, c.in_channels, c.embed_dim, c.patch_size)
        self.encoder = nn.ModuleList(
            SwinEncoderStage(PatchMerging(c.dims, widths[i - 1]) if i else nn.Identity(), blocks(i))
            for i in range(n)
        )
        self.norm = nn.LayerNorm(widths[-1])
        self.decoder = nn.ModuleList(
            SwinDecoderStage(PatchExpanding(c.dims, widths[i + 1]), widths[i], blocks(i))
            for i in reversed(range(n - 1))
        )
        self.norm_up = nn.LayerNorm(c.embed_dim)
        self.final_expand = PatchExpanding(
            c.dims, c.embed_dim, factor=c.patch_size, out_dim=c.embed_dim
        )
        self.head = conv_nd(c.dims)(c.embed_dim, c.out_channels, 1, bias=False)
        self.multiple = c.patch_size * 2 ** (n - 1)
        init_transformer_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x, size = pad_to_multiple(x, self.multiple)  # merging needs even grids; crop below
        x = self.patch_embed(x)  # N×(S/p)…×C, channels last
        skips = []
        for stage in self.encoder:
            x = stage.down(x)  # patch merging: N×(S/2)…×2C (identity at the first level)
            skips.append(x)  # the official skip: the stage input, before its Swin blocks
            x = stage.blocks(x)
        x = self.norm(x)  # bottleneck output, N×(S/p/2^(n-1))…×C·2^(n-1)
        skips.pop()
        for stage in self.decoder:
            x = stage(x, skips.pop())  # expand ×2, concat skip, linear 2C -> C, Swin blocks
        x = self.final_expand(self.norm_up(x))  # N×S…×C: 4× patch expanding
        return crop_to(self.head(to_channels_first(x)), size)
