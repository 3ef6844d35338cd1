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

import contextlib
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit._atomic import atomic_write_bytes, atomic_write_text
from unetkit.data.io import list_images
from unetkit.data.transforms import DEFAULT_PERCENTILES
from unetkit.errors import ConfigError, DataError
from unetkit.formats import ome_zarr
from unetkit.inference.backends import load_inference_model, options_for
from unetkit.segmentation.postprocess import instances_from_boundary
from unetkit.segmentation.stitching import (
    core_labels,
    face_pairs,
    label_classes,
    merge_labels,
    overlap_pairs,
)
from unetkit.workflows import block_outputs
from unetkit.workflows.blocks import (
    Block,
    BlockOptions,
    block_grid,
    face_strips,
    normalization_stats,
    open_source,
    region_probabilities,
    tile_plan,
)
from unetkit.workflows.dask_cluster import Progress, run_tasks
from unetkit.workflows.segment import InferenceOptions, min_object_size
from unetkit.workflows.segment_files import trained_channels
from unetkit.workflows.segment_outputs import OutputOptions

__all__ = ["BlockOptions", "block_inputs", "predict_blocks"]

_MARKERS = ".unetkit"


@dataclasses.dataclass(frozen=True)
class _Job:
    """Everything a worker needs for one image (small, picklable)."""

    checkpoint: str
    source: str
    out: str
    shape: tuple[int, int]
    options: InferenceOptions
    blocks: BlockOptions
    stats: tuple[np.ndarray, np.ndarray] | None
    probabilities: bool
    num_classes: int


