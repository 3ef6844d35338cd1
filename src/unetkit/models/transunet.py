"""TransUNet (Chen et al. 2021, "TransUNet: Transformers Make Strong Encoders for Medical
Image Segmentation"), hybrid "R50-ViT-B_16" form, for 1D, 2D and 3D.

Encoder: a CNN stem (ResNet-50 v2 root + three stages of (3, 4, 9) bottlenecks with GroupNorm
and weight-standardised convs, as in the official code's ``ResNetV2``) gives skips at 1/2, 1/4
and 1/8 and a 1024-channel map at 1/16; a ViT-B encoder (12 layers, width 768, 12 heads, MLP
3072) runs on that 1/16 grid with 1×1 patches (16-pixel patches of the image) and learned
position embeddings. Decoder (cascaded up-sampler, CUP): a 3×3 conv to 512 channels, then four
stages of ×2 bilinear up-sampling, concatenation of the skip (the three deepest; ``n_skip``)
and two 3×3 conv-BN-ReLU (256, 128, 64, 16 channels), and a 3×3 segmentation head.

Reference size: a 224×224 input, 3 channels and 2 classes give 105,276,066 parameters, the
count of the official code (networks/vit_seg_configs.py ``get_r50_b16_config``).

Differences from the official code, none of which changes the parameter count:
* any input size: the input is padded to a multiple of 16 and the logits cropped back; the
  position embeddings (laid out for ``img_size // 16`` per axis) are interpolated when the
  token grid differs (the official code resizes them only when loading weights);
* the stem's max-pool has padding 1 (the official one has none and zero-pads the 1/4 skip
  back to size); GroupNorm eps is 1e-5 (official 1e-6);
* a 1-channel image goes straight into a 1-channel stem (the official code repeats it 3×);
* the stem's blocks are unetkit's ResNet ``Bottleneck`` (conv-norm-ReLU order, as official),
  with the projection's GroupNorm using 32 groups (official: one group per channel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from unetkit.errors import ConfigError
from unetkit.models.base import SegmentationModel
from unetkit.models.resnet import Bottleneck
from unetkit.nn.conv import ConvNormAct, DoubleConv
from unetkit.nn.dims import INTERP_MODES, activation, check_dims, conv_nd, norm_nd, pool_nd
from unetkit.nn.init import he_init, is_meta
from unetkit.nn.sampling import crop_to, pad_to_multiple
from unetkit.nn.swin import init_transformer_weights
from unetkit.nn.vit import ViTEncoder
from unetkit.registry import register_model

STRIDE = 16  # the CNN stem's total down-sampling; the ViT sees a grid of S/16


class WeightStandardization(nn.Module):
    """Parametrization ``w -> (w - mean) / sqrt(var + 1e-5)`` per output filter (Qiao et al.
    2019), used by BiT's ResNet and hence by TransUNet's stem, together with GroupNorm."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(w, dim=tuple(range(1, w.dim())), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + 1e-5)


def standardize_conv_weights(module: nn.Module) -> None:
    """Register WeightStandardization on the weight of every conv in ``module`` (after init)."""
    # on the meta device (parameter counts) skip the trial call: it holds no values
    unsafe = is_meta(module)
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            parametrize.register_parametrization(
                m, "weight", WeightStandardization(), unsafe=unsafe
            )


