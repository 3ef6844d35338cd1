"""Heat maps of an Attention U-Net's gate coefficients, blended over the input image.

One colour PNG per gated level (Oktay et al. 2018 show such maps to explain where the
network looks): the coefficients alpha in [0, 1], up-sampled to the image size, coloured
with a matplotlib colormap and alpha-blended over a grey or RGB rendering of the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from unetkit.data.io import write_image
from unetkit.errors import ConfigError, InputSizeError
from unetkit.models.attention_unet import AttentionUNet, attention_maps


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """C×H×W float image -> H×W×3 in [0, 1]: RGB if C == 3, else the channel mean (grey).

    Min-max scaling per image, because the input is normalised (any range).
    """
    rgb = image.transpose(1, 2, 0) if image.shape[0] == 3 else image.mean(axis=0)[..., None]
    lo, hi = float(rgb.min()), float(rgb.max())
    rgb = (rgb - lo) / (hi - lo) if hi > lo else np.zeros_like(rgb)
    return np.broadcast_to(rgb, (*rgb.shape[:2], 3))


def _check_style(colormap: str, opacity: float) -> None:
    from matplotlib import colormaps  # lazy: plotting stays out of the import path

    if colormap not in colormaps:
        raise ConfigError(f"colormap={colormap!r} is not a matplotlib colormap (try 'jet')")
    if not 0.0 <= opacity <= 1.0:
        raise ConfigError(f"opacity={opacity} must be in [0, 1]")


def attention_coefficients(
    model: nn.Module, image: torch.Tensor | np.ndarray
) -> list[tuple[int, np.ndarray]]:
    """The gate coefficients alpha in [0, 1] of one image, up-sampled to its size.

    The model runs in eval mode without gradients; its previous mode is restored afterwards.

    Args:
        model: a 2D :class:`~unetkit.models.attention_unet.AttentionUNet`.
        image: C×H×W float image, normalised as the model expects (the model's input).

    Returns:
        (level, H×W float64 map) per gate, finest gated level first (``model.gated_levels``).

    Example:
        >>> net = unetkit.create_model("attention_unet", channels=(4, 8, 16))
        >>> [(level, a.shape) for level, a in attention_coefficients(net, torch.rand(1, 9, 7))]
        [(1, (9, 7))]
    """
    if not isinstance(model, AttentionUNet):
        raise ConfigError(
            f"save_attention_heatmaps needs an AttentionUNet (model 'attention_unet'), got "
            f"{type(model).__name__}"
        )
    if model.dims != 2:
        raise ConfigError(f"attention heat maps are 2D images; this model has dims={model.dims}")
    image = torch.as_tensor(image)
    if image.dim() != 3 or image.shape[0] != model.in_channels:
        raise InputSizeError(
            f"image must be C×H×W with C={model.in_channels} (the model's in_channels), got "
            f"shape {tuple(image.shape)}"
        )
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        maps = attention_maps(model, image[None].to(param.device, param.dtype))
    finally:
        model.train(was_training)
    return [
        (level, alpha[0, 0].to("cpu", torch.float64).numpy())
        for level, alpha in zip(model.gated_levels, maps, strict=True)
    ]


def write_attention_heatmaps(
    coefficients: list[tuple[int, np.ndarray]],
    image: torch.Tensor | np.ndarray,
    out_path_prefix: str | os.PathLike,
    *,
    colormap: str = "jet",
    opacity: float = 0.5,
) -> list[Path]:
    """Write :func:`attention_coefficients` as ``<prefix>_attention_level<l>.png``: the
    coloured map blended over the image, pixel for pixel (arguments as
    :func:`save_attention_heatmaps`)."""
    from matplotlib import colormaps  # lazy: plotting stays out of the import path

    _check_style(colormap, opacity)
    background = _display_rgb(torch.as_tensor(image).detach().to("cpu", torch.float64).numpy())
    cmap = colormaps[colormap]
    paths = []
    for level, alpha in coefficients:
        heat = cmap(np.clip(alpha, 0.0, 1.0))[..., :3]
        rgb = (1.0 - opacity) * background + opacity * heat
        pixels = np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
        paths.append(
            write_image(f"{os.fspath(out_path_prefix)}_attention_level{level}.png", pixels)
        )
    return paths


def save_attention_heatmaps(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    out_path_prefix: str | os.PathLike,
    *,
    colormap: str = "jet",
    opacity: float = 0.5,
) -> list[Path]:
    """Write one heat-map PNG per attention gate: ``<prefix>_attention_level<l>.png``.

    The model runs in eval mode without gradients; its previous mode is restored afterwards.

    Args:
        model: a 2D :class:`~unetkit.models.attention_unet.AttentionUNet`.
        image: C×H×W float image, normalised as the model expects (the model's input).
        out_path_prefix: path prefix, e.g. ``"out/cell_003"``; folders are created.
        colormap: a matplotlib colormap name ("jet", "inferno", "viridis", ...).
        opacity: weight of the heat map in the blend, in [0, 1].

    Returns:
        the written paths, finest gated level first (``model.gated_levels``).

    Example:
        >>> net = unetkit.create_model("attention_unet", channels=(4, 8, 16)).eval()
        >>> save_attention_heatmaps(net, torch.rand(1, 32, 32), "out/img")  # doctest: +SKIP
        [PosixPath('out/img_attention_level1.png')]
    """
    _check_style(colormap, opacity)  # before the model runs
    coefficients = attention_coefficients(model, image)
    return write_attention_heatmaps(
        coefficients, image, out_path_prefix, colormap=colormap, opacity=opacity
    )
