"""The worker side of block-wise predict: one task per block and pass (``distributed``).

A :class:`Job` holds everything a worker needs for one image (small, picklable: the
checkpoint travels as a path, loaded once per worker process). Pass 1
(:func:`predict_block`): probabilities, class mask and local labels of a block plus its
border data; pass 2 (:func:`finish_block`): final ids (from the look-up table the
stitching left in :func:`lut_file`) and the block's object-table sums;
pass 3 (:func:`pyramid_chunk`): one chunk of a coarser level. Each block writes only its
own chunks (blocks are chunks), so no task needs a lock; each leaves a marker in
``<out>.zarr/.unetkit/`` that a resumed run skips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit._atomic import atomic_write_bytes
from unetkit.formats import ome_zarr
from unetkit.inference.backends import load_inference_model, options_for
from unetkit.segmentation.postprocess import instances_from_boundary
from unetkit.segmentation.stitching import core_labels, label_classes
from unetkit.workflows import block_outputs
from unetkit.workflows.block_sources import open_source
from unetkit.workflows.blocks import (
    Block,
    BlockOptions,
    face_strips,
    region_probabilities,
    tile_plan,
)
from unetkit.workflows.segment import InferenceOptions

__all__ = [
    "MARKERS",
    "SIDES",
    "Job",
    "finish_block",
    "lut_file",
    "marker",
    "predict_block",
    "pyramid_chunk",
    "scratch",
]

MARKERS = ".unetkit"


@dataclasses.dataclass(frozen=True)
class Job:
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


def marker(job: Job, kind: str, block: Block) -> Path:
    """Where a pass (``kind``: "block" or "final") leaves a block's results."""
    return Path(job.out) / MARKERS / f"{kind}_{block.row}_{block.col}.npz"


def lut_file(job: Job, block: Block) -> Path:
    """Where the stitching leaves a block's look-up table local id -> final id (``.npy``)
    for pass 2: tasks read their own, the client never sends every block's."""
    return Path(job.out) / MARKERS / f"lut_{block.row}_{block.col}.npy"


def predict_block(job: Job, block: Block) -> str:
    """Pass 1: probabilities, class mask, local instance labels and border data of a block."""
    done = marker(job, "block", block)
    if done.is_file():
        return str(done)  # resumed: done in an earlier run
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
    scratch(job, "r+")[block.slices] = local
    data = {"count": np.int64(local.max(initial=0)), "areas": np.bincount(local.ravel())}
    if boundary:
        data.update(face_strips(raw_to_local[raw], region, block, job.blocks.label_halo, job.shape))
    else:
        for side, index in SIDES.items():
            data[f"edge_{side}"] = local[index]
            data[f"class_{side}"] = classes[core][index]
    buf = io.BytesIO()
    np.savez_compressed(buf, **data)
    atomic_write_bytes(done, buf.getvalue())
    return str(done)


SIDES = {
    "top": (0, slice(None)),
    "bottom": (-1, slice(None)),
    "left": (slice(None), 0),
    "right": (slice(None), -1),
}


def finish_block(job: Job, block: Block, boundary: bool) -> str:
    """Pass 2: local ids -> final ids (the look-up table the stitching left next to the
    markers; and, for watershed targets, the mask of kept objects); the block's sums for
    the object table go into its marker."""
    done = marker(job, "final", block)
    if done.is_file():
        return str(done)
    lut = np.load(lut_file(job, block))
    arrays = ome_zarr.open_prediction(job.out)
    local = np.asarray(scratch(job, "r")[block.slices])
    final = lut[local]
    arrays["instances"][0][block.slices] = final
    if boundary:  # predict_image: the mask of a watershed target is its kept objects
        arrays["mask"][0][block.slices] = (final > 0).astype(np.uint8)
    image = open_source(job.source, job.blocks.level, job.options.channels).pixels(*block.slices)
    buf = io.BytesIO()
    np.savez(buf, **block_outputs.object_sums(local, lut, image, block))
    atomic_write_bytes(done, buf.getvalue())
    return str(done)


def pyramid_chunk(out: str, key: str, level: int, row: int, col: int) -> None:
    """Pass 3: one chunk of a pyramid level (each chunk written by one task)."""
    levels = ome_zarr.open_prediction(out)[key]
    ome_zarr.downsample_chunk(levels[level - 1], levels[level], row, col)


def scratch(job: Job, mode: str) -> Any:
    """The local labels of pass 1 (a Zarr array chunked like the blocks: no two tasks
    write one chunk). Created (mode "a") by the client before any task runs."""
    import zarr

    size = job.blocks.block_size
    return zarr.open_array(
        str(Path(job.out) / MARKERS / "local"),
        mode=mode,
        shape=job.shape,
        chunks=tuple(min(size, n) for n in job.shape),  # as ome_zarr.create_prediction
        dtype="uint32",
        fill_value=0,
        zarr_format=3,
    )
