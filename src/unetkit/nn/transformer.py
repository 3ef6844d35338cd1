"""Attention blocks of the latent-diffusion U-Net: multi-head (cross-)attention, GEGLU
feed-forward, the pre-norm transformer block and the spatial transformer around it.

Rombach et al. 2022 (LDM), §3.3: feature maps are normalised, projected, flattened into
tokens, passed through transformer blocks with self-attention (``attn1``), cross-attention
to the text context (``attn2``) and a GEGLU feed-forward (Shazeer 2020), projected back and
added to the input. Attribute names follow diffusers (``to_q``/``to_k``/``to_v``/``to_out``,
``ff.net.0.proj``) so that weights load by name. Attention runs through
``F.scaled_dot_product_attention``. All blocks take ``dims`` (tokens = flattened space).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.nn.dims import check_dims, conv_nd
from unetkit.nn.init import zero_module


class Attention(nn.Module):
    """Multi-head scaled dot-product attention; self-attention when ``context`` is None.

    Args:
        query_dim: width of the query tokens (and of the output).
        context_dim: width of the context tokens (None: same as ``query_dim``).
        heads: number of heads.
        head_dim: width of one head; ``heads * head_dim`` is the inner width.
        dropout: dropout after the output projection.
        upcast: compute attention in float32 when the inputs are half precision.

    Example:
        >>> attn = Attention(64, context_dim=32, heads=4, head_dim=16)
        >>> attn(torch.randn(2, 81, 64), torch.randn(2, 7, 32)).shape
        torch.Size([2, 81, 64])
    """

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, query_dim); context: (B, L, context_dim) or None -> (B, N, query_dim)."""
        context = x if context is None else context
        b, n, _ = x.shape
        # (B, tokens, heads*d) -> (B, heads, tokens, d) as views; SDPA accepts the strides
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """``a * gelu(b)`` with ``[a, b] = proj(x)`` (Shazeer 2020); attribute ``proj``."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``net = [GEGLU, Dropout, Linear]`` with a 4x inner width."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention (if ``context_dim``), GEGLU MLP.

    Args:
        dim: token width.
        heads, head_dim: attention heads and head width.
        context_dim: width of the cross-attention context; None drops ``attn2``/``norm2``.
        dropout: attention/MLP dropout.
        upcast: float32 attention for half-precision inputs.

    Example:
        >>> blk = BasicTransformerBlock(64, heads=4, head_dim=16, context_dim=32)
        >>> blk(torch.randn(1, 10, 64), torch.randn(1, 3, 32)).shape
        torch.Size([1, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        opts = dict(heads=heads, head_dim=head_dim, dropout=dropout, upcast=upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, **opts)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim=context_dim, **opts)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the positions of a feature map, added back as a residual.

    ``norm`` (GroupNorm, eps 1e-6) -> ``proj_in`` -> tokens -> ``transformer_blocks`` ->
    ``proj_out`` -> + input. ``proj_in``/``proj_out`` are 1x1 convs (SD 1.x) or, with
    ``linear_projection``, Linear layers on the tokens (SD 2.x). ``proj_out`` starts at zero.

    Args:
        channels: feature-map channels (= token width).
        heads: attention heads; the head width is ``channels // heads``.
        context_dim: cross-attention context width (None: self-attention only).
        depth: number of transformer blocks.
        dims: 1, 2 or 3.
        groups: GroupNorm groups.
        linear_projection: Linear instead of 1x1-conv projections.
        dropout, upcast: see ``BasicTransformerBlock``.

    Example:
        >>> st = SpatialTransformer(64, heads=4, context_dim=32, groups=8)
        >>> st(torch.randn(2, 64, 5, 7), torch.randn(2, 3, 32)).shape
        torch.Size([2, 64, 5, 7])
    """

    takes_context = True

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        context_dim: int | None = None,
        depth: int = 1,
        dims: int = 2,
        groups: int = 32,
        linear_projection: bool = False,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        check_dims(dims)
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = zero_module(nn.Linear(channels, channels))
        else:
            self.proj_in = conv_nd(dims)(channels, channels, 1)
            self.proj_out = zero_module(conv_nd(dims)(channels, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                channels,
                heads=heads,
                head_dim=channels // heads,
                context_dim=context_dim,
                dropout=dropout,
                upcast=upcast,
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, *spatial); context: (B, L, context_dim) -> (B, C, *spatial)."""
        b, c, *spatial = x.shape
        h = self.norm(x)
        # tokens (B, N, C) made contiguous once: LayerNorm and the Linears would copy each time
        if self.linear_projection:
            h = self.proj_in(h.flatten(2).transpose(1, 2).contiguous())
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2).contiguous()
        for block in self.transformer_blocks:
            h = block(h, context)
        # back to a contiguous (B, C, *spatial): a channels-last view would make every later
        # conv reorder its weights
        if self.linear_projection:
            h = self.proj_out(h).transpose(1, 2).reshape(b, c, *spatial).contiguous()
        else:
            h = self.proj_out(h.transpose(1, 2).reshape(b, c, *spatial).contiguous())
        return h + x
