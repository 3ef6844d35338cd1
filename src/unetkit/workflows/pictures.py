"""Pictures a person can read: input | prediction | truth side by side, maps with colour bars.

All functions return RGB uint8 arrays (write them with ``unetkit.data.io.write_image``).
Volumes are drawn as maximum projections along depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from skimage.color import label2rgb
from skimage.segmentation import find_boundaries

from unetkit.segmentation.postprocess import instances_from_semantic
from unetkit.workflows.segment import Prediction

__all__ = [
    "attention_preview",
    "comparison",
    "evaluation_picture",
    "regression_picture",
    "grey_picture",
    "map_with_colorbar",
    "overlay",
    "side_by_side",
]

_GAP = 4  # white pixels between panels



def overlay(image: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """RGB uint8 picture: the image in grey, objects tinted, their outlines in yellow.

    Volumes (C×D×H×W image, D×H×W instances) are drawn as a maximum projection along D."""
    if instances.ndim == 3:
        image, instances = image.max(axis=1), instances.max(axis=0)
    grey = image.mean(0) if image.ndim == 3 else image
    lo, hi = np.percentile(grey, [1, 99.5])
    grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = label2rgb(instances, image=grey, alpha=0.3, bg_label=0, image_alpha=1.0)
    rgb[find_boundaries(instances, mode="inner")] = (1.0, 0.9, 0.0)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def grey_picture(image: np.ndarray) -> np.ndarray:
    """RGB picture of a float C×H×W (C×D×H×W) image: channel mean, 1–99.5 % stretched."""
    grey = image.max(axis=1) if image.ndim == 4 else image
    grey = grey.mean(0) if grey.ndim == 3 else grey
    lo, hi = np.percentile(grey, [1, 99.5])
    grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)
    return (np.repeat(grey[..., None], 3, axis=-1) * 255).astype(np.uint8)


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """Join RGB panels of equal height left to right with a thin white gap."""
    height = max(p.shape[0] for p in panels)
    parts = []
    for k, panel in enumerate(panels):
        if k:
            parts.append(np.full((height, _GAP, 3), 255, np.uint8))
        padded = np.full((height, panel.shape[1], 3), 255, np.uint8)
        padded[: panel.shape[0]] = panel
        parts.append(padded)
    return np.concatenate(parts, axis=1)


def comparison(
    image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None = None
) -> np.ndarray:
    """Input | prediction | truth: the input in grey, then each label image drawn over it
    (objects tinted, outlines in yellow); volumes as maximum projections.

    Args:
        image: float C×H×W (C×D×H×W).
        predicted, truth: instance (or class) label images H×W (D×H×W); truth optional.

    Example:
        >>> pic = comparison(np.zeros((1, 8, 8)), np.eye(8, dtype=int))
        >>> pic.shape
        (8, 20, 3)
    """
    panels = [grey_picture(image), overlay(image, np.asarray(predicted))]
    if truth is not None:
        panels.append(overlay(image, np.asarray(truth)))
    return side_by_side(panels)


def map_with_colorbar(
    values: np.ndarray,
    *,
    label: str = "",
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    background: np.ndarray | None = None,
    opacity: float = 0.5,
) -> np.ndarray:
    """A 2-D map (depth, attention, probability) in colour with a labelled colour bar.

    Drawn by matplotlib (Agg) at the map's own pixel size, plus room for the bar. Volumes
    (D×H×W) are drawn as their maximum projection along D.

    Args:
        values: H×W (or D×H×W) map; NaN/inf are left blank.
        label: the colour bar's caption (the quantity and its unit).
        cmap: a matplotlib colormap name.
        vmin, vmax: the colour scale (default: the map's finite range).
        background: an H×W×3 RGB uint8 picture to draw the map over (e.g.
            :func:`grey_picture` of the input); the bar shows the map's full colours.
        opacity: the map's weight over ``background``, in [0, 1].

    Example:
        >>> map_with_colorbar(np.zeros((40, 30)), label="α").shape[1] > 30
        True
    """
    # plotting: imported when a picture is drawn (start-up time); Agg needs no display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 3:
        values = values.max(axis=0)
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if vmin is None and finite.size else (vmin or 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax or 1.0)
    h, w = values.shape
    dpi = 100
    fig = Figure(figsize=((w + 90) / dpi, max(h, 120) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, w / (w + 90), min(1.0, h / max(h, 120))))
    alpha = 1.0
    if background is not None:
        ax.imshow(background, interpolation="nearest")
        alpha = opacity
    shown = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=cmap,
        vmin=lo,
        vmax=max(hi, lo + 1e-12),
        alpha=alpha,
        interpolation="nearest",
    )
    ax.set_axis_off()
    bar = fig.add_axes((w / (w + 90) + 0.04, 0.1, 12 / (w + 90), 0.8))
    colorbar = fig.colorbar(shown, cax=bar, label=label)
    colorbar.solids.set_alpha(1.0)  # the scale in full colour, whatever the blend
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def attention_preview(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """An attention gate's coefficients over the input, with a colour bar from 0 to 1.

    Args:
        image: the float C×H×W input. alpha: H×W coefficients in [0, 1]
            (``unetkit.inference.attention_maps.attention_coefficients``).
    """
    return map_with_colorbar(
        alpha,
        label="attention coefficient α",
        cmap="jet",
        vmin=0.0,
        vmax=1.0,
        background=grey_picture(image),
    )


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def evaluation_picture(sample: Mapping[str, Any], prediction: Prediction) -> np.ndarray:
    """Input | prediction | truth of one scored sample, the objects as evaluate scores them:
    the sample's ``instances`` where it has them, else the connected components of its
    ``mask``'s foreground (cells between membranes). Volumes: maximum projections.

    Args:
        sample: a dataset sample with ``image`` (C×H×W) and ``mask`` (and ``instances``).
        prediction: what ``predict_image`` returned for it.
    """
    truth = sample.get("instances")
    truth = instances_from_semantic(_array(sample["mask"])) if truth is None else _array(truth)
    return comparison(_array(sample["image"]), prediction.instances, truth)


def regression_picture(
    image: np.ndarray, prediction: np.ndarray, target: np.ndarray, *, output: str
) -> np.ndarray:
    """Input | prediction | truth of a regression model. Depth: both maps in colour with a
    colour bar in metres on the truth's scale; restoration: grey pictures clipped to [0, 1].

    Args:
        image: C×H×W input. prediction, target: K×H×W. output: "depth" or "linear".
    """
    image, prediction, target = (_array(x) for x in (image, prediction, target))
    if output == "depth":
        lo, hi = float(target.min()), float(target.max())
        maps = [
            map_with_colorbar(m[0], label="depth (m)", cmap="magma_r", vmin=lo, vmax=hi)
            for m in (prediction, target)
        ]
        return side_by_side([grey_picture(image), *maps])
    return side_by_side([grey_picture(np.clip(x, 0, 1)) for x in (image, prediction, target)])
