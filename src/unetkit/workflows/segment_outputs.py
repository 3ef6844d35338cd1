"""What `unetkit predict` writes per image, and how a folder run resumes.

Per image ``<name>``: ``_mask.png`` (classes), instance labels (``_instances.png`` uint16,
or ``_instances.tif`` uint32 when there are more than 65,535 objects or
``label_format="tif32"``), ``_labels_preview.png`` (labels in colour: a viewer shows uint16
as black), ``_overlay.png`` (volumes: both of the maximum projection along depth),
``_objects.csv`` (µm columns when the pixel size is known), and on request
``_probabilities.tif`` (float32 C×H×W), ``.geojson`` (QuPath) and ``_RoiSet.zip`` (Fiji).
``counts.csv`` gains one row as each image finishes, and ``predict.json`` records the
settings, so a re-run skips finished images.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage.color import label2rgb

from unetkit._atomic import atomic_write_text
from unetkit.data.io import read_image, write_image
from unetkit.data.tiff import PixelSize
from unetkit.errors import ConfigError, DataError
from unetkit.formats.geojson import write_geojson
from unetkit.formats.imagej_roi import write_roi_zip
from unetkit.segmentation.postprocess import object_table, write_object_table_csv

__all__ = [
    "LABEL_FORMATS",
    "OBJECT_TYPES",
    "OutputOptions",
    "PredictLedger",
    "label_preview",
    "unique_names",
    "write_outputs",
]

log = logging.getLogger(__name__)

#: ``auto``: uint16 PNG up to 65,535 objects, else uint32 TIFF; ``tif32``: always TIFF.
LABEL_FORMATS = ("auto", "tif32")
#: QuPath object types of the GeoJSON export.
OBJECT_TYPES = ("detection", "cell")
UINT16_LABELS = 65_535
COUNTS_COLUMNS = (
    "image",
    "name",
    "objects",
    "foreground_fraction",
    "labels",
    "pixel_size_um",
    "scale",
)


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """Which files `predict` writes besides masks, labels, previews and tables.

    label_format: one of :data:`LABEL_FORMATS`.
    save_probabilities: ``<name>_probabilities.tif`` (float32 C×H×W, C×D×H×W for volumes).
    geojson: ``<name>.geojson`` (QuPath FeatureCollection, objects of ``object_type``).
    imagej_rois: ``<name>_RoiSet.zip`` (Fiji ROI Manager).
    overwrite: redo images that a previous run into the same folder finished.
    """

    label_format: str = "auto"
    save_probabilities: bool = False
    geojson: bool = False
    imagej_rois: bool = False
    object_type: str = "detection"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.label_format not in LABEL_FORMATS:
            raise ConfigError(
                f"--labels-format {self.label_format!r}: use one of {', '.join(LABEL_FORMATS)}"
            )
        if self.object_type not in OBJECT_TYPES:
            raise ConfigError(
                f"--object-type {self.object_type!r}: use one of {', '.join(OBJECT_TYPES)}"
            )


def unique_names(
    files: Sequence[Path],
    stem_of: Callable[[Path], str] = lambda p: p.stem,
    *,
    previous: Mapping[str, str] | None = None,
) -> dict[Path, str]:
    """An output name per input, unique even when stems collide.

    ``a/x.png`` + ``b/x.png`` become ``a_x`` and ``b_x``; ``y.png`` + ``y.tif`` become
    ``y_png`` and ``y_tif``; anything still equal gets ``_2``, ``_3``. ``previous`` maps
    inputs (as str) to the names an earlier run gave them: they keep those, so a resumed
    run with more inputs finds its finished images. Renames are logged.
    """
    previous = previous or {}
    groups: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        groups[stem_of(f)].append(f)
    names: dict[Path, str] = {}
    for stem, group in groups.items():
        if len(group) == 1:
            names[group[0]] = stem
            continue
        exts = {f: f.name[len(stem) :].lstrip(".").replace(".", "_").lower() for f in group}
        by_suffix = len(set(exts.values())) == len(group)
        for f in group:
            names[f] = f"{stem}_{exts[f]}" if by_suffix else f"{f.parent.name}_{stem}"
    kept = {f: previous[str(f)] for f in files if str(f) in previous}
    taken = {name.lower() for name in kept.values()}
    for f in files:  # a last pass for whatever still collides (or collides with a stem)
        if f in kept:
            names[f] = kept[f]
            continue
        base, k = names[f], 2
        while names[f].lower() in taken:
            names[f], k = f"{base}_{k}", k + 1
        taken.add(names[f].lower())
    renamed = [f"{f} -> {n}" for f, n in names.items() if n != stem_of(f)]
    if renamed:
        log.warning("inputs with the same name get unique output names: %s", "; ".join(renamed))
    return names


class PredictLedger:
    """``counts.csv`` grown one atomic rewrite per finished image, plus ``predict.json``.

    A re-run with the same settings skips images listed in counts.csv whose label file
    exists, and images whose label file (written last) exists but whose row was lost to an
    interruption (the row is rebuilt from the files): no image is predicted twice.
    Different settings (checkpoint, options) are refused unless ``overwrite``.
    """

    def __init__(self, out: Path, settings: dict[str, Any], *, overwrite: bool = False):
        self.out = out
        self.counts = out / "counts.csv"
        settings_path = out / "predict.json"
        self.rows: list[dict[str, Any]] = []
        self.resuming = False
        if not overwrite and self.counts.is_file():
            previous = _read_json(settings_path)
            if previous is not None and previous != settings:
                changed = sorted(k for k in settings if previous.get(k) != settings[k])
                raise ConfigError(
                    f"{out}: holds results of a predict run with other settings "
                    f"({', '.join(changed) or 'unknown'}); pass --overwrite to redo them, "
                    "or choose another --out"
                )
            self.rows = _read_rows(self.counts)
            self.resuming = previous == settings
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(settings_path, json.dumps(settings, indent=1, sort_keys=True))
        if overwrite or not self.counts.is_file():
            write_object_table_csv([], self.counts, columns=COUNTS_COLUMNS)

    def names(self) -> dict[str, str]:
        """Input (as str) → output name, for every image a previous run finished."""
        return {r["image"]: r["name"] for r in self.rows}

    def done(self, image: Path, name: str) -> bool:
        """True when ``image`` finished in an earlier run (its labels are on disk)."""
        listed = any(
            r["image"] == str(image) and r["name"] == name and (self.out / r["labels"]).is_file()
            for r in self.rows
        )
        return listed or (self.resuming and self._recover(image, name))

    def _recover(self, image: Path, name: str) -> bool:
        """Rebuild the row of an image finished just before an interruption, if it was."""
        found = [
            next(
                (
                    p
                    for p in (self.out / f"{name}_{kind}.{ext}" for ext in ("png", "tif"))
                    if p.is_file()
                ),
                None,
            )
            for kind in ("instances", "mask")
        ]
        table = self.out / f"{name}_objects.csv"
        if None in found or not table.is_file():
            return False
        labels, mask = found
        with open(table, newline="", encoding="utf-8") as f:
            objects = sum(1 for _ in csv.DictReader(f))
        fraction = float((read_image(mask) > 0).mean())
        row = {"image": str(image), "name": name, "objects": objects}
        self.add({**row, "foreground_fraction": fraction, "labels": labels.name})
        log.info("%s: finished before an interruption; its counts row was rebuilt", image)
        return True

    def add(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if r["name"] != row["name"]] + [row]
        write_object_table_csv(self.rows, self.counts, columns=COUNTS_COLUMNS)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        # surrogateescape: an input name that is not UTF-8 is listed as its bytes
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({e}); pass --overwrite to start over") from None
    if rows and not {"image", "name", "labels"} <= set(rows[0]):
        raise DataError(f"{path}: not a unetkit counts.csv; pass --overwrite to start over")
    return rows


def label_preview(instances: np.ndarray) -> np.ndarray:
    """RGB uint8 picture of a label image: each object a colour, background black."""
    if instances.max(initial=0) == 0:
        return np.zeros((*instances.shape, 3), np.uint8)
    rgb = label2rgb(instances, bg_label=0, bg_color=(0, 0, 0))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _label_target(out: Path, name: str, instances: np.ndarray, options: OutputOptions):
    """(path, array) of the instance labels: uint16 PNG or uint32 TIFF (volumes: TIFF)."""
    many = int(instances.max(initial=0)) > UINT16_LABELS
    if options.label_format == "tif32" or many:
        if many and options.label_format == "auto":
            log.info(
                "%s: %d objects exceed uint16; labels written as 32-bit TIFF",
                name,
                int(instances.max()),
            )
        return out / f"{name}_instances.tif", instances.astype(np.uint32)
    suffix = "tif" if instances.ndim == 3 else "png"
    return out / f"{name}_instances.{suffix}", instances.astype(np.uint16)


def write_outputs(
    out: Path,
    name: str,
    image: np.ndarray,
    prediction: Any,
    options: OutputOptions,
    *,
    pixel_size: PixelSize | None = None,
    overlay_picture: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write one image's results (see the module docstring); return its counts.csv row.

    Args:
        out: output folder.
        name: unique output name (:func:`unique_names`).
        image: the float C×H×W (C×D×H×W) input, for intensities in the object table.
        prediction: a ``Prediction`` (probabilities, labels, instances).
        pixel_size: physical pixel size for µm columns and TIFF resolution tags.
        overlay_picture: RGB overlay to write as ``_overlay.png`` (None: none).
    """
    instances = prediction.instances
    volume = instances.ndim == 3
    mask = prediction.labels.astype(np.uint8)
    mask_path = out / f"{name}_mask.{'tif' if volume else 'png'}"
    write_image(mask_path, mask * 255 if mask.max(initial=0) <= 1 else mask)
    labels_path, labels = _label_target(out, name, instances, options)
    tiff_px = pixel_size if labels_path.suffix == ".tif" else None
    # volumes: the preview of the maximum projection along depth, as the overlay draws them
    preview = label_preview(instances.max(axis=0) if volume else instances)
    write_image(out / f"{name}_labels_preview.png", preview)
    if overlay_picture is not None:
        write_image(out / f"{name}_overlay.png", overlay_picture)
    if options.save_probabilities:
        probs = prediction.probabilities.astype(np.float32)
        write_image(out / f"{name}_probabilities.tif", probs, pixel_size=pixel_size)
    spacing = None
    if pixel_size is not None:
        spacing = (pixel_size.z or pixel_size.x, pixel_size.y, pixel_size.x)[-instances.ndim :]
    table = object_table(instances, image, pixel_size=spacing)
    write_object_table_csv(table, out / f"{name}_objects.csv")
    if volume and (options.geojson or options.imagej_rois):
        log.warning("%s: GeoJSON and ImageJ ROI exports are 2-D only; not written", name)
    if options.geojson and not volume:
        write_geojson(out / f"{name}.geojson", instances, table, object_type=options.object_type)
    if options.imagej_rois and not volume:
        write_roi_zip(out / f"{name}_RoiSet.zip", instances)
    # the label file last: its presence marks the image as finished for a resumed run
    write_image(labels_path, labels, pixel_size=tiff_px)
    return {
        "name": name,
        "objects": len(table),
        "foreground_fraction": float((prediction.labels > 0).mean()),
        "labels": labels_path.name,
        "pixel_size_um": "" if pixel_size is None else pixel_size.x,
    }
