"""Huge images and many images: block-wise prediction on Dask workers (``distributed``).

An image (OME-Zarr, TIFF read through its tiles, or any image file) is cut into blocks of
``block_size``². Each block is one task: its worker reads the block plus a halo (the tiles
of the model's sliding window / overlap-tile grid that touch it, and ``label_halo`` pixels
for the watershed), runs the model, and writes its part of an OME-Zarr prediction. The
probabilities of a block are computed from the *same global tile grid*, in the same order
and with the same weights as the single-process engine (``inference.tiling``), so the
stitched class mask equals ``workflows.segment.predict_image`` exactly. Instances are
labelled per block and stitched across borders (``segmentation.stitching``); a second pass
writes the final ids and sums each block's objects for the object table
(``workflows.block_outputs``), a third builds the pyramids.

Resumable: each finished block leaves a marker in ``<out>.zarr/.unetkit/``; a rerun skips
them. Many images share one client: all their blocks go to the same workers.

Example:
    >>> from unetkit.workflows.dask_cluster import dask_client
    >>> with dask_client("local:2") as client:  # doctest: +SKIP
    ...     predict_blocks("best.safetensors", ["cells.ome.zarr"], "out", client=client)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit._atomic import atomic_write_bytes, atomic_write_text
from unetkit.data.io import list_images
from unetkit.data.transforms import DEFAULT_PERCENTILES
from unetkit.errors import ConfigError, DataError
from unetkit.formats import ome_zarr
from unetkit.inference import TileOptions
from unetkit.inference.backends import load_inference_model, options_for
from unetkit.segmentation.stitching import face_pairs, overlap_pairs, stream_luts
from unetkit.workflows import block_outputs
from unetkit.workflows.block_sources import normalization_stats, open_source
from unetkit.workflows.block_tasks import (
    MARKERS,
    Job,
    finish_block,
    lut_file,
    marker,
    predict_block,
    pyramid_chunk,
    scratch,
)
from unetkit.workflows.blocks import Block, BlockOptions, block_grid, tile_plan
from unetkit.workflows.dask_cluster import Progress, run_tasks
from unetkit.workflows.segment import InferenceOptions, min_object_size
from unetkit.workflows.segment_files import trained_channels
from unetkit.workflows.segment_outputs import OutputOptions

__all__ = ["BlockOptions", "block_inputs", "predict_blocks"]


def block_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Inputs for block-wise predict: OME-Zarr groups and image files as given, folders
    expanded to the OME-Zarr groups and images inside them."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if ome_zarr.is_zarr(p) or p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(q for q in p.iterdir() if ome_zarr.is_zarr(q)) + list_images(p)
            if not found:
                raise DataError(f"{p}: folder has no OME-Zarr images or image files")
            files += found
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _stitch(job: Job, grid: list[Block], boundary: bool, min_size: int) -> np.ndarray:
    """Per block, the look-up table local id -> final id, from the pass-1 markers, written
    next to them for pass 2 (:func:`stitching.stream_luts`: one block's labels in memory at
    a time, plus the labels on block borders). Returns the final ids of the objects that
    span blocks (ascending), for the object table."""
    counts = []
    for b in grid:
        with np.load(marker(job, "block", b)) as part:  # reads this one member only
            counts.append(int(part["count"]))

    def areas(i: int) -> np.ndarray:
        with np.load(marker(job, "block", grid[i])) as part:
            found = part["areas"]
        return np.pad(found, (0, max(0, counts[i] + 1 - len(found))))

    links = list(_links(job, grid, boundary))
    spanning = [np.zeros(0, np.uint32)]
    merged = stream_luts(counts, areas, links, min_size=min_size)
    for b, (lut, starting) in zip(grid, merged, strict=True):
        buf = io.BytesIO()
        np.save(buf, lut)
        atomic_write_bytes(lut_file(job, b), buf.getvalue())
        spanning.append(starting)
    return np.concatenate(spanning)


def _links(job: Job, grid: list[Block], boundary: bool) -> Iterator[tuple[int, int, np.ndarray]]:
    """(block i, its neighbour j below or right, pairs of their local ids that are one
    object), reading two blocks' border data at a time."""
    index = {(b.row, b.col): i for i, b in enumerate(grid)}
    for i, b in enumerate(grid):
        for j, first, second in (
            (index.get((b.row + 1, b.col)), "bottom", "top"),
            (index.get((b.row, b.col + 1)), "right", "left"),
        ):
            if j is None:
                continue
            with (
                np.load(marker(job, "block", b)) as mine,
                np.load(marker(job, "block", grid[j])) as theirs,
            ):
                if boundary:
                    pairs = overlap_pairs(mine[f"strip_{first}"], theirs[f"strip_{second}"])
                else:
                    pairs = face_pairs(
                        mine[f"edge_{first}"],
                        theirs[f"edge_{second}"],
                        mine[f"class_{first}"],
                        theirs[f"class_{second}"],
                    )
            yield i, j, pairs