class ResNetV2Stem(nn.Module):
    """TransUNet's CNN encoder: 7×7/2 conv + GroupNorm + ReLU, 3×3/2 max-pool, then three
    stages of bottlenecks (strides 1, 2, 2) with GroupNorm.

    Args:
        dims: 1, 2 or 3.   in_channels: image channels.
        width: root width (64); the stages output 4·, 8· and 16·width channels.
        blocks: bottlenecks per stage ((3, 4, 9) for R50 in TransUNet).

    ``forward(x)`` returns ``[1/2, 1/4, 1/8, 1/16]`` features, finest first (skip contract);
    ``out_channels`` and ``strides`` describe them.
    """

    def __init__(
        self, dims: int, in_channels: int, *, width: int = 64, blocks: Sequence[int] = (3, 4, 9)
    ) -> None:
        super().__init__()
        self.conv1 = conv_nd(dims)(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.norm1 = norm_nd("group", dims, width)
        self.relu = activation("relu")
        self.maxpool = pool_nd(dims, "max")(3, stride=2, padding=1)
        prev, channels = width, [width]
        for i, n in enumerate(blocks):
            planes = width * 2**i
            stage = [
                Bottleneck(
                    dims,
                    prev if j == 0 else 4 * planes,
                    planes,
                    norm="group",
                    stride=2 if i > 0 and j == 0 else 1,
                )
                for j in range(n)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            prev = 4 * planes
            channels.append(prev)
        self.out_channels = tuple(channels)
        self.strides = (2, 4, 8, 16)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.norm1(self.conv1(x)))  # N×w×S/2
        features = [x]
        x = self.maxpool(x)  # N×w×S/4
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)  # 4w×S/4, 8w×S/8, 16w×S/16
            features.append(x)
        return features


class UpBlock(nn.Module):
    """×2 bilinear up-sampling (align_corners, as the official ``UpsamplingBilinear2d``), an
    optional skip concatenation, then two 3×3 conv-BN-ReLU."""

    def __init__(self, dims: int, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mode = INTERP_MODES[dims]
        self.block = DoubleConv(dims, in_channels + skip_channels, out_channels, norm="batch")

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode=self.mode, align_corners=True)
        return self.block(x if skip is None else torch.cat([x, skip], dim=1))


