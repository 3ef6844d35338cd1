"""Inference-only layers for the CPU fast path: oneDNN kernels on prepacked weights.

``PackedConv`` / ``PackedLinear`` hold a weight reordered once into the blocked layout
oneDNN's AMX / AVX-512 kernels read (``torch.ops.mkldnn._reorder_*``), and run
``_convolution_pointwise`` / ``_linear_pointwise`` — the kernels ``torch.compile``'s CPU
freezing emits — with an optional fused activation or residual add. ``PairMaxPool`` is the
U-Net's 2x max-pooling without argmax indices. ``fastpath.freeze`` builds them; they have
no backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True if this torch build can prepack weights for oneDNN on the CPU in ``dtype``."""
    ops = getattr(torch.ops, "mkldnn", None)
    needed = ("_reorder_convolution_weight", "_convolution_pointwise", "_reorder_linear_weight")
    if not torch.backends.mkldnn.is_available() or not all(hasattr(ops, n) for n in needed):
        return False
    if dtype == torch.bfloat16:
        return bool(ops._is_mkldnn_bf16_supported())
    # float32: prepacking made the whole diffusion U-Net slower here (372 vs 292 ms a step),
    # although single small-map convs ran faster; float32 inference stays eager
    return False


# post-op name and scalars of oneDNN for each activation module it can fuse
def post_op(act: nn.Module) -> tuple[str, list, str] | None:
    if isinstance(act, nn.Identity):
        return "none", [], ""
    if isinstance(act, nn.ReLU):
        return "relu", [], ""
    if isinstance(act, nn.SiLU):
        return "swish", [], ""
    if isinstance(act, nn.Sigmoid):
        return "sigmoid", [], ""
    if isinstance(act, nn.GELU):
        return "gelu", [], act.approximate
    if isinstance(act, nn.LeakyReLU):
        return "leaky_relu", [act.negative_slope], ""
    return None


class PackedConv(nn.Module):
    """A convolution (any dims) with its weight prepacked for oneDNN and an optional fused
    activation (``attr``: none, relu, swish, gelu, leaky_relu, sigmoid).

    Built by ``freeze`` from an ``nn.ConvNd`` already cast to the compute dtype; not
    trainable. ``weight`` is the packed (opaque) tensor.
    """

    def __init__(self, conv: nn.Module, post_op: tuple[str, list, str] = ("none", [], "")):
        super().__init__()
        self.dims = conv.weight.dim() - 2
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.attr, self.scalars, self.algorithm = post_op
        w = conv.weight.detach()
        if self.dims == 1:  # oneDNN's conv wants 2-D or 3-D: a 1-D conv is a 1xK 2-D one
            w = w.unsqueeze(2)
            self.stride, self.padding = [1, *self.stride], [0, *self.padding]
            self.dilation = [1, *self.dilation]
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            w, self.padding, self.stride, self.dilation, self.groups
        )
        self.bias = None if conv.bias is None else conv.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = self.dims == 1
        if squeeze:
            x = x.unsqueeze(2)
        y = torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            self.attr, self.scalars, self.algorithm,
        )  # fmt: skip
        return y.squeeze(2) if squeeze else y

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``conv(x) + other`` in one kernel (the residual add as a oneDNN post-op; the
        conv's own activation is not applied)."""
        squeeze = self.dims == 1
        if squeeze:
            x, other = x.unsqueeze(2), other.unsqueeze(2)
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.weight, self.bias, self.padding, self.stride, self.dilation,
            self.groups, "add", None, None, [], None,
        )  # fmt: skip
        return y.squeeze(2) if squeeze else y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
            f"padding={self.padding}, post_op={self.attr!r}"
        )


class PackedLinear(nn.Module):
    """A linear layer with its weight prepacked for oneDNN (any leading dimensions), with
    optional post-ops: ``forward(x, attr)`` applies an activation, ``then(x, other, op)``
    adds or multiplies ``other`` in the same kernel.

    Args:
        weight: (out, in) weight, already in the compute dtype.
        bias: (out,) or None.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach().contiguous()

    @classmethod
    def of(cls, *layers: nn.Module) -> PackedLinear:
        """One linear doing the work of ``layers`` on the same input (outputs concatenated);
        1x1 convolutions count as linears on channels-last tokens."""
        weights = [m.weight.detach().flatten(1) for m in layers]
        bias = None
        if any(m.bias is not None for m in layers):
            bias = torch.cat([
                m.bias.detach() if m.bias is not None else w.new_zeros(w.shape[0])
                for m, w in zip(layers, weights, strict=True)
            ])  # fmt: skip
        return cls(torch.cat(weights), bias)

    def forward(self, x: torch.Tensor, attr: str = "none", algorithm: str = "") -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm)

    def then(self, x: torch.Tensor, other: torch.Tensor, op: str) -> torch.Tensor:
        """``linear(x) <op> other`` with op "add" or "mul", in one kernel."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, op)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class PairMaxPool(nn.Module):
    """2x(2x2) max-pooling with stride 2 on channels-last maps as elementwise maxima of
    strided views: the same values as ``max_pool``, without computing argmax indices
    (2.4x faster on a 64x256² bf16 map). Odd sizes or other layouts use ``max_pool``."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *size = x.shape
        fmt = torch.channels_last_3d if self.dims == 3 else torch.channels_last
        if any(n % 2 for n in size) or self.dims == 1 or not x.is_contiguous(memory_format=fmt):
            return getattr(F, f"max_pool{self.dims}d")(x, 2)
        shape = [b]
        for n in size:
            shape += [n // 2, 2]
        y = x.movedim(1, -1).reshape(*shape, c)  # (B, S0/2, 2, S1/2, 2, ..., C): a view
        for k in range(self.dims):  # the pair axis of spatial dim k sits at 2 + k by now
            y = torch.maximum(y.select(2 + k, 0), y.select(2 + k, 1))
        return y.movedim(-1, 1)  # channels-last (B, C, *S/2)


def is_pair_pool(m: nn.Module) -> bool:
    pools = (nn.MaxPool2d, nn.MaxPool3d)
    if type(m) not in pools or m.return_indices or m.ceil_mode:
        return False
    dims = 2 if isinstance(m, nn.MaxPool2d) else 3
    as_tuple = lambda v: tuple(v) if isinstance(v, tuple | list) else (v,) * dims  # noqa: E731
    stride = m.stride if m.stride is not None else m.kernel_size
    return (
        as_tuple(m.kernel_size) == (2,) * dims
        and as_tuple(stride) == (2,) * dims
        and as_tuple(m.padding) == (0,) * dims
        and as_tuple(m.dilation) == (1,) * dims
    )


class FusedConvAct(nn.Module):
    """Conv (BatchNorm folded in) then its activation, when the conv cannot be packed."""

    def __init__(self, conv: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))