# --- worker side -------------------------------------------------------------------------
def _worker_model(checkpoint: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The checkpoint's model, loaded once per worker process and file version (a worker
    of a long-lived cluster sees a checkpoint rewritten at the same path as new)."""
    stat = os.stat(checkpoint)
    return _load_model(checkpoint, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _load_model(checkpoint: str, mtime_ns: int, size: int) -> tuple[torch.nn.Module, dict]:
    """Loaded once per worker process (and checkpoint version), reused by every block.

    A worker process runs torch on one thread: Dask runs ``nthreads`` blocks at once per
    worker (its own parallelism, as its nanny's ``OMP_NUM_THREADS=1`` says), and blocks
    that each spread over every core would fight for them (``local:1`` and ``local:2``
    then run the same per-worker setting). Threads of this process (``processes=False``)
    keep the process's setting. Reductions (e.g. GroupNorm) round differently with
    another thread count, so bit-for-bit equality with a single-process run holds at the
    same torch thread count."""
    if multiprocessing.parent_process() is not None:
        with contextlib.suppress(ImportError, ValueError):
            from distributed import get_worker

            get_worker()  # raises ValueError outside a Dask worker
            torch.set_num_threads(1)
    return load_inference_model(checkpoint)


def _marker(job: _Job, kind: str, block: Block) -> Path:
    return Path(job.out) / _MARKERS / f"{kind}_{block.row}_{block.col}.npz"


def _predict_block(job: _Job, block: Block) -> str:
    """Pass 1: probabilities, class mask, local instance labels and border data of a block."""
    marker = _marker(job, "block", block)
    if marker.is_file():
        return str(marker)  # resumed: done in an earlier run
    model, meta = _worker_model(job.checkpoint)
    options = options_for(model, job.options)
    source = open_source(job.source, job.blocks.level, job.options.channels)
    boundary = meta.get("target", "semantic") == "boundary"
    halo = job.blocks.label_halo if boundary else 0
    region = block.grown(halo, job.shape)
    plan = tile_plan(model, job.shape, options, job.blocks.block_size)
    probs = region_probabilities(model, source, plan, region, options, job.stats)
    core = block.within(region)
    arrays = ome_zarr.open_prediction(job.out)
    if boundary:
        raw = instances_from_boundary(
            probs, interior_threshold=meta.get("seed_threshold", 0.5), min_seed_size=5
        )
        classes = (raw > 0).astype(np.uint8)
    else:
        classes = (probs[0] > 0.5) if probs.shape[0] == 1 else probs.argmax(0)
        classes = classes.astype(np.uint8)
        raw = label_classes(classes)
    local, raw_to_local = core_labels(raw, core)
    arrays["mask"][0][block.slices] = classes[core]
    if job.probabilities:
        arrays["probabilities"][0][(slice(None), *block.slices)] = probs[(slice(None), *core)]
    _scratch(job, "r+")[block.slices] = local
    data = {"count": np.int64(local.max(initial=0)), "areas": np.bincount(local.ravel())}
    if boundary:
        data.update(face_strips(raw_to_local[raw], region, block, job.blocks.label_halo, job.shape))
    else:
        for side, index in _SIDES.items():
            data[f"edge_{side}"] = local[index]
            data[f"class_{side}"] = classes[core][index]
    buf = io.BytesIO()
    np.savez_compressed(buf, **data)
    atomic_write_bytes(marker, buf.getvalue())
    return str(marker)


_SIDES = {
    "top": (0, slice(None)),
    "bottom": (-1, slice(None)),
    "left": (slice(None), 0),
    "right": (slice(None), -1),
}


def _finish_block(job: _Job, block: Block, lut: np.ndarray, boundary: bool) -> str:
    """Pass 2: local ids -> final ids (and, for watershed targets, the mask of kept
    objects); the block's sums for the object table go into its marker."""
    marker = _marker(job, "final", block)
    if marker.is_file():
        return str(marker)
    arrays = ome_zarr.open_prediction(job.out)
    local = np.asarray(_scratch(job, "r")[block.slices])
    final = lut[local]
    arrays["instances"][0][block.slices] = final
    if boundary:  # predict_image: the mask of a watershed target is its kept objects
        arrays["mask"][0][block.slices] = (final > 0).astype(np.uint8)
    image = open_source(job.source, job.blocks.level, job.options.channels).pixels(*block.slices)
    buf = io.BytesIO()
    np.savez(buf, **block_outputs.object_sums(local, lut, image, block))
    atomic_write_bytes(marker, buf.getvalue())
    return str(marker)


def _pyramid_chunk(out: str, key: str, level: int, row: int, col: int) -> None:
    """Pass 3: one chunk of a pyramid level (each chunk written by one task)."""
    levels = ome_zarr.open_prediction(out)[key]
    ome_zarr.downsample_chunk(levels[level - 1], levels[level], row, col)


def _scratch(job: _Job, mode: str) -> Any:
    """The local labels of pass 1 (a Zarr array chunked like the blocks: no two tasks
    write one chunk). Created (mode "a") by the client before any task runs."""
    import zarr

    size = job.blocks.block_size
    return zarr.open_array(
        str(Path(job.out) / _MARKERS / "local"),
        mode=mode,
        shape=job.shape,
        chunks=(size, size),
        dtype="uint32",
        fill_value=0,
        zarr_format=3,
    )


# --- client side -------------------------------------------------------------------------
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


def _stitch(job: _Job, grid: list[Block], boundary: bool, min_size: int) -> list[np.ndarray]:
    """Per block, the look-up table local id -> final id, from the pass-1 markers."""
    data = [dict(np.load(_marker(job, "block", b))) for b in grid]
    index = {(b.row, b.col): i for i, b in enumerate(grid)}
    links = []
    for i, b in enumerate(grid):
        for j, first, second in (
            (index.get((b.row + 1, b.col)), "bottom", "top"),
            (index.get((b.row, b.col + 1)), "right", "left"),
        ):
            if j is None:
                continue
            if boundary:
                pairs = overlap_pairs(data[i][f"strip_{first}"], data[j][f"strip_{second}"])
            else:
                pairs = face_pairs(
                    data[i][f"edge_{first}"],
                    data[j][f"edge_{second}"],
                    data[i][f"class_{first}"],
                    data[j][f"class_{second}"],
                )
            links.append((i, j, pairs))
    counts = [int(d["count"]) for d in data]
    areas = [
        np.pad(d["areas"], (0, max(0, c + 1 - len(d["areas"]))))
        for d, c in zip(data, counts, strict=True)
    ]
    return merge_labels(counts, areas, links, min_size=min_size)


def _prepare(
    checkpoint: str,
    path: Path,
    out_dir: Path,
    options: InferenceOptions,
    blocks: BlockOptions,
    outputs: OutputOptions,
    model: torch.nn.Module,
    meta: dict[str, Any],
) -> _Job:
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
    if outputs.overwrite and (out / _MARKERS).is_dir():  # a store of ours: start afresh
        shutil.rmtree(out)
    settings = dataclasses.replace(outputs, overwrite=False)
    _check_resume(out, [str(Path(checkpoint).resolve()), str(path), options, blocks, settings])
    done = (out / _MARKERS / "complete.json").is_file()
    mode = meta.get("normalize", "zscore")
    percentiles = tuple(meta.get("normalize_percentiles", DEFAULT_PERCENTILES))
    stats = None if done else normalization_stats(source, mode, blocks.block_size, percentiles)
    job = _Job(
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
    if options.pixel_size is not None:  # the user's pixel size wins, as on the whole path
        scale, units = (options.pixel_size,) * 2, dict.fromkeys("yx", "micrometer")
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
        _scratch(job, "a")  # here, once: tasks creating it at once would race
    return job


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
    record = out / _MARKERS / "settings.json"
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
    if options.channels is None:  # as predict does: the channels the model was trained on
        options = dataclasses.replace(options, channels=trained_channels(meta))
    blocks, outputs = blocks or BlockOptions(), outputs or OutputOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = block_inputs(inputs)
    jobs = [_prepare(str(checkpoint), f, out, options, blocks, outputs, model, meta) for f in files]
    todo = [j for j in jobs if not (Path(j.out) / _MARKERS / "complete.json").is_file()]
    grids = {j.out: block_grid(j.shape, blocks.block_size) for j in todo}
    run_tasks(
        client, _predict_block, [(j, b) for j in todo for b in grids[j.out]], "predict", progress
    )
    boundary = meta.get("target", "semantic") == "boundary"
    finals = []
    for j in todo:
        luts = _stitch(j, grids[j.out], boundary, min_object_size(meta, 2, options.min_size))
        finals += [(j, b, lut, boundary) for b, lut in zip(grids[j.out], luts, strict=True)]
    run_tasks(client, _finish_block, finals, "stitch", progress)
    _pyramids(todo, client, progress)
    for j in todo:
        count = max((int(lut.max(initial=0)) for jj, _, lut, _ in finals if jj is j), default=0)
        _write_tables(j, grids[j.out], count, outputs)
        summary = {"objects": count, "blocks": len(grids[j.out])}
        atomic_write_text(Path(j.out) / _MARKERS / "complete.json", json.dumps(summary))
        # the local labels go only once the image is complete: a resumed run needs them
        shutil.rmtree(Path(j.out) / _MARKERS / "local", ignore_errors=True)
    rows = []
    for j in jobs:
        summary = json.loads((Path(j.out) / _MARKERS / "complete.json").read_text())
        rows.append({"image": j.source, "output": j.out, **summary})
    return rows


def _pyramids(todo: list[_Job], client: Any, progress: Progress | None) -> None:
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
        run_tasks(client, _pyramid_chunk, tasks, f"pyramid level {level}", progress)


def _write_tables(job: _Job, grid: list[Block], count: int, outputs: OutputOptions) -> None:
    """The object table (from the blocks' pass-2 sums) and the exports of one image."""
    source = open_source(job.source, job.blocks.level, job.options.channels)
    channels = source.pixels(slice(0, 1), slice(0, 1)).shape[0]
    table = block_outputs.ObjectTable(count, channels)
    for b in grid:
        with np.load(_marker(job, "final", b)) as part:
            table.add(dict(part))
    columns = table.columns(block_outputs.input_pixel_size(source, job.options))
    out = Path(job.out)
    files = block_outputs.output_files(out.parent, out.name[: -len(".zarr")])
    block_outputs.write_tables(out, files, columns, outputs)
