"""Objects as a GeoJSON FeatureCollection that QuPath imports (File > Import objects).

Each object is a Feature with a Polygon (or MultiPolygon) geometry in pixel coordinates,
origin at the top-left corner of the image (QuPath's convention), and QuPath's properties:
``objectType`` ("detection" or "cell"), ``classification`` ``{"name", "color"}``, and
``measurements`` as a name → number map (the spelling of QuPath 0.4 and later).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetkit._atomic import atomic_write_text
from unetkit.errors import ConfigError
from unetkit.formats.polygons import object_outlines

__all__ = ["OBJECT_TYPES", "instances_to_geojson", "write_geojson"]

#: QuPath object types an export may declare.
OBJECT_TYPES = ("detection", "cell", "annotation")
_NAMESPACE = uuid.UUID("6f1d7c1e-6a0b-4f7a-9d1e-2b5c3a4d5e6f")


def _ring_list(ring: np.ndarray, *, exterior: bool) -> list[list[float]]:
    """A closed ring as [x, y] pairs, wound as RFC 7946 asks: exteriors counter-clockwise,
    holes clockwise (by the sign of the shoelace area in x, y)."""
    x, y = ring[:, 0], ring[:, 1]
    counter_clockwise = float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) > 0
    if counter_clockwise != exterior:
        ring = ring[::-1]
    return [[round(float(x), 3), round(float(y), 3)] for x, y in ring]


def instances_to_geojson(
    instances: np.ndarray,
    measurements: Sequence[Mapping[str, Any]] = (),
    *,
    object_type: str = "detection",
    class_name: str = "Nucleus",
    color: tuple[int, int, int] = (255, 200, 0),
    name: str = "image",
) -> dict[str, Any]:
    """A FeatureCollection with one Feature per object of a 2-D instance image.

    Args:
        instances: H×W int labels, 0 = background.
        measurements: rows with a ``label`` key (e.g. ``object_table`` rows); their other
            numeric values become the Feature's ``measurements``.
        object_type: "detection" (default), "cell" or "annotation".
        class_name, color: QuPath classification of every object.
        name: image name, seeds the Features' stable ids.

    Example:
        >>> fc = instances_to_geojson(np.array([[0, 1, 1], [0, 1, 1]]))
        >>> fc["features"][0]["properties"]["objectType"]
        'detection'
    """
    if object_type not in OBJECT_TYPES:
        raise ConfigError(f"object_type={object_type!r}: use one of {', '.join(OBJECT_TYPES)}")
    by_label = {int(row["label"]): row for row in measurements if "label" in row}
    # ids hash the name as UTF-8: a file name that is not UTF-8 hashes as its escaped bytes
    key = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    features = []
    for outline in object_outlines(np.asarray(instances)):
        polygons = [
            [_ring_list(ext, exterior=True)] + [_ring_list(h, exterior=False) for h in holes]
            for ext, holes in outline.parts
        ]
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]}
            if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        values = {
            k: float(v)
            for k, v in by_label.get(outline.label, {}).items()
            if isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v)
        }
        values.setdefault("label", float(outline.label))
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_NAMESPACE, f"{key}/{outline.label}")),
                "geometry": geometry,
                "properties": {
                    "objectType": object_type,
                    "name": f"{class_name} {outline.label}",
                    "classification": {"name": class_name, "color": list(color)},
                    "isLocked": False,
                    "measurements": values,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    path: str | os.PathLike,
    instances: np.ndarray,
    measurements: Sequence[Mapping[str, Any]] = (),
    **options: Any,
) -> Path:
    """Write :func:`instances_to_geojson` to ``path`` atomically; options as there."""
    path = Path(path)
    collection = instances_to_geojson(instances, measurements, name=path.stem, **options)
    atomic_write_text(path, json.dumps(collection, separators=(",", ":")))
    return path
