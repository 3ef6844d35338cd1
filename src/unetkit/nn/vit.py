"""Transformer blocks for TransUNet and Swin-Unet, for any ``dims`` (1, 2 or 3): the shared
pieces and ViT (the Swin parts are in ``nn.swin``).

* ViT (Dosovitskiy et al. 2021): patch embedding, pre-norm blocks of multi-head self-attention
  and an MLP, learned position embeddings that are resized (linear interpolation) whenever the
  token grid differs from the configured one, so any input size works.

Inside the transformer parts tokens live on a channels-last grid ``N×S1×…×Sd×C``. Attention is
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.errors import ConfigError, InputSizeError
from unetkit.nn.dims import INTERP_MODES, check_dims, conv_nd


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """N×C×S… -> N×S…×C."""
    return x.movedim(1, -1)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """N×S…×C -> N×C×S…."""
    return x.movedim(-1, 1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a conv with kernel = stride = ``patch_size``.

    Args:
        dims: 1, 2 or 3.   in_channels, embed_dim: channels in and out.
        patch_size: patch edge length.   norm: LayerNorm on the tokens (Swin's ``patch_norm``).

    Shapes: N×in×S… (each S a multiple of patch_size) -> N×(S/p)…×embed_dim (channels last).

    Example:
        >>> PatchEmbed(2, 3, 96, 4)(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 56, 56, 96])
    """

    def __init__(
        self, dims: int, in_channels: int, embed_dim: int, patch_size: int, *, norm: bool = True
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = conv_nd(check_dims(dims))(in_channels, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if any(s % p for s in x.shape[2:]):
            near = tuple(-(-s // p) * p for s in x.shape[2:])
            raise InputSizeError(
                f"PatchEmbed: spatial size {tuple(x.shape[2:])} is not a multiple of "
                f"patch_size={p}; pad to {near} (the models do this for you)"
            )
        return self.norm(to_channels_last(self.proj(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the second-to-last axis, via SDPA.

    Args:
        dim: token channels.   num_heads: heads (must divide ``dim``).
        qkv_bias: bias of the fused q/k/v projection.
        attention_dropout: dropout on the attention weights (training) and on the output.

    ``forward(x, attn_mask)``: x is ``…×L×dim``; ``attn_mask`` an additive float mask
    broadcastable to ``…×heads×L×L``.
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, attention_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ConfigError(f"num_heads={num_heads} must divide the token width {dim}")
        self.num_heads, self.attention_dropout = num_heads, attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(attention_dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # …×L×3C -> 3×…×heads×L×head_dim
        q, k, v = (
            self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).movedim(-3, 0).transpose(-3, -2)
        )
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants the query's dtype (autocast)
        p = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.drop(self.proj(out.transpose(-3, -2).flatten(-2)))


class MLP(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout (the transformer's feed-forward part)."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a whole residual branch per sample."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class PreNormBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``.

    ``attn`` is a SelfAttention (ViT, tokens N×L×C) or a WindowAttention (Swin, tokens on a
    grid N×S…×C); both act on the last axis, so one block serves both.

    Example:
        >>> blk = PreNormBlock(SelfAttention(64, 4), 64, 256)
        >>> blk(torch.zeros(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        attn: nn.Module,
        dim: int,
        mlp_dim: int,
        *,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, dropout=dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --- ViT ---------------------------------------------------------------------------------------
def resize_position_embedding(
    pos: torch.Tensor, grid: Sequence[int], new_grid: Sequence[int]
) -> torch.Tensor:
    """Resize a 1×L×C position embedding laid out on ``grid`` to ``new_grid`` ((bi/tri)linear,
    half-pixel centres); returned unchanged when the grids agree."""
    grid, new_grid = tuple(grid), tuple(int(g) for g in new_grid)
    if grid == new_grid:
        return pos
    c = pos.shape[-1]
    img = to_channels_first(pos.reshape(1, *grid, c))
    img = F.interpolate(img, size=new_grid, mode=INTERP_MODES[len(grid)], align_corners=False)
    return to_channels_last(img).reshape(1, -1, c)


class PositionEmbedding(nn.Module):
    """Learned absolute position embedding for a token grid (``weight``: 1×prod(grid)×dim).

    Added to N×G…×dim tokens; a grid other than the configured one gets an interpolated copy.
    """

    def __init__(self, grid: Sequence[int], dim: int) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.weight = nn.Parameter(torch.zeros(1, math.prod(self.grid), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = resize_position_embedding(self.weight, self.grid, x.shape[1:-1])
        return x + pos.reshape(1, *x.shape[1:])


class ViTEncoder(nn.Module):
    """ViT encoder on a feature map: patch embedding, position embedding, L blocks, LayerNorm.

    Args:
        dims: 1, 2 or 3.   in_channels: channels of the input feature map.
        hidden_size: token width (768 for ViT-B).   grid: configured token grid per axis (the
            position embedding's layout; other grids are interpolated).
        patch_size: patch edge on the input map (1 for TransUNet's R50 hybrid).
        num_layers, num_heads, mlp_dim: depth, heads and MLP width (ViT-B: 12, 12, 3072).
        dropout: embedding/MLP dropout.   attention_dropout: attention dropout.

    Shapes: N×in×S… -> N×hidden×(S/patch)….

    Example:
        >>> vit = ViTEncoder(2, 8, 32, grid=4, num_layers=2, num_heads=4, mlp_dim=64)
        >>> vit(torch.zeros(1, 8, 5, 7)).shape
        torch.Size([1, 32, 5, 7])
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        hidden_size: int,
        *,
        grid: int,
        patch_size: int = 1,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = PatchEmbed(dims, in_channels, hidden_size, patch_size, norm=False)
        self.pos = PositionEmbedding((grid,) * dims, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PreNormBlock(
                SelfAttention(hidden_size, num_heads, attention_dropout=attention_dropout),
                hidden_size,
                mlp_dim,
                dropout=dropout,
                eps=1e-6,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.pos(self.embed(x)))  # N×G…×hidden
        grid_shape = x.shape
        x = x.flatten(1, -2)  # N×L×hidden: global attention over all tokens
        for block in self.blocks:
            x = block(x)
        return to_channels_first(self.norm(x).reshape(grid_shape))
