"""ResNet encoders (He et al., CVPR 2016) with an output stride set by dilation, any ``dims``.

The layout is torchvision's: a 7×7 stride-2 stem conv + norm + ReLU, a 3×3 stride-2 max-pool,
then ``layer1``..``layer4`` of BasicBlocks (ResNet-18/34) or Bottlenecks (ResNet-50/101/152,
stride on the 3×3 conv). Module names follow torchvision too (``conv1``, ``bn1``,
``layer3.0.downsample.0``…), so a torchvision ResNet state dict without ``fc.*``, stored as
safetensors, loads into the 2D encoder with ``load_state_dict`` unchanged.

``output_stride`` 8/16/32 replaces the strides of ``layer3``/``layer4`` by dilation
(Chen et al. 2017, "Rethinking Atrous Convolution", §3.1; Yu & Koltun 2016): the deepest
features stay at 1/``output_stride`` of the input while every 3×3 conv sees the same input
pixels as in the strided network (checked exactly in the tests). Optional multi-grid
(DeepLabV3 §3.2) multiplies the rates of ``layer4``'s block j by ``multi_grid[j]``. In this
layout (stride at the start of a layer, not at the end of a block as in DeepLab's TensorFlow
ResNet) the first 3×3 conv of a dilated layer replaces the strided conv and so keeps the
previous rate: at output stride 16, multi-grid (1, 2, 4) gives layer4 3×3 rates 1, 4, 8
where the paper lists 2, 4, 8.

No pretrained weights are downloaded; load them from a file if you have them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError
from unetkit.nn.dims import activation, check_dims, conv_nd, norm_nd, pool_nd

OUTPUT_STRIDES = (8, 16, 32)


def _conv(dims: int, cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1) -> nn.Module:
    # torchvision's convs: no bias (a norm follows), "same" padding scaled by the dilation
    return conv_nd(dims)(
        cin, cout, k, stride=stride, padding=dilation * (k - 1) // 2, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (ResNet-18/34). ``expansion`` = 1.

    ``first_dilation`` is the rate of the (possibly strided) first conv, ``dilation`` that of
    the conv after it; they differ in the first block of a layer whose stride became dilation.
    """

    expansion = 1

    def __init__(
        self,
        dims: int,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        first_dilation: int = 1,
        dilation: int = 1,
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv(dims, in_channels, planes, 3, stride, first_dilation)
        self.bn1 = norm_nd(norm, dims, planes)
        self.conv2 = _conv(dims, planes, out, 3, 1, dilation)
        self.bn2 = norm_nd(norm, dims, out)
        self.relu = activation(act, out)
        self.downsample = _shortcut(dims, in_channels, out, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.downsample(x))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (stride, ``first_dilation``) → 1×1 expand ×4, with a residual.

    The ResNet-50/101/152 block; its only 3×3 conv is the (possibly strided) one, so
    ``dilation`` (the rate after the stride) is accepted for a common signature only.
    """

    expansion = 4

    def __init__(
        self,
        dims: int,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        first_dilation: int = 1,
        dilation: int = 1,
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv(dims, in_channels, planes, 1)
        self.bn1 = norm_nd(norm, dims, planes)
        self.conv2 = _conv(dims, planes, planes, 3, stride, first_dilation)
        self.bn2 = norm_nd(norm, dims, planes)
        self.conv3 = _conv(dims, planes, out, 1)
        self.bn3 = norm_nd(norm, dims, out)
        self.relu = activation(act, out)
        self.downsample = _shortcut(dims, in_channels, out, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.downsample(x))


def _shortcut(dims: int, cin: int, cout: int, stride: int, norm: str) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(_conv(dims, cin, cout, 1, stride), norm_nd(norm, dims, cout))


# name -> (block, blocks per layer), as in He et al. 2016, Table 1
RESNETS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class ResNetEncoder(nn.Module):
    """A ResNet without its classifier, returning skip features finest-first (skip contract).

    ``forward(x)`` returns ``[stem, layer1, layer2, layer3, layer4]``: the stem output
    (stride 2, before the max-pool), then each layer's output, the deepest last;
    ``out_channels`` and ``strides`` describe them. With ``output_stride=16`` the strides
    are (2, 4, 8, 16, 16); with 8 they are (2, 4, 8, 8, 8).

    Args:
        dims: 1, 2 or 3.
        in_channels: image channels.
        arch: resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
        widths: planes of layer1..layer4 (torchvision: 64, 128, 256, 512); the stem has
            ``widths[0]`` channels. Bottleneck layers output 4× their planes.
        output_stride: 8, 16 or 32 (no dilation).
        multi_grid: per-block rate multipliers for layer4 (DeepLabV3 uses (1, 2, 4));
            empty = all ones. Its length must equal layer4's number of blocks.
        norm, act: norm and activation by short name (torchvision: batch, relu).

    Example:
        >>> enc = ResNetEncoder(2, 3, arch="resnet18", widths=(8, 8, 16, 16), output_stride=8)
        >>> [tuple(f.shape[2:]) for f in enc(torch.zeros(1, 3, 64, 64))]
        [(32, 32), (16, 16), (8, 8), (8, 8), (8, 8)]
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        *,
        arch: str = "resnet50",
        widths: Sequence[int] = (64, 128, 256, 512),
        output_stride: int = 32,
        multi_grid: Sequence[int] = (),
        norm: str = "batch",
        act: str = "relu",
    ) -> None:
        super().__init__()
        check_dims(dims)
        check_choice("backbone", arch, RESNETS)
        if output_stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"output_stride={output_stride!r} is not supported; use one of {OUTPUT_STRIDES}"
            )
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise ConfigError(f"widths={tuple(widths)} needs four positive widths (layer1..4)")
        block, counts = RESNETS[arch]
        grid = tuple(multi_grid) or (1,) * counts[3]
        if len(grid) != counts[3] or any(int(g) < 1 for g in grid):
            raise ConfigError(
                f"multi_grid={tuple(multi_grid)} must hold {counts[3]} positive rates, one per "
                f"block of {arch}'s layer4 (e.g. {(1, 2, 4)[: counts[3]]}), or be empty"
            )
        stem = int(widths[0])
        self.conv1 = _conv(dims, in_channels, stem, 7, stride=2)
        self.bn1 = norm_nd(norm, dims, stem)
        self.relu = activation(act, stem)
        self.maxpool = pool_nd(dims, "max")(3, stride=2, padding=1)

        channels, strides = [stem], [2]
        prev, stride_now, dilation = stem, 4, 1
        for i, (planes, n) in enumerate(zip(widths, counts, strict=True)):
            stride = 1 if i == 0 else 2
            prev_dilation = dilation
            if stride_now * stride > output_stride:  # keep the resolution: dilate instead
                dilation, stride = dilation * stride, 1
            stride_now *= stride
            rates = grid if i == 3 else (1,) * n
            blocks = []
            for j in range(n):
                # the first block's first 3×3 conv replaces a strided conv: it samples its
                # input at the previous spacing; every later conv runs on the denser grid
                g = int(rates[j])
                opts = dict(
                    stride=stride if j == 0 else 1,
                    first_dilation=(prev_dilation if j == 0 else dilation) * g,
                    dilation=dilation * g,
                )
                blocks.append(block(dims, prev, int(planes), norm=norm, act=act, **opts))
                prev = int(planes) * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            channels.append(prev)
            strides.append(stride_now)
        self.out_channels = tuple(channels)
        self.strides = tuple(strides)
        self.output_stride = output_stride

    @property
    def layers(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))  # N×w0×S/2
        features = [x]
        x = self.maxpool(x)  # N×w0×S/4
        for layer in self.layers:
            x = layer(x)  # strides 4, 8, 16, 32 (capped at output_stride)
            features.append(x)
        return features