def _check_stems(files: list[Path]) -> None:
    """DataError when two inputs would write the same ``<stem>.zarr``."""
    seen: dict[str, Path] = {}
    for f in files:
        other = seen.setdefault(_stem(f).lower(), f)
        if other != f:
            raise DataError(
                f"{other} and {f}: both would write {_stem(f)}.zarr; rename one or predict "
                "them into separate --out folders"
            )


def _prepare(
    checkpoint: str,
    path: Path,
    out_dir: Path,
    options: InferenceOptions,
    blocks: BlockOptions,
    outputs: OutputOptions,
    model: torch.nn.Module,
    meta: dict[str, Any],
) -> Job:
    """Check one input, create its output store and the job the workers get (absolute
    paths: a remote worker's working folder is not ours)."""
    path, out = path.resolve(), (out_dir / f"{_stem(path)}.zarr").resolve()
    files = block_outputs.output_files(out.parent, out.name[: -len(".zarr")])
    if path in (out, *files.values()):
        raise DataError(f"{path}: an output would overwrite this input; choose another --out")
    source = open_source(str(path), blocks.level, options.channels)
    _check_channels(source, model)
    block_outputs.check_scale(meta, options, source, blocks.level)
    block_outputs.check_outputs(outputs, path, source.shape)
    plan = tile_plan(model, source.shape, options, blocks.block_size)
    halo = plan.halo + (blocks.label_halo if meta.get("target") == "boundary" else 0)
    if blocks.block_size < halo:
        raise ConfigError(
            f"--block-size {blocks.block_size} is smaller than the halo of {halo} px "
            f"(tile {plan.window[1][0]} + label halo); use --block-size {halo} or more"
        )
    if outputs.overwrite and (out / MARKERS).is_dir():  # a store of ours: start afresh
        shutil.rmtree(out)
    settings = dataclasses.replace(outputs, overwrite=False)
    _check_resume(out, [str(Path(checkpoint).resolve()), str(path), options, blocks, settings])
    done = (out / MARKERS / "complete.json").is_file()
    mode = meta.get("normalize", "zscore")
    percentiles = tuple(meta.get("normalize_percentiles", DEFAULT_PERCENTILES))
    stats = None if done else normalization_stats(source, mode, blocks.block_size, percentiles)
    job = Job(
        str(Path(checkpoint).resolve()),
        str(path),
        str(out),
        source.shape,
        options,
        blocks,
        stats,
        outputs.save_probabilities,
        int(getattr(model, "out_channels", 2)),
    )
    scale, units = source.scale, source.units
    size = block_outputs.input_pixel_size(source, options)
    if size is not None and (options.pixel_size is not None or not units):
        # the user's pixel size wins, as on the whole path; a TIFF's goes into the store
        scale, units = (size.y, size.x), dict.fromkeys("yx", "micrometer")
    ome_zarr.create_prediction(
        out,
        source.shape,
        chunk=blocks.block_size,
        scale=scale,
        translation=source.translation,
        units=units,
        num_classes=job.num_classes,
        probabilities=outputs.save_probabilities,
    )
    if not done:
        scratch(job, "a")  # here, once: tasks creating it at once would race
    return job


def _check_tiles(tiles: TileOptions) -> None:
    """ConfigError (one line) for tile options the block grid does not reproduce."""
    default = TileOptions()
    changed = [
        f"{name}={getattr(tiles, name)!r}"
        for name in ("blend", "sigma_scale", "pad_mode")
        if getattr(tiles, name) != getattr(default, name)
    ]
    if changed:
        raise ConfigError(
            f"TileOptions({', '.join(changed)}): block-wise predict blends tiles with the "
            "default Gaussian and mirrors the image at its border; leave these at their defaults"
        )


def _check_channels(source: Any, model: torch.nn.Module) -> None:
    """DataError naming the file when its (picked) channels are not the model's."""
    found = source.pixels(slice(0, 1), slice(0, 1)).shape[0]
    expected = getattr(model, "in_channels", None)
    if expected is not None and found != expected:
        raise DataError(
            f"{source.path}: image has {found} channel(s), the model takes {expected}; "
            "pick and order channels with --channels (e.g. --channels 0 or 1,0)"
        )


def _check_resume(out: Path, settings: list[Any]) -> None:
    """Record what an output store is made with; refuse to resume it with anything else."""
    record = out / MARKERS / "settings.json"
    text = json.dumps([repr(s) for s in settings])
    if record.is_file():
        if record.read_text() != text:
            raise DataError(
                f"{out}: holds a run with another checkpoint, input or options; "
                "choose another --out (or delete it) to start afresh"
            )
        return
    atomic_write_text(record, text)


