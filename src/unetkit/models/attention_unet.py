"""Attention U-Net (Oktay et al., MIDL 2018, "Attention U-Net: Learning Where to Look for the
Pancreas"): a U-Net whose skip connections pass through additive attention gates.

Each gated skip ``x^l`` is weighted by coefficients ``alpha^l`` computed from ``x^l`` and a
gating signal from the next coarser level (grid attention, :class:`unetkit.nn.gates.
AttentionGate`): the deepest gate is driven by the bottleneck after a 1×1 ConvNormAct, the
others by the output of the decoder stage below. As in the paper's Fig. 1 and the official
code, the finest skip is not gated.

``forward(x, return_attention=True)`` also returns the coefficients (finest first, each
N×1×S/2^l at its skip's resolution); :func:`attention_maps` up-samples them to the input size
for heat maps.

Reference configuration (``preset="paper"``, the official ``unet_CT_multi_att_dsv_3D`` with
``feature_scale=4``): 3D, widths 16..256, batch norm, trilinear up-sampling + concatenation
(``up="resize"``), two gates per skip merged by a 1×1 conv, fused deep-supervision heads.
With 1 input channel and 4 classes (CT-150) the paper reports 6.40M parameters
(U-Net baseline 5.88M).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.config import check_choice
from unetkit.errors import ConfigError, InputSizeError
from unetkit.models.base import SegmentationModel, check_conv_config
from unetkit.models.decoders import UNetDecoder
from unetkit.models.encoders import ConvEncoder
from unetkit.nn.conv import ConvNormAct
from unetkit.nn.dims import INTERP_MODES, conv_nd
from unetkit.nn.gates import GatedSkip
from unetkit.nn.init import he_init
from unetkit.nn.sampling import crop_to, pad_to_multiple
from unetkit.registry import register_model

DEEP_SUPERVISION = ("none", "fused")


@dataclasses.dataclass(frozen=True)
class AttentionUNetConfig:
    """Config of the Attention U-Net.

    Args:
        in_channels: image channels.   out_channels: classes (softmax) or 1 (sigmoid).
        dims: 1, 2 or 3.
        channels: width per level, finest first; skips of levels 1..L-1 are gated.
        gate_heads: parallel attention gates per skip (official CT model: 2).
        deep_supervision: "none" (1×1 head on the last decoder stage) or "fused" (the
            official "dsv" layer: a 1×1 head per decoder stage, up-sampled to the input
            size, concatenated and merged by a 1×1 conv; still one output).
        up: transposed | interp | pixelshuffle | resize.   down: maxpool | avgpool | conv.
        norm: none | batch | group | instance | layer.   act: relu | leaky_relu | ...
        dropout: channel drop-out at the end of the contracting path.
        init: "he" or "default" (torch's).
    """

    in_channels: int = 1
    out_channels: int = 2
    dims: int = 2
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    gate_heads: int = 1
    deep_supervision: str = "none"
    up: str = "transposed"
    down: str = "maxpool"
    norm: str = "batch"
    act: str = "relu"
    dropout: float = 0.0
    init: str = "he"

    def __post_init__(self) -> None:
        check_conv_config(self)
        check_choice("deep_supervision", self.deep_supervision, DEEP_SUPERVISION)
        if self.gate_heads < 1:
            raise ConfigError(f"gate_heads={self.gate_heads} must be ≥ 1")


PAPER = dict(
    dims=3,
    channels=(16, 32, 64, 128, 256),
    gate_heads=2,
    deep_supervision="fused",
    up="resize",
)


class FusedHeads(nn.Module):
    """A 1×1 head per decoder stage, resampled to the finest grid, concatenated, 1×1 merge."""

    def __init__(self, dims: int, stage_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        conv = conv_nd(dims)
        self.heads = nn.ModuleList(conv(c, out_channels, 1) for c in stage_channels)
        self.merge = conv(len(stage_channels) * out_channels, out_channels, 1)
        self.mode = INTERP_MODES[dims]

    def forward(self, stage_outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        size = stage_outputs[-1].shape[2:]
        outs = [
            F.interpolate(head(y), size=size, mode=self.mode, align_corners=False)
            if y.shape[2:] != size
            else head(y)
            for head, y in zip(self.heads, stage_outputs, strict=True)
        ]
        return self.merge(torch.cat(outs, dim=1))


@register_model(
    "attention_unet",
    config=AttentionUNetConfig,
    description="Attention U-Net (Oktay 2018): additive attention gates on the skips; 1D/2D/3D",
    presets={
        "paper": PAPER,
        "modern": {},
        "small": dict(channels=(16, 32, 64, 128)),
    },
    test_overrides=dict(channels=(4, 8, 16)),
)
class AttentionUNet(SegmentationModel):
    """U-Net with attention-gated skips. See the module docstring.

    Example:
        >>> net = AttentionUNet(AttentionUNetConfig(channels=(4, 8, 16))).eval()
        >>> logits, maps = net(torch.zeros(1, 1, 19, 23), return_attention=True)
        >>> logits.shape, [m.shape for m in maps]
        (torch.Size([1, 2, 19, 23]), [torch.Size([1, 1, 10, 12])])
    """

    def __init__(self, config: AttentionUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels, self.out_channels, self.dims = (
            config.in_channels,
            config.out_channels,
            config.dims,
        )
        dims, chans, depth = config.dims, config.channels, len(config.channels) - 1
        opts = dict(norm=config.norm, act=config.act)
        self.encoder = ConvEncoder(
            dims, config.in_channels, chans, down=config.down, dropout=config.dropout, **opts
        )
        self.decoder = UNetDecoder(dims, chans, up=config.up, **opts)
        self.gated_levels = tuple(range(1, depth))  # finest first; level 0 is not gated
        if self.gated_levels:  # the deepest gate's signal: the bottleneck through a 1×1 conv
            self.gating = ConvNormAct(dims, chans[-1], chans[-1], 1, **opts)
        self.gates = nn.ModuleList(  # coarse to fine, like the decoder stages
            GatedSkip(dims, chans[lvl], chans[lvl + 1], heads=config.gate_heads, **opts)
            for lvl in reversed(self.gated_levels)
        )
        if config.deep_supervision == "fused":
            self.head = FusedHeads(dims, self.decoder.stage_channels, config.out_channels)
        else:
            self.head = conv_nd(dims)(chans[0], config.out_channels, 1)
        self.multiple = 2**depth
        if config.init == "he":
            he_init(self)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]:
        """Padded logits, padded attention maps (finest first), and the unpadded size."""
        self.check_input(x)
        x, size = pad_to_multiple(x, self.multiple)
        skips = self.encoder(x)  # [N×c0×S, N×c1×S/2, ..., bottleneck]
        x = skips.pop()
        g = self.gating(x) if self.gated_levels else x
        stage_outputs, alphas = [], []
        for k, stage in enumerate(self.decoder.stages):  # up the U, coarse to fine
            skip = skips.pop()
            if k < len(self.gates):
                skip, alpha = self.gates[k](skip, g)  # alpha: N×1×(skip's size)
                alphas.append(alpha)
            x = stage(x, skip)
            stage_outputs.append(x)
            g = x  # the next (finer) gate is driven by this stage's output
        fused = self.config.deep_supervision == "fused"
        logits = self.head(stage_outputs) if fused else self.head(x)
        return logits, alphas[::-1], size

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits N×out×S; with ``return_attention`` also the maps N×1×ceil(S/2^l), finest first."""
        logits, alphas, size = self._run(x)
        logits = crop_to(logits, size)
        if not return_attention:
            return logits
        maps = [
            crop_to(a, [-(-s // 2**lvl) for s in size])
            for lvl, a in zip(self.gated_levels, alphas, strict=True)
        ]
        return logits, maps


def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The attention coefficients of every gate, up-sampled to the input size (for heat maps).

    Runs without gradients and in the model's current mode (call ``model.eval()`` first).

    Args:
        model: an :class:`AttentionUNet`.
        x: N×C×S input, as for ``model(x)``.

    Returns:
        one N×1×S tensor in [0, 1] per gated level, finest first (``model.gated_levels``).

    Example:
        >>> net = AttentionUNet(AttentionUNetConfig(channels=(4, 8, 16, 32))).eval()
        >>> [m.shape for m in attention_maps(net, torch.zeros(1, 1, 19, 23))]
        [torch.Size([1, 1, 19, 23]), torch.Size([1, 1, 19, 23])]
    """
    if not isinstance(model, AttentionUNet):
        raise ConfigError(
            f"attention_maps needs an AttentionUNet (model 'attention_unet'), got "
            f"{type(model).__name__}; other models have no attention gates"
        )
    if not isinstance(x, torch.Tensor):
        raise InputSizeError(f"attention_maps: x must be a torch.Tensor, got {type(x).__name__}")
    with torch.no_grad():
        _, alphas, size = model._run(x)
    mode = INTERP_MODES[model.dims]
    maps = []
    for lvl, a in zip(model.gated_levels, alphas, strict=True):
        padded = [s * 2**lvl for s in a.shape[2:]]  # the grid is exact: S_pad = 2^l · S_l
        maps.append(crop_to(F.interpolate(a, size=padded, mode=mode, align_corners=False), size))
    return maps
