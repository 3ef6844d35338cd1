"""The files a segmentation result is downloaded as: mask PNG, labels as 32-bit TIFF,
per-object CSV and GeoJSON polygons (``formats.geojson``, QuPath's layout), plus the overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from unetkit._atomic import atomic_path
from unetkit.data.io import write_image
from unetkit.formats.geojson import write_geojson
from unetkit.segmentation.postprocess import write_object_table_csv

# name in the job folder -> what the page calls it
RESULT_FILES = {
    "overlay.png": "overlay",
    "mask.png": "mask (PNG)",
    "labels.tif": "labels (32-bit TIFF)",
    "objects.csv": "objects (CSV)",
    "objects.geojson": "objects (GeoJSON)",
}


def write_result_files(
    folder: Path, instances: np.ndarray, labels: np.ndarray, table: list[dict], overlay: np.ndarray
) -> dict[str, str]:
    """Write every download of one segmented image into ``folder``; returns {file: title}."""
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "overlay.png", overlay)
    mask = labels.astype(np.uint8)
    write_image(folder / "mask.png", mask * 255 if mask.max() <= 1 else mask)
    with atomic_path(folder / "labels.tif") as tmp:
        tifffile.imwrite(tmp, instances.astype(np.uint32), compression="zlib")
    write_object_table_csv(table, folder / "objects.csv")
    write_geojson(folder / "objects.geojson", instances, table)
    return dict(RESULT_FILES)
