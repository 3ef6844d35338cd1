"""U-Net++ (Zhou, Rahman Siddiquee, Tajbakhsh & Liang, DLMIA 2018): nested dense skip pathways.

Node ``X^{i,j}`` sits at resolution level ``i`` (0 = finest) and column ``j``. The backbone
nodes ``X^{i,0}`` are the ConvEncoder's stages; every other node is (paper, eq. 1)::

    X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, U(X^{i+1,j-1})])

with ``H`` a DoubleConv to ``channels[i]`` and ``U`` a 2× up-sampler (the official code's
2×2 transposed conv). Deep supervision puts a 1×1 head on each of ``X^{0,1..L}``.

Outputs:
    - training with ``deep_supervision=True``: a list of head logits ordered
      ``[X^{0,L}, X^{0,L-1}, ..., X^{0,1}]``, so :class:`unetkit.segmentation.losses.Loss`
      (weights 1, 1/2, 1/4, ... normalised) weights the full-depth head most;
    - otherwise (eval mode, or no deep supervision): one N×out×S tensor from ``X^{0,L}``.

Pruning (paper §2, "fast mode"): with ``prune_level = k`` the eval forward computes only
the sub-network UNet++ L_k (encoder levels 0..k, nodes with ``i + j <= k``) and returns the
head at ``X^{0,k}``. Set it in the config (saved in checkpoints) or on a built model
(``model.prune_level = 2``; not saved). Training always runs the full network.

Reference configuration (paper Table 2; official Keras ``Nest_Net``): widths 32..512, plain
3×3 convs with bias and ReLU (no normalisation), transposed-conv up-sampling, 1 channel in,
1 class out: 9.04M parameters with or without deep supervision (U-Net: 7.76M).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from unetkit.errors import ConfigError
from unetkit.models.base import SegmentationModel, check_conv_config
from unetkit.models.decoders import DecoderStage, up_block
from unetkit.models.encoders import ConvEncoder
from unetkit.nn.conv import DoubleConv
from unetkit.nn.dims import conv_nd
from unetkit.nn.init import he_init
from unetkit.nn.sampling import crop_to, pad_to_multiple
from unetkit.registry import register_model


@dataclasses.dataclass(frozen=True)
class UNetPlusPlusConfig:
    """Config of U-Net++.

    Args:
        in_channels: image channels.   out_channels: classes (softmax) or 1 (sigmoid).
        dims: 1, 2 or 3.
        channels: width per level, finest first; depth ``L = len(channels) - 1``.
        deep_supervision: heads on every ``X^{0,j}`` (list output in training mode).
        prune_level: ``None`` (full network) or ``k`` in 1..L: the eval forward computes
            UNet++ L_k only and returns the head at ``X^{0,k}`` (needs deep supervision
            unless ``k == L``).
        up: transposed | interp | pixelshuffle | resize.   down: maxpool | avgpool | conv.
        norm: none | batch | group | instance | layer.   act: relu | leaky_relu | ...
        dropout: channel drop-out at the end of the contracting path.
        init: "he" or "default" (torch's).
    """

    in_channels: int = 1
    out_channels: int = 2
    dims: int = 2
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    deep_supervision: bool = False
    prune_level: int | None = None
    up: str = "transposed"
    down: str = "maxpool"
    norm: str = "batch"
    act: str = "relu"
    dropout: float = 0.0
    init: str = "he"

    def __post_init__(self) -> None:
        check_conv_config(self)
        _check_prune_level(self.prune_level, len(self.channels) - 1, self.deep_supervision)


def _check_prune_level(level: int | None, depth: int, deep_supervision: bool) -> None:
    if level is None:
        return
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= depth:
        raise ConfigError(
            f"prune_level={level!r} must be None (full network) or an integer in 1..{depth} "
            f"(the depth, len(channels) - 1)"
        )
    if level < depth and not deep_supervision:
        raise ConfigError(
            f"prune_level={level} needs a head at X^(0,{level}); set deep_supervision=True "
            f"(pruning is trained through deep supervision) or use prune_level=None"
        )


PAPER = dict(channels=(32, 64, 128, 256, 512), norm="none", deep_supervision=True)


@register_model(
    "unetpp",
    config=UNetPlusPlusConfig,
    description="U-Net++ (Zhou 2018): nested dense skips, deep supervision, pruning; 1D/2D/3D",
    presets={
        "paper": PAPER,
        "modern": {},
        "3d": dict(dims=3, channels=(16, 32, 64, 128), deep_supervision=True),
        "small": dict(channels=(16, 32, 64, 128)),
    },
    test_overrides=dict(channels=(4, 8, 16)),
)
class UNetPlusPlus(SegmentationModel):
    """U-Net++: encoder ``X^{i,0}``, nested nodes ``X^{i,j}``, heads on ``X^{0,j}``.

    See the module docstring for outputs and pruning.

    Example:
        >>> net = UNetPlusPlus(UNetPlusPlusConfig(channels=(4, 8, 16), deep_supervision=True))
        >>> [y.shape[1:] for y in net(torch.zeros(1, 1, 19, 23))]   # training: one per head
        [torch.Size([2, 19, 23]), torch.Size([2, 19, 23])]
        >>> net.prune_level = 1
        >>> net.eval()(torch.zeros(1, 1, 19, 23)).shape             # fast mode, X^{0,1}
        torch.Size([1, 2, 19, 23])
    """

    def __init__(self, config: UNetPlusPlusConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels, self.out_channels, self.dims = (
            config.in_channels,
            config.out_channels,
            config.dims,
        )
        chans, self.depth = config.channels, len(config.channels) - 1
        opts = dict(norm=config.norm, act=config.act)
        self.encoder = ConvEncoder(
            config.dims, config.in_channels, chans, down=config.down, dropout=config.dropout, **opts
        )
        nodes = {}
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                up, up_channels = up_block(config.dims, chans[i + 1], chans[i], config.up)
                block = DoubleConv(config.dims, j * chans[i] + up_channels, chans[i], **opts)
                nodes[f"x{i}_{j}"] = DecoderStage(up, block)
        self.nodes = nn.ModuleDict(nodes)
        head_columns = range(1, self.depth + 1) if config.deep_supervision else [self.depth]
        conv = conv_nd(config.dims)
        self.heads = nn.ModuleDict(
            {f"x0_{j}": conv(chans[0], config.out_channels, 1) for j in head_columns}
        )
        self._prune_level = config.prune_level
        if config.init == "he":
            he_init(self)

    @property
    def prune_level(self) -> int | None:
        """Column ``k`` whose head the eval forward returns (None: the full network)."""
        return self._prune_level

    @prune_level.setter
    def prune_level(self, level: int | None) -> None:
        _check_prune_level(level, self.depth, self.config.deep_supervision)
        self._prune_level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        pruned = not self.training and self._prune_level is not None
        depth = self._prune_level if pruned else self.depth
        x, size = pad_to_multiple(x, 2**depth)
        rows: list[list[torch.Tensor]] = []  # rows[i][j] = X^{i,j}, N×channels[i]×S/2^i
        for i, stage in enumerate(self.encoder.stages[: depth + 1]):
            x = stage(x)  # X^{i,0}: down the backbone
            rows.append([x])
            for j in range(1, i + 1):  # the new anti-diagonal X^{i-j,j}, coarse to fine
                r = i - j
                node = self.nodes[f"x{r}_{j}"]
                rows[r].append(node(rows[r + 1][j - 1], torch.cat(rows[r], dim=1)))
        top = rows[0]  # X^{0,0..depth}, all at the (padded) input size
        if self.training and self.config.deep_supervision:
            return [crop_to(self.heads[f"x0_{j}"](top[j]), size) for j in range(depth, 0, -1)]
        return crop_to(self.heads[f"x0_{depth}"](top[depth]), size)
