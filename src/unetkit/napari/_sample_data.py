"""Sample data: synthetic fluorescence cells and their true instance labels."""

from __future__ import annotations

from typing import Any

from unetkit.data.synthetic import synth_cells

SAMPLE_SHAPE = (192, 192)
SAMPLE_SEED = 7


def synthetic_cells() -> list[tuple[Any, dict[str, Any], str]]:
    """An image of touching cells (float32 in [0, 1]) and their labels, as napari layers.

    Example:
        >>> (image, meta, kind), _ = synthetic_cells()
        >>> kind, meta["name"], image.shape
        ('image', 'synthetic cells', (192, 192))
    """
    image, labels = synth_cells(SAMPLE_SHAPE, seed=SAMPLE_SEED)
    return [
        (image, {"name": "synthetic cells", "colormap": "gray"}, "image"),
        (labels, {"name": "true cells", "visible": False}, "labels"),
    ]
