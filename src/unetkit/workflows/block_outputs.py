"""What block-wise predict writes next to each OME-Zarr store, and what it refuses.

``unetkit predict`` takes the same output options on the block path as on the whole-image
path (``workflows.segment_outputs.OutputOptions``):

* the object table ``<stem>_objects.csv`` is always written: :func:`object_sums` runs on
  each block's final labels (on a worker) and :func:`object_table_rows` adds the blocks
  up, so the table equals ``object_table`` on the whole label image without holding it;
* ``save_probabilities``: a ``probabilities`` pyramid inside the store;
* ``geojson`` / ``imagej_rois``: ``<stem>.geojson`` / ``<stem>_RoiSet.zip``, traced from
  the whole label image, so only for images up to :data:`EXPORT_PIXELS` (refused before
  any work above it);
* ``label_format="tif32"`` is refused: the store's labels are uint32 already.

:func:`check_scale` refuses an image that the checkpoint's training scale would need
rescaled (the whole-image path resamples it; block-wise predict does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetkit.data.tiff import PixelSize
from unetkit.errors import ConfigError
from unetkit.formats import ome_zarr
from unetkit.formats.geojson import write_geojson
from unetkit.formats.imagej_roi import write_roi_zip
from unetkit.segmentation.postprocess import object_rows, write_object_table_csv
from unetkit.workflows.blocks import Block, Source
from unetkit.workflows.segment import RESCALE_TOLERANCE, InferenceOptions, scale_factor
from unetkit.workflows.segment_outputs import OutputOptions

__all__ = [
    "EXPORT_PIXELS",
    "check_outputs",
    "check_scale",
    "object_sums",
    "object_table_rows",
    "output_files",
    "write_tables",
]

#: largest image (pixels) whose GeoJSON / ImageJ ROI export is traced: 8192² (its uint32
#: labels, 256 MiB, are held in memory while the outlines are traced)
EXPORT_PIXELS = 8192 * 8192


def output_files(out_dir: Path, stem: str) -> dict[str, Path]:
    """The files written next to ``<stem>.zarr``: object table and the two exports."""
    return {
        "table": out_dir / f"{stem}_objects.csv",
        "geojson": out_dir / f"{stem}.geojson",
        "imagej_rois": out_dir / f"{stem}_RoiSet.zip",
    }


def check_outputs(outputs: OutputOptions, path: Path, shape: tuple[int, int]) -> None:
    """ConfigError (one line) for output options block-wise predict cannot honour."""
    if outputs.label_format != "auto":
        raise ConfigError(
            f"--labels-format {outputs.label_format}: block-wise predict writes the labels "
            "as uint32 into the OME-Zarr (labels/instances); leave the flag out"
        )
    for flag, wanted in (("--geojson", outputs.geojson), ("--imagej-rois", outputs.imagej_rois)):
        if wanted and shape[0] * shape[1] > EXPORT_PIXELS:
            raise ConfigError(
                f"{path}: {flag} traces the whole label image in memory, and this image is "
                f"{shape[0]}×{shape[1]} pixels (more than {EXPORT_PIXELS:,}); leave {flag} out "
                "(labels/instances and the object table hold every object)"
            )


def input_pixel_size(source: Source, options: InferenceOptions) -> PixelSize | None:
    """µm per pixel of an input: ``--pixel-size`` when given, else what the file states."""
    if options.pixel_size is not None:
        return PixelSize(options.pixel_size, options.pixel_size)
    return source.pixel_size


def check_scale(
    meta: dict[str, Any], options: InferenceOptions, source: Source, level: int
) -> None:
    """ConfigError (one line) when the input is not at the checkpoint's training scale.

    ``predict_image`` zooms such an image whole; block-wise predict runs at the input's
    own scale, so it refuses, naming the flag or the file's pixel size and, for an
    OME-Zarr input, a ``--level`` at the training scale if the pyramid has one."""
    pixel_size = input_pixel_size(source, options)
    scale = scale_factor(meta, options, pixel_size)
    if abs(scale - 1.0) <= RESCALE_TOLERANCE:
        return
    if options.object_diameter is not None:
        what = f"--object-diameter {options.object_diameter:g}"
        target = f"objects of {meta['object_diameter']:g} px"
    else:
        size = pixel_size.x if pixel_size is not None else float("nan")
        what = f"--pixel-size {size:g}" if options.pixel_size is not None else f"{size:g} µm/pixel"
        target = f"{meta['pixel_size']:g} µm/pixel"
    hint = f"resample the image to {target} first"
    better = _level_at_scale(source, level, scale)
    if better is not None:
        hint = f"use --level {better}, which is at that scale"
    raise ConfigError(
        f"{source.path}: {what} needs rescaling by {scale:.3g} to the checkpoint's training "
        f"scale ({target}), which block-wise predict does not do; {hint}"
    )


def _level_at_scale(source: Source, level: int, scale: float) -> int | None:
    """The OME-Zarr level (halving per level) that would need no rescaling, if it exists."""
    if not ome_zarr.is_zarr(source.path) or scale >= 1:
        return None
    steps = -math.log2(scale)
    wanted = level + round(steps)
    close = abs(2.0 ** (steps - round(steps)) - 1.0) <= RESCALE_TOLERANCE
    levels = len(ome_zarr.open_ngff(source.path).arrays)
    return wanted if close and wanted < levels else None


# --- the object table, block by block ----------------------------------------------------
def object_sums(final: np.ndarray, image: np.ndarray, block: Block) -> dict[str, np.ndarray]:
    """Per object id in a block: pixel count, sums of its (image) row and column
    coordinates, and sums of each channel of the float ``C×h×w`` image under it."""
    ids, inverse = np.unique(final, return_inverse=True)
    inverse = inverse.ravel()
    rows, cols = np.indices(final.shape)
    return {
        "ids": ids.astype(np.int64),
        "area": np.bincount(inverse, minlength=len(ids)),
        "sum_y": np.bincount(inverse, weights=(rows + block.y0).ravel(), minlength=len(ids)),
        "sum_x": np.bincount(inverse, weights=(cols + block.x0).ravel(), minlength=len(ids)),
        "sum_i": np.stack(
            [np.bincount(inverse, weights=c.ravel(), minlength=len(ids)) for c in image]
        ),
    }


def object_table_rows(
    parts: Sequence[dict[str, np.ndarray]],
    count: int,
    pixel_size: PixelSize | None,
) -> list[dict[str, float | int]]:
    """``object_table(labels, image, pixel_size=...)`` rows of the whole image, from the
    :func:`object_sums` of its blocks; ``count``: the largest object id."""
    channels = parts[0]["sum_i"].shape[0] if parts else 1
    area = np.zeros(count + 1, np.int64)
    sums = np.zeros((2 + channels, count + 1))
    for part in parts:  # ids are unique within a part: fancy-index adds are exact
        ids = part["ids"]
        area[ids] += part["area"]
        sums[0, ids] += part["sum_y"]
        sums[1, ids] += part["sum_x"]
        sums[2:, ids] += part["sum_i"]
    keep = np.flatnonzero(area[1:]) + 1
    means = sums[:, keep] / area[keep]
    columns = {"centroid_y": means[0], "centroid_x": means[1]}
    columns.update({f"mean_intensity_{c}": means[2 + c] for c in range(channels)})
    spacing = None if pixel_size is None else (pixel_size.y, pixel_size.x)
    return object_rows(keep, area[keep], columns, pixel_size=spacing)


def write_tables(
    store: Path,
    files: dict[str, Path],
    rows: list[dict[str, float | int]],
    outputs: OutputOptions,
) -> None:
    """The object table, and the exports asked for (traced from the store's labels)."""
    write_object_table_csv(rows, files["table"])
    if not (outputs.geojson or outputs.imagej_rois):
        return
    instances = np.asarray(ome_zarr.open_prediction(store)["instances"][0][:])
    if outputs.geojson:
        write_geojson(files["geojson"], instances, rows, object_type=outputs.object_type)
    if outputs.imagej_rois:
        write_roi_zip(files["imagej_rois"], instances)
