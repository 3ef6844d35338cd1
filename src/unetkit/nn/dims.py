"""Dimension-generic torch ops: one place that maps ``dims`` (1, 2, 3) to torch layers.

Every block gets its convs, pools, norms and activations from here, so nothing 2D-only
hides behind a ``dims`` argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_DROPOUT = {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCENORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}

NORMS = ("none", "batch", "group", "instance", "layer")
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "gelu", "silu", "elu", "none")
INTERP_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def check_dims(dims: int) -> int:
    if dims not in (1, 2, 3):
        raise ConfigError(f"dims={dims!r} is not supported; use 1, 2 or 3")
    return dims


def conv_nd(dims: int) -> type[nn.Module]:
    return _CONV[check_dims(dims)]


def conv_transpose_nd(dims: int) -> type[nn.Module]:
    return _CONV_T[check_dims(dims)]


def pool_nd(dims: int, kind: str = "max") -> type[nn.Module]:
    check_choice("pool", kind, ("max", "avg"))
    return (_MAXPOOL if kind == "max" else _AVGPOOL)[check_dims(dims)]


def dropout_nd(dims: int, p: float) -> nn.Module:
    """Channel dropout for feature maps (the paper's drop-out at the end of the encoder)."""
    return _DROPOUT[check_dims(dims)](p) if p > 0 else nn.Identity()


def norm_nd(name: str, dims: int, channels: int, *, groups: int = 32) -> nn.Module:
    """Normalisation layer by short name: none | batch | group | instance | layer.

    ``group`` uses ``min(groups, channels)`` groups, reduced until it divides ``channels``,
    so narrow test models work with the same default.
    """
    check_choice("norm", name, NORMS)
    check_dims(dims)
    if name == "none":
        return nn.Identity()
    if name == "batch":
        return _BATCHNORM[dims](channels)
    if name == "instance":
        return _INSTANCENORM[dims](channels, affine=True)
    g = max(1, min(groups, channels)) if name == "group" else 1
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)  # "layer" = GroupNorm with one group


def activation(name: str, channels: int | None = None) -> nn.Module:
    """Activation by short name: relu | leaky_relu | prelu | gelu | silu | elu | none."""
    check_choice("act", name, ACTIVATIONS)
    factories: dict[str, Callable[[], nn.Module]] = {
        "relu": lambda: nn.ReLU(inplace=True),
        "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
        "prelu": lambda: nn.PReLU(channels or 1),
        "gelu": nn.GELU,
        "silu": lambda: nn.SiLU(inplace=True),
        "elu": lambda: nn.ELU(inplace=True),
        "none": nn.Identity,
    }
    return factories[name]()
