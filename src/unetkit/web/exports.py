"""The files a segmentation result is downloaded as: mask PNG, labels as 32-bit TIFF,
per-object CSV and GeoJSON polygons (QuPath's feature layout), plus the overlay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from unetkit._atomic import atomic_path, atomic_write_text

# name in the job folder -> what the page calls it
RESULT_FILES = {
    "overlay.png": "overlay",
    "mask.png": "mask (PNG)",
    "labels.tif": "labels (32-bit TIFF)",
    "objects.csv": "objects (CSV)",
    "objects.geojson": "objects (GeoJSON)",
}


def label_polygons(instances: np.ndarray) -> list[tuple[int, list[list[float]]]]:
    """(label, closed outer ring as [x, y] pixel-corner coordinates) per object.

    The ring traces the outside of the object's largest connected part along pixel edges
    (a 0.5 level contour of the padded mask), so it encloses the object's pixels.
    """
    from scipy import ndimage
    from skimage.measure import find_contours

    rings = []
    for label, sl in enumerate(ndimage.find_objects(instances), start=1):
        if sl is None:
            continue
        mask = np.pad(instances[sl] == label, 1)
        contours = find_contours(mask.astype(np.float32), 0.5)
        if not contours:
            continue
        ring = max(contours, key=len)  # (row, col) in the padded crop
        y0, x0 = sl[0].start - 1, sl[1].start - 1
        coords = [[float(c + x0 + 0.5), float(r + y0 + 0.5)] for r, c in ring]
        if coords[0] != coords[-1]:
            coords.append(coords[0])
        rings.append((label, coords))
    return rings


def geojson_features(instances: np.ndarray, table: list[dict[str, Any]]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection: one Polygon per object with its table row as properties."""
    rows = {int(r["label"]): r for r in table}
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "name": f"object {label}",
                **{k: _json_value(v) for k, v in rows.get(label, {}).items()},
            },
        }
        for label, ring in label_polygons(instances)
    ]
    return {"type": "FeatureCollection", "features": features}


def _json_value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def write_result_files(
    folder: Path, instances: np.ndarray, labels: np.ndarray, table: list[dict], overlay: np.ndarray
) -> dict[str, str]:
    """Write every download of one segmented image into ``folder``; returns {file: title}."""
    import tifffile

    from unetkit.data.io import write_image
    from unetkit.segmentation.postprocess import write_object_table_csv

    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "overlay.png", overlay)
    mask = labels.astype(np.uint8)
    write_image(folder / "mask.png", mask * 255 if mask.max() <= 1 else mask)
    with atomic_path(folder / "labels.tif") as tmp:
        tifffile.imwrite(tmp, instances.astype(np.uint32), compression="zlib")
    write_object_table_csv(table, folder / "objects.csv")
    atomic_write_text(folder / "objects.geojson", json.dumps(geojson_features(instances, table)))
    return dict(RESULT_FILES)