class CascadedUpsampler(nn.Module):
    """TransUNet's decoder (CUP, §3.2): 3×3 conv-BN-ReLU on the token map, then UpBlocks.

    Args:
        dims: 1, 2 or 3.   in_channels: token width (hidden_size).
        skip_channels: channels of the skips, deepest first (0 = no skip for that stage).
        channels: output channels per stage (256, 128, 64, 16).   head_channels: 512.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        skip_channels: Sequence[int],
        channels: Sequence[int],
        *,
        head_channels: int = 512,
    ) -> None:
        super().__init__()
        self.conv_more = ConvNormAct(dims, in_channels, head_channels, 3, norm="batch")
        ins = [head_channels, *channels[:-1]]
        self.stages = nn.ModuleList(
            UpBlock(dims, i, s, o) for i, s, o in zip(ins, skip_channels, channels, strict=True)
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor | None]) -> torch.Tensor:
        x = self.conv_more(x)
        for stage, skip in zip(self.stages, skips, strict=True):
            x = stage(x, skip)
        return x


@dataclasses.dataclass(frozen=True)
class TransUNetConfig:
    """Config of TransUNet (defaults: the paper's R50-ViT-B_16 at 224×224).

    Args:
        in_channels: image channels.   out_channels: classes (softmax) or 1 (sigmoid).
        dims: 1, 2 or 3.
        img_size: configured input size per axis; the position embeddings are learned for a
            grid of ``img_size // 16`` per axis and interpolated for other sizes.
        stem_width: ResNet root width (64).   stem_blocks: bottlenecks per stage (3, 4, 9).
        weight_std: weight-standardised stem convs (official BiT-style ResNet).
        hidden_size, num_layers, num_heads, mlp_dim: the ViT (B_16: 768, 12, 12, 3072).
        dropout: ViT embedding/MLP dropout (0.1).   attention_dropout: (0.0).
        head_channels: channels of the decoder's first conv (512).
        decoder_channels: the four up-sampling stages' channels (256, 128, 64, 16).
        n_skip: how many skips (deepest first: 1/8, 1/4, 1/2) the decoder uses (0..3).
    """

    in_channels: int = 3
    out_channels: int = 2
    dims: int = 2
    img_size: int = 224
    stem_width: int = 64
    stem_blocks: tuple[int, ...] = (3, 4, 9)
    weight_std: bool = True
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.0
    head_channels: int = 512
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    n_skip: int = 3

    def __post_init__(self) -> None:
        check_dims(self.dims)
        if self.img_size < STRIDE:
            raise ConfigError(f"img_size={self.img_size} must be at least {STRIDE}")
        if len(self.stem_blocks) != 3 or any(n < 1 for n in self.stem_blocks):
            raise ConfigError(
                f"stem_blocks={self.stem_blocks} needs three positive block counts, e.g. (3, 4, 9)"
            )
        if len(self.decoder_channels) != 4 or any(c < 1 for c in self.decoder_channels):
            raise ConfigError(
                f"decoder_channels={self.decoder_channels} needs four positive widths "
                f"(one per ×2 up-sampling from 1/16), e.g. (256, 128, 64, 16)"
            )
        if not 0 <= self.n_skip <= 3:
            raise ConfigError(f"n_skip={self.n_skip} must be 0, 1, 2 or 3")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")


R50_VIT_L16 = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)


@register_model(
    "transunet",
    config=TransUNetConfig,
    description="TransUNet (Chen 2021): ResNet-50 stem + ViT on the 1/16 grid + cascaded "
    "up-sampler with skips; any input size",
    presets={
        "r50-vit-b16": {},
        "r50-vit-l16": R50_VIT_L16,
        "synapse": dict(out_channels=9),
    },
    test_overrides=dict(
        img_size=32,
        stem_width=16,  # ≥ 2 channels per GroupNorm group at a 1-voxel 1/16 map (3D)
        stem_blocks=(1, 1, 1),
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        mlp_dim=32,
        head_channels=16,
        decoder_channels=(16, 8, 8, 4),
    ),
)
class TransUNet(SegmentationModel):
    """TransUNet: CNN stem (skips) -> ViT on the 1/16 grid -> cascaded up-sampler -> head.

    Example:
        >>> net = TransUNet(TransUNetConfig(in_channels=1, img_size=32, stem_width=8,
        ...     stem_blocks=(1, 1, 1), hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
        ...     head_channels=16, decoder_channels=(16, 8, 8, 4)))
        >>> net(torch.zeros(1, 1, 50, 37)).shape
        torch.Size([1, 2, 50, 37])
    """

    def __init__(self, config: TransUNetConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.in_channels, self.out_channels, self.dims = c.in_channels, c.out_channels, c.dims
        self.encoder = ResNetV2Stem(c.dims, c.in_channels, width=c.stem_width, blocks=c.stem_blocks)
        self.vit = ViTEncoder(
            c.dims,
            self.encoder.out_channels[-1],
            c.hidden_size,
            grid=c.img_size // STRIDE,
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            mlp_dim=c.mlp_dim,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
        )
        skips = list(self.encoder.out_channels[-2::-1])[: c.n_skip]  # deepest first
        skips += [0] * (len(c.decoder_channels) - len(skips))
        self.decoder = CascadedUpsampler(
            c.dims, c.hidden_size, skips, c.decoder_channels, head_channels=c.head_channels
        )
        self.head = conv_nd(c.dims)(c.decoder_channels[-1], c.out_channels, 3, padding=1)
        he_init(self)
        init_transformer_weights(self.vit)
        if c.weight_std:
            standardize_conv_weights(self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x, size = pad_to_multiple(x, STRIDE)  # any size: pad to a multiple of 16, crop below
        features = self.encoder(x)  # [S/2, S/4, S/8, S/16], finest first
        x = self.vit(features.pop())  # N×hidden×S/16: global self-attention on the patch grid
        skips = features[::-1][: self.config.n_skip]  # 1/8, 1/4, 1/2 (deepest first)
        skips += [None] * (len(self.decoder.stages) - len(skips))
        x = self.decoder(x, skips)  # N×decoder_channels[-1]×S
        return crop_to(self.head(x), size)
