"""Transformer blocks for TransUNet and Swin-Unet, for any ``dims`` (1, 2 or 3).

* ViT (Dosovitskiy et al. 2021): patch embedding, pre-norm blocks of multi-head self-attention
  and an MLP, learned position embeddings that are resized (linear interpolation) whenever the
  token grid differs from the configured one, so any input size works.
* Swin (Liu et al. 2021, §3.2): window attention with a relative position bias, shifted windows
  (cyclic shift + attention mask), patch merging; Swin-Unet's patch expanding (Cao et al. 2021).
  Token grids that are not a multiple of the window are padded and the padding is masked out.

Inside the transformer parts tokens live on a channels-last grid ``N×S1×…×Sd×C``. Attention is
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.errors import ConfigError, InputSizeError
from unetkit.nn.dims import INTERP_MODES, check_dims, conv_nd
from unetkit.nn.init import is_meta


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


# --- Swin --------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """N×S…×C (each S a multiple of its window) -> N×windows×prod(window)×C."""
    n, *size, c = x.shape
    d = len(size)
    x = x.reshape(n, *[v for s, w in zip(size, window, strict=True) for v in (s // w, w)], c)
    perm = [0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1]
    return x.permute(perm).reshape(n, -1, math.prod(window), c)


def window_reverse(
    windows: torch.Tensor, window: Sequence[int], size: Sequence[int]
) -> torch.Tensor:
    """Inverse of window_partition: N×windows×prod(window)×C -> N×S…×C."""
    n, c, d = windows.shape[0], windows.shape[-1], len(size)
    counts = [s // w for s, w in zip(size, window, strict=True)]
    x = windows.reshape(n, *counts, *window, c)
    perm = [0, *[v for i in range(d) for v in (1 + i, 1 + d + i)], 2 * d + 1]
    return x.permute(perm).reshape(n, *size, c)


@functools.lru_cache(maxsize=64)
def relative_position_index(window: tuple[int, ...], max_window: int) -> torch.Tensor:
    """T×T index into a ((2·max_window-1)^d)-row bias table for the tokens of one window.

    A window smaller than ``max_window`` (a grid smaller than the window) uses a subset of the
    table, so one table serves every grid size. Cached; built as a normal (not inference)
    tensor so that a model used under ``torch.inference_mode`` can still be trained later.
    """
    with torch.inference_mode(False):
        return _relative_position_index(window, max_window)


def _relative_position_index(window: tuple[int, ...], max_window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij"))
    coords = coords.flatten(1)  # d×T
    rel = coords[:, :, None] - coords[:, None, :] + (max_window - 1)  # d×T×T in [0, 2W-2]
    index = torch.zeros_like(rel[0])
    for r in rel:
        index = index * (2 * max_window - 1) + r
    return index


@functools.lru_cache(maxsize=64)
def window_attention_mask(
    size: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]
) -> torch.Tensor | None:
    """windows×T×T additive mask (0 or -inf) for (shifted) windows over a grid of ``size``.

    Tokens attend to each other only if they fall in the same window of the (shifted)
    partition whose window borders lie at ``shift + k·window`` (Liu et al. 2021, Fig. 2): the
    cyclic shift puts tokens from opposite borders into one window and the mask separates them.
    Padding tokens (the grid is padded to a multiple of the window) are never attended to by
    real tokens. None when nothing needs masking. Cached, like relative_position_index.
    """
    with torch.inference_mode(False):
        return _window_attention_mask(size, window, shift)


def _window_attention_mask(
    size: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]
) -> torch.Tensor | None:
    padded = tuple(-(-s // w) * w for s, w in zip(size, window, strict=True))
    if not any(shift) and padded == size:
        return None
    label = torch.zeros(padded, dtype=torch.long)
    valid = torch.ones(padded, dtype=torch.bool)
    for axis, (s, w, sh, p) in enumerate(zip(size, window, shift, padded, strict=True)):
        view = [1] * len(size)
        view[axis] = p
        j = torch.arange(p)
        interval = torch.div(j - sh, w, rounding_mode="floor") + 1  # 0 … p/w
        label = label * (p // w + 1) + interval.view(view)
        valid = valid & (j < s).view(view)
    label[~valid] = -1
    label = torch.roll(label, [-s for s in shift], dims=tuple(range(len(size))))
    win = window_partition(label[None, ..., None], window)[0, :, :, 0]  # windows×T
    same = win[:, :, None] == win[:, None, :]
    return torch.zeros(same.shape).masked_fill_(~same, float("-inf"))


class WindowAttention(SelfAttention):
    """(Shifted-)window multi-head self-attention with relative position bias (Swin's W-MSA /
    SW-MSA), on a token grid N×S…×dim of any size.

    Args:
        dims: 1, 2 or 3.   dim, num_heads: token width and heads.
        window_size: window edge (7 in Swin-T).   shift: shift windows by ``window_size // 2``.
        qkv_bias, attention_dropout: as in SelfAttention.

    An axis no longer than the window gets one window of its length, unshifted (the official
    rule for small resolutions); other axes are padded to a multiple of the window, the
    padding masked out of the attention and cropped.

    Example:
        >>> attn = WindowAttention(2, 32, 4, 7, shift=True)
        >>> attn(torch.zeros(1, 19, 23, 32)).shape
        torch.Size([1, 19, 23, 32])
    """

    def __init__(
        self,
        dims: int,
        dim: int,
        num_heads: int,
        window_size: int,
        *,
        shift: bool = False,
        qkv_bias: bool = True,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attention_dropout=attention_dropout)
        if window_size < 1:
            raise ConfigError(f"window_size={window_size} must be at least 1")
        self.dims, self.window_size, self.shift = check_dims(dims), window_size, shift
        rows = (2 * window_size - 1) ** dims
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))

    def windows_for(self, size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(window, shift) per axis for a token grid of ``size``."""
        w = self.window_size
        window = tuple(min(w, s) for s in size)
        shift = tuple(w // 2 if self.shift and s > w else 0 for s in size)
        return window, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        size = tuple(x.shape[1:-1])
        window, shift = self.windows_for(size)
        padded = tuple(-(-s // w) * w for s, w in zip(size, window, strict=True))
        axes = tuple(range(1, len(size) + 1))
        if padded != size:  # F.pad lists the last axis first; channels (last) are not padded
            pads = [0, 0]
            for s, p in zip(reversed(size), reversed(padded), strict=True):
                pads += [0, p - s]
            x = F.pad(x, pads)
        x = torch.roll(x, [-s for s in shift], dims=axes) if any(shift) else x
        windows = window_partition(x, window)  # N×windows×T×C
        index = relative_position_index(window, self.window_size).to(x.device)
        bias = self.relative_position_bias_table[index].permute(2, 0, 1)  # heads×T×T
        mask = window_attention_mask(size, window, shift)
        if mask is not None:
            bias = bias + mask.to(bias.device)[:, None]  # windows×heads×T×T
        x = window_reverse(super().forward(windows, bias), window, padded)
        x = torch.roll(x, list(shift), dims=axes) if any(shift) else x
        return x[(slice(None), *(slice(0, s) for s in size))]


def space_to_depth(x: torch.Tensor, factor: int, *, reverse: bool = False) -> torch.Tensor:
    """N×S…×C -> N×(S/f)…×(f^d·C): each f^d neighbourhood stacked along channels.

    Channel order is (o1, …, od, c) with the first axis' offset slowest; ``reverse=True``
    makes the first axis' offset fastest (Swin's patch-merging order x0, x1, x2, x3).
    """
    n, *size, c = x.shape
    d = len(size)
    x = x.reshape(n, *[v for s in size for v in (s // factor, factor)], c)
    offsets = list(range(2, 2 * d + 1, 2))
    perm = [0, *range(1, 2 * d, 2), *(offsets[::-1] if reverse else offsets), 2 * d + 1]
    return x.permute(perm).reshape(n, *(s // factor for s in size), factor**d * c)


def depth_to_space(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of ``space_to_depth(x, factor)``: N×S…×(f^d·C) -> N×(S·f)…×C."""
    n, *size, cf = x.shape
    d = len(size)
    x = x.reshape(n, *size, *([factor] * d), cf // factor**d)
    perm = [0, *[v for i in range(d) for v in (1 + i, 1 + d + i)], 2 * d + 1]
    return x.permute(perm).reshape(n, *(s * factor for s in size), cf // factor**d)


class PatchMerging(nn.Module):
    """Swin down-sampling: concatenate each 2^d neighbourhood (2^d·C), LayerNorm, linear -> 2C.

    Shapes: N×S…×C (even S) -> N×(S/2)…×2C.

    Example:
        >>> PatchMerging(2, 96)(torch.zeros(1, 56, 56, 96)).shape
        torch.Size([1, 28, 28, 192])
    """

    def __init__(self, dims: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2**dims * dim)
        self.reduction = nn.Linear(2**dims * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[1:-1])
        if any(s % 2 for s in size):
            raise InputSizeError(
                f"PatchMerging: token grid {size} must be even on every axis; pad to "
                f"{tuple(s + s % 2 for s in size)}"
            )
        return self.reduction(self.norm(space_to_depth(x, 2, reverse=True)))


class PatchExpanding(nn.Module):
    """Swin-Unet up-sampling (Cao et al. 2021, §3.4): linear C -> f^d·out, rearrange to f×
    more tokens per axis with ``out`` channels, LayerNorm.

    ``factor=2`` with ``out_dim=dim//2`` is the decoder's patch expanding (2D: C -> 2C ->
    2×2 tokens of C/2); ``factor=4, out_dim=dim`` is the final 4× expanding.

    Example:
        >>> PatchExpanding(2, 768)(torch.zeros(1, 7, 7, 768)).shape
        torch.Size([1, 14, 14, 384])
    """

    def __init__(self, dims: int, dim: int, *, factor: int = 2, out_dim: int | None = None) -> None:
        super().__init__()
        out = out_dim or dim // 2
        self.factor = factor
        self.expand = nn.Linear(dim, factor**dims * out, bias=False)
        self.norm = nn.LayerNorm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(depth_to_space(self.expand(x), self.factor))


def init_transformer_weights(module: nn.Module) -> None:
    """ViT/Swin initialisation: truncated normal (std 0.02) for linear weights, position
    embeddings and relative-position tables; zero biases; LayerNorm weight 1, bias 0."""
    if is_meta(module):
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PositionEmbedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
