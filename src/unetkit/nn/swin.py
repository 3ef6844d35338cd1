"""Swin blocks (Liu et al. 2021, §3.2) for any ``dims`` (1, 2 or 3): window attention with a
relative position bias, shifted windows (cyclic shift + attention mask), patch merging;
Swin-Unet's patch expanding (Cao et al. 2021). Token grids that are not a multiple of the
window are padded and the padding is masked out. Built on the ViT pieces of ``nn.vit``;
``init_transformer_weights`` initialises both.

Tokens live on a channels-last grid ``N×S1×…×Sd×C``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.errors import ConfigError, InputSizeError
from unetkit.nn.dims import check_dims
from unetkit.nn.init import is_meta
from unetkit.nn.vit import PositionEmbedding, SelfAttention


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
