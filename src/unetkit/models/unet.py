"""The classic U-Net (Ronneberger, Fischer & Brox, MICCAI 2015), paper form and modern form.

Paper form (``preset="paper"``): valid 3×3 convolutions + ReLU, 2×2 max-pool, channels
64→1024, 2×2 transposed-conv up-sampling, crop-and-concatenate skips, 1×1 head, He-normal
init, drop-out at the end of the contracting path: a 572×572 tile gives a 388×388 output,
23 conv layers, 31,030,658 parameters for 1 input channel and 2 classes.

Modern form (default): same padding with normalisation; any input size in, same size out.
``dims=3`` gives the 3D U-Net of Çiçek et al. 2016.
"""

from __future__ import annotations

import dataclasses

import torch

from unetkit.models.base import SegmentationModel, check_conv_config
from unetkit.models.decoders import UNetDecoder
from unetkit.models.encoders import ConvEncoder
from unetkit.nn.dims import conv_nd
from unetkit.nn.init import he_init
from unetkit.nn.sampling import crop_to, pad_to_multiple
from unetkit.registry import register_model


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Config of the classic U-Net.

    Args:
        in_channels: image channels.
        out_channels: classes (softmax) or 1 (sigmoid).
        dims: 1, 2 or 3.
        channels: width per level, finest first; ``len(channels) - 1`` is the depth.
        padding: "same" (any size in = size out) or "valid" (the paper's form; see the
            size planner ``output_size_for`` / ``input_size_for``).
        up: transposed | interp | pixelshuffle.   down: maxpool | avgpool | conv.
        norm: none | batch | group | instance | layer.   act: relu | leaky_relu | ...
        dropout: channel drop-out at the end of the contracting path.
        init: "he" (paper) or "default" (torch's).
    """

    in_channels: int = 1
    out_channels: int = 2
    dims: int = 2
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    padding: str = "same"
    up: str = "transposed"
    down: str = "maxpool"
    norm: str = "batch"
    act: str = "relu"
    dropout: float = 0.0
    init: str = "he"

    def __post_init__(self) -> None:
        check_conv_config(self)


PAPER = dict(channels=(64, 128, 256, 512, 1024), padding="valid", norm="none", dropout=0.5)


@register_model(
    "unet",
    config=UNetConfig,
    description="Classic U-Net (Ronneberger 2015); valid (paper) or same padding, 1D/2D/3D",
    presets={
        "paper": PAPER,
        "modern": {},
        "3d": dict(dims=3, channels=(32, 64, 128, 256)),
        "small": dict(channels=(16, 32, 64, 128)),
    },
    test_overrides=dict(channels=(4, 8, 16)),
)
class UNet(SegmentationModel):
    """The U-Net: encoder (skips) -> decoder (merge skips) -> 1×1 head. See module docstring.

    Example:
        >>> net = UNet(UNetConfig(channels=(8, 16, 32)))
        >>> net(torch.zeros(1, 1, 37, 50)).shape
        torch.Size([1, 2, 37, 50])
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels, self.out_channels, self.dims = (
            config.in_channels,
            config.out_channels,
            config.dims,
        )
        opts = dict(padding=config.padding, norm=config.norm, act=config.act)
        self.encoder = ConvEncoder(
            config.dims,
            config.in_channels,
            config.channels,
            down=config.down,
            dropout=config.dropout,
            **opts,
        )
        self.decoder = UNetDecoder(config.dims, config.channels, up=config.up, **opts)
        self.head = conv_nd(config.dims)(config.channels[0], config.out_channels, 1)
        self.multiple = 2 ** (len(config.channels) - 1)
        if config.init == "he":
            he_init(self)

    def _output_length(self, n: int) -> int | None:
        if self.config.padding == "same":
            return n
        b = self.encoder.output_length(n)
        return None if b is None else self.decoder.output_length(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        size = None
        if self.config.padding == "same":  # pad to a multiple of 2^depth, crop back below
            x, size = pad_to_multiple(x, self.multiple)
        features = self.encoder(x)  # [N×c0×S, N×c1×S/2, ..., bottleneck]
        x = self.decoder(features)  # N×c0×S (valid: S minus the lost margin)
        x = self.head(x)  # N×out×S
        return x if size is None else crop_to(x, size)
