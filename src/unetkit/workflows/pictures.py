"""Pictures a person can read: input | prediction | truth side by side, maps with colour bars.

All functions return RGB uint8 arrays (write them with ``unetkit.data.io.write_image``).
Volumes are drawn as maximum projections along depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unetkit.workflows.segment import overlay

__all__ = [
    "attention_preview",
    "comparison",
    "grey_picture",
    "map_with_colorbar",
    "side_by_side",
]

_GAP = 4  # white pixels between panels


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
