"""V-Net (Milletari, Navab & Ahmadi, "V-Net: Fully Convolutional Neural Networks for
Volumetric Medical Image Segmentation", 3DV 2016), Fig. 1.

The paper's network, in its default config:

* every convolution is 5×5×5 (``kernel_size``) with same padding, followed by a PReLU;
* an input stage maps the volume to 16 channels with one convolution and adds the input
  itself, broadcast across the 16 channels;
* each further stage is *residual*: its input goes through 1-3 convolutions and is added to
  the output of the last one (the activation comes after the addition, as in the official
  Caffe prototxt); stages hold 1, 2, 3, 3, 3 convolutions at 16, 32, 64, 128, 256 channels;
* down-sampling is a 2×2×2 convolution with stride 2 that doubles the channels (no pooling);
* the right half up-samples with 2×2×2 transposed convolutions, concatenates the left
  half's features at the same level (fine-grained detail) and runs residual stages with
  3, 3, 2, 1 convolutions at 256, 128, 64, 32 channels;
* a 1×1×1 convolution gives ``out_channels`` maps (softmax; the paper trains it with the soft
  Dice loss, ``unetkit.segmentation.losses.soft_dice_loss(..., squared=True)``).

No normalisation in the paper (``norm="none"``); ``norm="batch"`` or ``"instance"`` gives the
modern form. Any input size works: the input is padded to a multiple of ``2**depth`` and the
output cropped back. ``dims=2`` gives the same network with 5×5 kernels.

Presets: ``paper`` (the defaults, 65.2 M parameters for 1 input channel and 2 classes),
``prototxt`` (the conv counts of the official Caffe file ``train_noPooling_ResNet_cinque``:
1, 1, 2, 3, 3), ``vnet_pytorch`` (the widely used PyTorch port mattmacy/vnet.pytorch: batch
norm, 1, 1, 2, 3, 2 / 2, 2, 1, 1 convs, about 45.6 M parameters) and ``modern`` (instance norm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError
from unetkit.models.base import SegmentationModel
from unetkit.models.decoders import DecoderStage
from unetkit.models.encoders import EncoderStage
from unetkit.nn.conv import ConvNormAct
from unetkit.nn.dims import activation, check_dims, conv_nd, norm_nd
from unetkit.nn.init import he_init
from unetkit.nn.sampling import Upsample, crop_to, pad_to_multiple
from unetkit.registry import register_model


@dataclasses.dataclass(frozen=True)
class VNetConfig:
    """Config of the V-Net.

    Args:
        in_channels: image channels (modalities).
        out_channels: classes (softmax) or 1 (sigmoid).
        dims: 3 (the paper) or 2.
        channels: width per level, finest first (paper: 16, 32, 64, 128, 256); each
            down-sampling goes from one width to the next.
        num_convs: convolutions per left-hand stage, finest first (paper: 1, 2, 3, 3, 3; the
            last entry is the bottom stage).
        decoder_convs: convolutions per right-hand stage, finest first; None mirrors
            ``num_convs[:-1]`` (paper: 1, 2, 3, 3, i.e. 3, 3, 2, 1 from the bottom up).
        kernel_size: odd kernel of the stage convolutions (paper: 5).
        norm: none (paper) | batch | group | instance | layer, after every convolution.
        act: prelu (paper) | relu | elu | ... : after each convolution but the last of a
            stage, after every residual addition and after each down/up convolution.
        init: "he" (He-normal, the "msra" filler of the official prototxt) or "default".
    """

    in_channels: int = 1
    out_channels: int = 2
    dims: int = 3
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_convs: tuple[int, ...] = (1, 2, 3, 3, 3)
    decoder_convs: tuple[int, ...] | None = None
    kernel_size: int = 5
    norm: str = "none"
    act: str = "prelu"
    init: str = "he"

    def __post_init__(self) -> None:
        check_dims(self.dims)
        check_choice("init", self.init, ("he", "default"))
        n = len(self.channels)
        if n < 2 or any(c <= 0 for c in self.channels):
            raise ConfigError(f"channels={self.channels} needs at least two positive widths")
        if len(self.num_convs) != n or any(k < 1 for k in self.num_convs):
            raise ConfigError(
                f"num_convs={self.num_convs} needs one count ≥ 1 per level of "
                f"channels={self.channels} ({n} levels)"
            )
        if self.decoder_convs is not None and (
            len(self.decoder_convs) != n - 1 or any(k < 1 for k in self.decoder_convs)
        ):
            raise ConfigError(
                f"decoder_convs={self.decoder_convs} needs one count ≥ 1 per decoder level "
                f"({n - 1} for {n} channels), or None to mirror num_convs"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size={self.kernel_size} must be odd (paper: 5)")

    @property
    def right_convs(self) -> tuple[int, ...]:
        """Convolutions per decoder stage, finest first."""
        return tuple(self.num_convs[:-1]) if self.decoder_convs is None else self.decoder_convs


class ResidualStage(nn.Module):
    """A V-Net stage: ``act(convs(x) + shortcut(x))``.

    The convolutions are ConvNormAct blocks with ``act`` on all but the last; the activation
    follows the addition (official prototxt). The shortcut is the identity when the widths
    agree; the input stage broadcasts its input across the channels (the paper adds the
    1-channel volume to each of the 16 feature maps), which needs ``out_channels`` to be a
    multiple of ``in_channels``; other widths get a 1×1 projection.

    Args:
        dims: 1, 2 or 3.
        in_channels, out_channels: widths in and out.
        num_convs: convolutions in the stage (≥ 1).
        kernel_size, norm, act: as in ConvNormAct.

    Example:
        >>> stage = ResidualStage(3, 1, 16, 1)
        >>> stage(torch.zeros(1, 1, 8, 8, 8)).shape
        torch.Size([1, 16, 8, 8, 8])
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        num_convs: int,
        *,
        kernel_size: int = 5,
        norm: str = "none",
        act: str = "prelu",
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(
                ConvNormAct(
                    dims,
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel_size,
                    norm=norm,
                    act=act if i < num_convs - 1 else "none",
                )
                for i in range(num_convs)
            )
        )
        self.repeat = out_channels // in_channels if out_channels % in_channels == 0 else 0
        self.shortcut: nn.Module = nn.Identity()
        if not self.repeat:  # widths that do not divide: a 1×1 projection
            self.shortcut = conv_nd(dims)(in_channels, out_channels, 1)
        self.act = activation(act, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(x)
        if self.repeat > 1:  # N×C×S -> N×(C·r)×S: the input broadcast across channels
            residual = residual.repeat(1, self.repeat, *([1] * (x.dim() - 2)))
        return self.act(self.convs(x) + residual)


class UpConv(nn.Sequential):
    """2× transposed convolution (``in_channels`` → ``out_channels``), norm, activation."""

    def __init__(
        self, dims: int, in_channels: int, out_channels: int, *, norm: str, act: str
    ) -> None:
        super().__init__()
        self.up = Upsample(dims, in_channels, out_channels, mode="transposed")
        self.norm = norm_nd(norm, dims, out_channels)
        self.act = activation(act, out_channels)


class VNetEncoder(nn.Module):
    """The left half: input stage, then (strided conv down-sampling, residual stage) per level.

    ``forward`` returns one feature map per level, finest first, the bottom stage last (the
    skip contract of :mod:`unetkit.models.encoders`).
    """

    def __init__(self, config: VNetConfig) -> None:
        super().__init__()
        dims, chans = config.dims, config.channels
        opts = dict(kernel_size=config.kernel_size, norm=config.norm, act=config.act)
        stages = []
        for i, (ch, n) in enumerate(zip(chans, config.num_convs, strict=True)):
            prev = config.in_channels if i == 0 else chans[i - 1]
            down = nn.Identity()
            if i > 0:  # 2×2×2 conv, stride 2: halves the size, goes to the next width
                down = ConvNormAct(
                    dims, prev, ch, 2, stride=2, padding="valid", norm=config.norm, act=config.act
                )
                prev = ch
            stages.append(EncoderStage(down, ResidualStage(dims, prev, ch, n, **opts)))
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(chans)
        self.strides = tuple(2**i for i in range(len(chans)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class VNetDecoder(nn.Module):
    """The right half: per level, up-convolution to the skip's width, concatenation with the
    skip (so the stage is twice as wide), residual stage. Output width ``2·channels[0]``."""

    def __init__(self, config: VNetConfig) -> None:
        super().__init__()
        dims, chans = config.dims, config.channels
        opts = dict(kernel_size=config.kernel_size, norm=config.norm, act=config.act)
        stages = []
        deep = chans[-1]
        for level in reversed(range(len(chans) - 1)):
            skip = chans[level]
            up = UpConv(dims, deep, skip, norm=config.norm, act=config.act)
            block = ResidualStage(dims, 2 * skip, 2 * skip, config.right_convs[level], **opts)
            stages.append(DecoderStage(up, block))
            deep = 2 * skip
        self.stages = nn.ModuleList(stages)
        self.out_channels = 2 * chans[0]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        skips = list(features)
        x = skips.pop()
        for stage in self.stages:
            x = stage(x, skips.pop())
        return x


@register_model(
    "vnet",
    config=VNetConfig,
    description="V-Net (Milletari 2016): residual stages, 5×5×5 convs, PReLU, strided-conv down",
    presets={
        "paper": {},
        "prototxt": dict(num_convs=(1, 1, 2, 3, 3)),
        "vnet_pytorch": dict(num_convs=(1, 1, 2, 3, 2), decoder_convs=(1, 1, 2, 2), norm="batch"),
        "modern": dict(norm="instance"),
    },
    dims=(2, 3),
    test_overrides=dict(channels=(4, 8, 16), num_convs=(1, 2, 2), kernel_size=3),
)
class VNet(SegmentationModel):
    """The V-Net: encoder (skips) -> decoder (concatenate skips) -> 1×1×1 head.

    See the module docstring for the paper's architecture.

    Example:
        >>> net = VNet(VNetConfig(channels=(4, 8, 16), num_convs=(1, 2, 2)))
        >>> net(torch.zeros(1, 1, 9, 20, 13)).shape
        torch.Size([1, 2, 9, 20, 13])
    """

    def __init__(self, config: VNetConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels, self.out_channels, self.dims = (
            config.in_channels,
            config.out_channels,
            config.dims,
        )
        self.encoder = VNetEncoder(config)
        self.decoder = VNetDecoder(config)
        self.head = conv_nd(config.dims)(self.decoder.out_channels, config.out_channels, 1)
        self.multiple = 2 ** (len(config.channels) - 1)
        if config.init == "he":
            he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x, size = pad_to_multiple(x, self.multiple)  # N×C×S, S a multiple of 2^depth
        features = self.encoder(x)  # [N×16×S, N×32×S/2, ..., N×256×S/16]
        x = self.decoder(features)  # N×32×S
        x = self.head(x)  # N×out×S
        return crop_to(x, size)
