"""What block-wise predict writes next to each OME-Zarr store, and what it refuses.

``unetkit predict`` takes the same output options on the block path as on the whole-image
path (``workflows.segment_outputs.OutputOptions``):

* the object table ``<stem>_objects.csv`` is always written: :func:`object_sums` runs on
  each block's labels (on a worker) and :class:`ObjectTable` adds the blocks up in two
  passes, so the table equals ``object_table`` on the whole label image without holding
  it (nor the whole table);
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
    """The object table of a whole image from its blocks' :func:`object_sums`, in two
    passes over the blocks in order: :meth:`add_spanning` sums the objects that span
    blocks, then :meth:`rows` gives each block's new rows (final ids follow the blocks'
    order). It holds the spanning objects and one block's rows, never the whole table.

    Args:
        channels: image channels (one ``mean_intensity_<c>`` column each).
        spanning: the final ids of the objects that span blocks, ascending.
        pixel_size: µm per pixel, for the µm columns (None: none).

    Example:
        >>> table = ObjectTable(1, spanning, None)  # doctest: +SKIP
        >>> for part in parts:  # the blocks' object_sums, in order  # doctest: +SKIP
        ...     table.add_spanning(part)
        >>> columns = [table.rows(part) for part in parts]  # doctest: +SKIP
    """

    def __init__(self, channels: int, spanning: np.ndarray, pixel_size: PixelSize | None) -> None:
        self.spanning = np.asarray(spanning, np.int64)
        self.spacing = None if pixel_size is None else (pixel_size.y, pixel_size.x)
        self.count = 0  # the largest final id handed on
        self.area = np.zeros(len(self.spanning), np.int64)
        self.sums = np.zeros((2 + channels, len(self.spanning)))

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where ``ids`` are in ``spanning``, and which of them are there."""
        at = np.searchsorted(self.spanning, ids)
        hit = at < len(self.spanning)
        hit[hit] = self.spanning[at[hit]] == ids[hit]
        return at, hit

    def add_spanning(self, part: dict[str, np.ndarray]) -> None:
        """Pass 1: add a block's sums of the spanning objects (in the blocks' order: the
        sums are those of one pass over every block)."""
        at, hit = self._find(np.asarray(part["ids"]))
        np.add.at(self.area, at[hit], part["area"][hit])
        for row, values in enumerate((part["sum_y"], part["sum_x"], *part["sum_i"])):
            np.add.at(self.sums[row], at[hit], values[hit])

    def rows(self, part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pass 2: ``object_table``'s columns for the objects whose first pixels are in
        this block (ids above those of earlier blocks), the ones that have pixels."""
        ids = np.asarray(part["ids"])
        top = max(self.count, int(ids.max(initial=0)))
        base, n = self.count + 1, top - self.count
        area, sums = np.zeros(n, np.int64), np.zeros((self.sums.shape[0], n))
        at, hit = self._find(ids)
        alone = (ids >= base) & ~hit  # an object of this block only: one local label
        area[ids[alone] - base] = part["area"][alone]
        for row, values in enumerate((part["sum_y"], part["sum_x"], *part["sum_i"])):
            sums[row, ids[alone] - base] = values[alone]
        lo, hi = np.searchsorted(self.spanning, [base, top + 1])
        area[self.spanning[lo:hi] - base] = self.area[lo:hi]
        sums[:, self.spanning[lo:hi] - base] = self.sums[:, lo:hi]
        self.count = top
        keep = np.flatnonzero(area)
        means = sums[:, keep] / area[keep]
        values = {"centroid_y": means[0], "centroid_x": means[1]}
        values.update({f"mean_intensity_{c}": m for c, m in enumerate(means[2:])})
        return object_columns(keep + base, area[keep], values, pixel_size=self.spacing)


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
    """The object table from its parts (e.g. from :meth:`ObjectTable.rows`), and the exports
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
