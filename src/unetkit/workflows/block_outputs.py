"""What block-wise predict writes next to each OME-Zarr store, and what it refuses.

``unetkit predict`` takes the same output options on the block path as on the whole-image
path (``workflows.segment_outputs.OutputOptions``):

* the object table ``<stem>_objects.csv`` is always written: :func:`object_sums` runs on
  each block's labels (on a worker) and :class:`ObjectTable` adds the blocks up and hands
  rows on as they complete, so the table equals ``object_table`` on the whole label image
  without holding it (nor the whole table);
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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unetkit._atomic import atomic_path
from unetkit.data.tiff import PixelSize
from unetkit.errors import ConfigError
from unetkit.formats import ome_zarr
from unetkit.formats.geojson import write_geojson
from unetkit.formats.imagej_roi import write_roi_zip
from unetkit.segmentation.postprocess import object_columns
from unetkit.workflows.block_sources import Source
from unetkit.workflows.blocks import Block
from unetkit.workflows.segment import RESCALE_TOLERANCE, InferenceOptions, scale_factor
from unetkit.workflows.segment_outputs import OutputOptions

__all__ = [
    "EXPORT_PIXELS",
    "ObjectTable",
    "check_outputs",
    "check_scale",
    "input_pixel_size",
    "object_sums",
    "output_files",
    "write_columns_csv",
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
def object_sums(
    local: np.ndarray, lut: np.ndarray, image: np.ndarray, block: Block
) -> dict[str, np.ndarray]:
    """Per local label of a block (ids 0..n, ``lut`` maps them to final ids): pixel
    count, sums of the image row and column coordinates, and sums of each channel of the
    float ``C×h×w`` image under it. Bin counts only: local ids are already 0..n."""
    flat, n = local.ravel(), len(lut)
    h, w = local.shape
    rows = np.repeat(np.arange(block.y0, block.y0 + h, dtype=np.float64), w)
    cols = np.tile(np.arange(block.x0, block.x0 + w, dtype=np.float64), h)
    return {
        "ids": lut.astype(np.int64),
        "area": np.bincount(flat, minlength=n),
        "sum_y": np.bincount(flat, weights=rows, minlength=n),
        "sum_x": np.bincount(flat, weights=cols, minlength=n),
        "sum_i": np.stack([np.bincount(flat, weights=c.ravel(), minlength=n) for c in image]),
    }


class ObjectTable:
    """The object table of a whole image, added up from its blocks' :func:`object_sums`
    in the blocks' order and handed on in rows as soon as no later block adds to them:
    it holds the rows from the lowest object still open (one crossing into a later
    block) on, about a row of blocks' objects, never the whole table.

    Args:
        channels: image channels (one ``mean_intensity_<c>`` column each).
        pixel_size: µm per pixel, for the µm columns (None: none).

    Example:
        >>> table = ObjectTable(1, None)
        >>> rows = table.add(object_sums(local, lut, image, block), 0)  # doctest: +SKIP
    """

    def __init__(self, channels: int, pixel_size: PixelSize | None) -> None:
        self.spacing = None if pixel_size is None else (pixel_size.y, pixel_size.x)
        self.base = 1  # the final id of the first row held
        self.count = 0  # the largest final id added
        self.area = np.zeros(0, np.int64)
        self.sums = np.zeros((2 + channels, 0))

    def add(self, part: dict[str, np.ndarray] | None, open_id: int) -> dict[str, np.ndarray]:
        """Add one block's sums (ids may repeat: one object entering a block twice) and
        return the rows now complete: ``object_table``'s columns for the objects with ids
        below ``open_id`` (all, when it is 0), the ones that have pixels.

        Args:
            part: a block's :func:`object_sums` (None: nothing to add).
            open_id: the smallest final id a later block still adds to (0: none).
        """
        if part is not None:
            ids = np.asarray(part["ids"])
            nonzero = ids > 0  # 0: background and dropped objects
            index = ids[nonzero] - self.base
            if index.size and index.min() < 0:
                raise ValueError(f"object ids {ids[nonzero].min()}..: rows already handed on")
            self._reserve(int(index.max(initial=-1)) + 1)
            self.count = max(self.count, int(ids.max(initial=0)))
            np.add.at(self.area, index, part["area"][nonzero])
            for row, values in enumerate((part["sum_y"], part["sum_x"], *part["sum_i"])):
                np.add.at(self.sums[row], index, values[nonzero])
        done = self.count + 1 - self.base if open_id == 0 else open_id - self.base
        return self._hand_on(max(done, 0))

    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` rows from ``base`` (doubling, so that growing stays linear)."""
        if rows > self.area.size:
            size = max(rows, 2 * self.area.size)
            self.area = np.pad(self.area, (0, size - self.area.size))
            self.sums = np.pad(self.sums, ((0, 0), (0, size - self.sums.shape[1])))

    def _hand_on(self, n: int) -> dict[str, np.ndarray]:
        """``object_table``'s columns of the first ``n`` rows held, which are then let go."""
        area, sums = self.area[:n], self.sums[:, :n]
        keep = np.flatnonzero(area)
        means = sums[:, keep] / area[keep]
        values = {"centroid_y": means[0], "centroid_x": means[1]}
        values.update({f"mean_intensity_{c}": m for c, m in enumerate(means[2:])})
        columns = object_columns(keep + self.base, area[keep], values, pixel_size=self.spacing)
        self.area, self.sums = self.area[n:].copy(), self.sums[:, n:].copy()
        self.base += n
        return columns


def write_columns_csv(
    path: Path, parts: Iterable[dict[str, np.ndarray]], rows: int = 65536
) -> None:
    """A table as ``write_object_table_csv`` writes it (ints as ints, floats as Python
    prints them), atomically, from its parts (the same columns each, the first gives the
    header), ``rows`` lines at a time: millions of objects stay fast and small."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        for k, columns in enumerate(parts):
            if k == 0:
                f.write(",".join(columns) + "\n")
            n = len(next(iter(columns.values()))) if columns else 0
            for start in range(0, n, rows):
                lines = [
                    map(str, col[start : start + rows].tolist())  # str(float) == repr(float)
                    for col in columns.values()
                ]
                f.writelines(",".join(line) + "\n" for line in zip(*lines, strict=True))


def write_tables(
    store: Path,
    files: dict[str, Path],
    parts: Iterable[dict[str, np.ndarray]],
    outputs: OutputOptions,
) -> None:
    """The object table from its parts (e.g. :meth:`ObjectTable.add`'s), and the exports
    asked for (traced from the store's labels; they keep the whole table, and only
    images up to :data:`EXPORT_PIXELS` are traced)."""
    exports = outputs.geojson or outputs.imagej_rois
    kept: list[dict[str, np.ndarray]] = []

    def written() -> Iterator[dict[str, np.ndarray]]:
        for part in parts:
            if exports:
                kept.append(part)
            yield part

    write_columns_csv(files["table"], written())
    if not exports:
        return
    instances = np.asarray(ome_zarr.open_prediction(store)["instances"][0][:])
    if outputs.geojson:
        columns = {name: np.concatenate([p[name] for p in kept]) for name in kept[0]}
        names, values = list(columns), zip(*columns.values(), strict=True)
        rows = [dict(zip(names, row, strict=True)) for row in values]
        write_geojson(files["geojson"], instances, rows, object_type=outputs.object_type)
    if outputs.imagej_rois:
        write_roi_zip(files["imagej_rois"], instances)