def predict_blocks(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    options: InferenceOptions | None = None,
    blocks: BlockOptions | None = None,
    *,
    outputs: OutputOptions | None = None,
    client: Any = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Segment huge images and many images block by block, on Dask workers or here.

    Writes ``<out_dir>/<stem>.zarr`` per image (OME-Zarr 0.5): class mask, instance labels
    (``labels/instances``, uint32) and optionally probabilities, each a pyramid with the
    input's physical scale; and ``<stem>_objects.csv`` (the object table of
    ``predict``), plus the exports ``outputs`` asks for (see ``workflows.block_outputs``).
    The mask equals ``predict_image`` on the whole image with the same options
    (``tile=None`` here means the engine's default tile for large images). Channels are
    picked as ``predict`` picks them (``options.channels``, else the checkpoint's); an
    input off the checkpoint's training scale is refused, not rescaled.

    Args:
        checkpoint: a ``.safetensors`` checkpoint (each worker loads it once).
        inputs: OME-Zarr images, TIFFs, image files or folders of them.
        out_dir: output folder (created).
        options: the inference options of ``workflows.segment`` (default: its defaults).
        blocks: block size, label halo and OME-Zarr level (default: ``BlockOptions()``).
        outputs: ``predict``'s output options (default: ``OutputOptions()``);
            ``overwrite`` restarts a store an earlier run left instead of resuming it.
        client: a ``distributed.Client`` (see :func:`dask_client`); None runs here.
        progress: called as ``progress(stage, done, total)``.

    Returns:
        one row per image: ``image``, ``output``, ``objects``, ``blocks``.
    """
    model, meta = load_inference_model(checkpoint)
    if meta.get("task") == "regression" or getattr(model, "dims", 2) != 2:
        raise ConfigError(
            f"{checkpoint}: block-wise predict segments 2D images (a 2D segmentation checkpoint)"
        )
    options = options_for(model, options or InferenceOptions())
    _check_tiles(options.tiles)
    if options.channels is None:  # as predict does: the channels the model was trained on
        options = dataclasses.replace(options, channels=trained_channels(meta))
    blocks, outputs = blocks or BlockOptions(), outputs or OutputOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = block_inputs(inputs)
    _check_stems(files)
    jobs = [_prepare(str(checkpoint), f, out, options, blocks, outputs, model, meta) for f in files]
    todo = [j for j in jobs if not (Path(j.out) / MARKERS / "complete.json").is_file()]
    grids = {j.out: block_grid(j.shape, blocks.block_size) for j in todo}
    run_tasks(
        client, predict_block, [(j, b) for j in todo for b in grids[j.out]], "predict", progress
    )
    boundary = meta.get("target", "semantic") == "boundary"
    spanning = {
        j.out: _stitch(j, grids[j.out], boundary, min_object_size(meta, 2, options.min_size))
        for j in todo
    }
    finals = [(j, b, boundary) for j in todo for b in grids[j.out]]
    run_tasks(client, finish_block, finals, "stitch", progress)
    _pyramids(todo, client, progress)
    for j in todo:
        count = _write_tables(j, grids[j.out], spanning[j.out], outputs)
        summary = {"objects": count, "blocks": len(grids[j.out])}
        atomic_write_text(Path(j.out) / MARKERS / "complete.json", json.dumps(summary))
        # the local labels go only once the image is complete: a resumed run needs them
        shutil.rmtree(Path(j.out) / MARKERS / "local", ignore_errors=True)
        for b in grids[j.out]:
            lut_file(j, b).unlink(missing_ok=True)
    rows = []
    for j in jobs:
        summary = json.loads((Path(j.out) / MARKERS / "complete.json").read_text())
        rows.append({"image": j.source, "output": j.out, **summary})
    return rows


def _pyramids(todo: list[Job], client: Any, progress: Progress | None) -> None:
    """Pass 3: the coarser levels of every array, level by level, one task per chunk."""
    depth = {j.out: len(ome_zarr.open_prediction(j.out)["mask"]) for j in todo}
    for level in range(1, max(depth.values(), default=1)):
        tasks = [
            (j.out, key, level, row, col)
            for j in todo
            if level < depth[j.out]
            for key, levels in ome_zarr.open_prediction(j.out).items()
            for row, col in ome_zarr.pyramid_chunks(levels[level])
        ]
        run_tasks(client, pyramid_chunk, tasks, f"pyramid level {level}", progress)


def _write_tables(job: Job, grid: list[Block], spanning: np.ndarray, outputs: OutputOptions) -> int:
    """The object table and the exports of one image, from the blocks' pass-2 sums in two
    passes (the objects that span blocks summed first, then the rows block by block);
    returns its number of objects."""
    source = open_source(job.source, job.blocks.level, job.options.channels)
    channels = source.pixels(slice(0, 1), slice(0, 1)).shape[0]
    size = block_outputs.input_pixel_size(source, job.options)
    table = block_outputs.ObjectTable(channels, spanning, size)
    for b in grid:
        with np.load(marker(job, "final", b)) as part:
            table.add_spanning(dict(part))

    def rows() -> Iterator[dict[str, np.ndarray]]:
        for b in grid:
            with np.load(marker(job, "final", b)) as part:
                yield table.rows(dict(part))

    out = Path(job.out)
    files = block_outputs.output_files(out.parent, out.name[: -len(".zarr")])
    block_outputs.write_tables(out, files, rows(), outputs)
    return table.count
