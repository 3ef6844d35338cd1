"""DeepLabV3+ (Chen, Zhu, Papandreou, Schroff & Adam, ECCV 2018), for 2D and 3D.

Encoder: a ResNet whose last strides become dilation (output stride 16 or 8), then ASPP on
its deepest features (atrous rates 6/12/18 at output stride 16, 12/24/36 at 8, plus image
pooling). Decoder (§3.1, Fig. 2): the ASPP output is upsampled ×(output_stride/4) and
concatenated with the stride-4 low-level features reduced by a 1×1 conv to 48 channels; two
3×3 convs of 256 channels refine the result (the best decoder in the paper's Table 2), a
1×1 classifier gives the logits, and a bilinear upsampling ×4 brings them to the input size.
``separable=True`` makes the ASPP and decoder 3×3 convs atrous separable (§3.2), as in the
official implementation.

Any input size works: the input is padded to a multiple of the output stride and the
logits are cropped back.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.config import check_choice
from unetkit.errors import ConfigError
from unetkit.models.base import SegmentationModel
from unetkit.models.resnet import OUTPUT_STRIDES, RESNETS, ResNetEncoder
from unetkit.nn.aspp import ASPP, SeparableConvNormAct
from unetkit.nn.conv import ConvNormAct
from unetkit.nn.dims import INTERP_MODES, check_dims, conv_nd
from unetkit.nn.init import he_init
from unetkit.nn.sampling import crop_to, pad_to_multiple
from unetkit.registry import register_model


@dataclasses.dataclass(frozen=True)
class DeepLabV3PlusConfig:
    """Config of DeepLabV3+.

    Args:
        in_channels: image channels.
        out_channels: classes (softmax) or 1 (sigmoid).
        dims: 2 or 3.
        backbone: resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
        widths: ResNet planes of layer1..layer4 (torchvision: 64, 128, 256, 512).
        output_stride: 8, 16 (paper) or 32: input size / deepest feature size.
        multi_grid: rate multipliers of layer4's blocks (DeepLabV3: (1, 2, 4)); () = ones.
        aspp_rates: ASPP atrous rates at output stride 16; scaled by 16/output_stride
            (so (12, 24, 36) at output stride 8, as in the paper).
        aspp_channels: channels of each ASPP branch and of its output (paper: 256).
        aspp_dropout: dropout after the ASPP projection.
        decoder_channels: channels of the two decoder 3×3 convs (paper: 256).
        low_level_channels: channels of the reduced stride-4 features (paper: 48).
        separable: atrous separable 3×3 convs in ASPP and decoder (paper §3.2).
        norm: none | batch | group | instance | layer.   act: relu | silu | ...
        init: "he" (He-normal convs) or "default" (torch's).
    """

    in_channels: int = 3
    out_channels: int = 21
    dims: int = 2
    backbone: str = "resnet50"
    widths: tuple[int, ...] = (64, 128, 256, 512)
    output_stride: int = 16
    multi_grid: tuple[int, ...] = ()
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    aspp_channels: int = 256
    aspp_dropout: float = 0.1
    decoder_channels: int = 256
    low_level_channels: int = 48
    separable: bool = False
    norm: str = "batch"
    act: str = "relu"
    init: str = "he"

    def __post_init__(self) -> None:
        check_dims(self.dims)
        if self.dims == 1:
            raise ConfigError("dims=1 is not supported by DeepLabV3+; use dims=2 or dims=3")
        check_choice("backbone", self.backbone, RESNETS)
        check_choice("init", self.init, ("he", "default"))
        if self.output_stride not in OUTPUT_STRIDES:
            raise ConfigError(
                f"output_stride={self.output_stride!r} is not supported; use 16 (paper "
                f"default), 8 (denser, slower) or 32"
            )
        for name in ("aspp_channels", "decoder_channels", "low_level_channels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not self.aspp_rates or any(int(r) < 1 for r in self.aspp_rates):
            raise ConfigError(f"aspp_rates={self.aspp_rates} must be one or more integers >= 1")

    def effective_rates(self) -> tuple[int, ...]:
        """ASPP rates at this output stride: doubled at 8 (paper §4.1), halved at 32."""
        return tuple(max(1, int(r) * 16 // self.output_stride) for r in self.aspp_rates)


TINY = dict(
    backbone="resnet18",
    widths=(4, 8, 8, 8),
    aspp_channels=8,
    decoder_channels=8,
    low_level_channels=4,
)


@register_model(
    "deeplabv3plus",
    config=DeepLabV3PlusConfig,
    description="DeepLabV3+ (Chen 2018): dilated ResNet, ASPP, low-level-feature decoder; 2D/3D",
    presets={
        "resnet50": {},
        "resnet101": dict(backbone="resnet101"),
        "resnet101-os8": dict(backbone="resnet101", output_stride=8),
        "separable": dict(separable=True),
        "small": dict(backbone="resnet18", aspp_channels=128, decoder_channels=128),
        "3d": dict(
            dims=3,
            backbone="resnet18",
            widths=(16, 32, 64, 128),
            aspp_channels=64,
            decoder_channels=64,
            low_level_channels=16,
        ),
    },
    dims=(2, 3),
    test_overrides=TINY,
)
class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+: dilated ResNet → ASPP → ×(OS/4) up, fuse stride-4 features → ×4 up.

    Example:
        >>> net = DeepLabV3Plus(DeepLabV3PlusConfig(in_channels=1, out_channels=2, **TINY))
        >>> net.eval()(torch.zeros(1, 1, 37, 50)).shape
        torch.Size([1, 2, 37, 50])
    """

    def __init__(self, config: DeepLabV3PlusConfig) -> None:
        super().__init__()
        c = self.config = config
        self.in_channels, self.out_channels, self.dims = c.in_channels, c.out_channels, c.dims
        opts = dict(norm=c.norm, act=c.act)
        self.encoder = ResNetEncoder(
            c.dims, c.in_channels, arch=c.backbone, widths=c.widths,
            output_stride=c.output_stride, multi_grid=c.multi_grid, **opts,
        )  # fmt: skip
        self.low_level_index = self.encoder.strides.index(4)
        self.aspp = ASPP(
            c.dims, self.encoder.out_channels[-1], c.aspp_channels, c.effective_rates(),
            separable=c.separable, dropout=c.aspp_dropout, **opts,
        )  # fmt: skip
        low = self.encoder.out_channels[self.low_level_index]
        self.low_level = ConvNormAct(c.dims, low, c.low_level_channels, 1, **opts)
        conv3 = SeparableConvNormAct if c.separable else ConvNormAct
        self.decoder = nn.Sequential(
            conv3(c.dims, c.aspp_channels + c.low_level_channels, c.decoder_channels, 3, **opts),
            conv3(c.dims, c.decoder_channels, c.decoder_channels, 3, **opts),
        )
        self.head = conv_nd(c.dims)(c.decoder_channels, c.out_channels, 1)
        self.mode = INTERP_MODES[c.dims]
        if c.init == "he":
            he_init(self)

    def _resize(self, x: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x, size = pad_to_multiple(x, self.config.output_stride)  # S = k·OS, cropped below
        features = self.encoder(x)  # [S/2, S/4, S/8, ..., S/OS]
        deep = self.aspp(features[-1])  # N×aspp×S/OS
        low = self.low_level(features[self.low_level_index])  # N×48×S/4
        deep = self._resize(deep, low.shape[2:])  # ×(OS/4)
        y = self.decoder(torch.cat([deep, low], dim=1))  # N×dec×S/4
        y = self._resize(self.head(y), x.shape[2:])  # N×out×S, ×4
        return crop_to(y, size)
