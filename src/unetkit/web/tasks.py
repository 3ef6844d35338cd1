"""What each job does: thin calls into the shared workflow API.

Segmentation and fine-tuning go through ``unetkit.workflows.interactive`` (the same
``Segmenter`` / ``finetune_on_labels`` the napari plugin uses), generation and inpainting
through ``unetkit.workflows.diffuse.DiffusionPipeline``. Loaded models are cached per model
file so a second request does not load them again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unetkit.data.io import read_image, write_image
from unetkit.errors import DataError
from unetkit.inference import TileOptions
from unetkit.web.exports import write_result_files
from unetkit.web.jobs import Job
from unetkit.web.models import ModelEntry, ModelList
from unetkit.web.uploads import StoredImage, preview
from unetkit.workflows.diffuse import DiffusionPipeline, save_grid, to_uint8
from unetkit.workflows.interactive import Segmenter, finetune_on_labels


class ModelCache:
    """The last few loaded Segmenters / DiffusionPipelines, keyed by (kind, path)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, Path], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, entry: ModelEntry) -> Any:
        key = (entry.kind, entry.path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = _load(entry)  # outside the lock: loading takes a while
        with self._lock:
            self._items[key] = loaded
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return loaded


def _load(entry: ModelEntry) -> Any:
    if entry.kind == "diffusion":
        return DiffusionPipeline.from_checkpoint(entry.path, precision="auto")
    return Segmenter(entry.path)


def read_upload(image: StoredImage) -> np.ndarray:
    """The uploaded image as the user has it (H×W or H×W×C, the file's dtype)."""
    arr = np.asarray(read_image(image.path, palette_to_rgb=True))
    if arr.ndim == 3 and arr.shape[-1] > 4 and arr.shape[0] <= 4:  # C×H×W TIFF
        arr = np.moveaxis(arr, 0, -1)
    return arr


def segment_images(job: Job, segmenter: Any, images: list[StoredImage], tile: int | None) -> list:
    """Segment each image, write its downloads under ``job.folder/<index>/``."""
    out = []
    for index, image in enumerate(images):
        job.stage = f"image {index + 1} of {len(images)}: {image.name}"
        tiles = TileOptions(tile=tile)
        res = segmenter.segment(read_upload(image), tiles=tiles, progress=job.progress)
        folder = job.folder / str(index)
        files = write_result_files(folder, res.instances, res.labels, res.table, res.overlay)
        np.save(folder / "instances.npy", res.instances.astype(np.int32))
        out.append(
            {
                "image": image.to_dict(),
                "count": int(res.count),
                "table": [{k: _plain(v) for k, v in row.items()} for row in res.table],
                "files": files,
            }
        )
    return out


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def segment_task(
    cache: ModelCache, entry: ModelEntry, images: list[StoredImage], tile: int | None
) -> Any:
    """The work function of a segmentation job."""

    def work(job: Job) -> dict[str, Any]:
        job.stage = f"loading {entry.name}"
        segmenter = cache.get(entry)
        return {"model": entry.to_dict(), "images": segment_images(job, segmenter, images, tile)}

    return work


def finetune_dir(base: Path) -> Path:
    """``<base>-finetune-<k>`` beside the base run folder or model file, first free k
    (a checkpoint inside a run's ``checkpoints/`` counts as that run)."""
    if not base.is_dir() and base.parent.name == "checkpoints":
        base = base.parent.parent
    stem = base.name if base.is_dir() else base.stem
    k = 1
    while (base.parent / f"{stem}-finetune-{k}").exists():
        k += 1
    return base.parent / f"{stem}-finetune-{k}"


@dataclass
class FinetuneRequest:
    """A fine-tune job's inputs: images with their corrected labels (H×W int)."""

    images: list[StoredImage]
    labels: list[np.ndarray]
    steps: int
    tile: int | None = None


def finetune_task(
    cache: ModelCache, models: ModelList, entry: ModelEntry, request: FinetuneRequest
) -> Any:
    """Train a LoRA adapter on the corrected labels, list it, re-segment with it."""

    def work(job: Job) -> dict[str, Any]:
        def on_step(step: int, total: int, loss: float) -> None:
            job.losses.append(float(loss))
            job.progress(step, total, "fine-tuning")

        run_dir = finetune_dir(entry.path)
        job.stage = "fine-tuning"
        adapter = finetune_on_labels(
            base=entry.path,
            images=[read_upload(im) for im in request.images],
            labels=request.labels,
            run_dir=run_dir,
            steps=request.steps,
            progress=on_step,
            should_stop=job.cancelled,
        )
        new = models.add(Path(adapter), name=f"{entry.name} + {run_dir.name}")
        job.stage = "re-segmenting"
        segmenter = Segmenter(adapter)
        segmented = segment_images(job, segmenter, request.images, request.tile)
        return {"model": new.to_dict(), "base": entry.to_dict(), "images": segmented}

    return work


@dataclass
class SampleRequest:
    """Generation / inpainting settings (validated by the app)."""

    prompt: str
    n: int
    steps: int
    guidance: float
    seed: int
    sampler: str


def _write_samples(job: Job, images: Any) -> dict[str, Any]:
    save_grid(images, job.folder / "grid.png")
    names = []
    for i, picture in enumerate(to_uint8(images)):
        names.append(f"sample_{i}.png")
        write_image(job.folder / names[-1], picture)
    return {"grid": "grid.png", "samples": names}


def generate_task(cache: ModelCache, entry: ModelEntry, req: SampleRequest) -> Any:
    """Sample ``req.n`` images for one prompt."""

    def work(job: Job) -> dict[str, Any]:
        job.stage = f"loading {entry.name}"
        pipe = cache.get(entry)
        job.stage = "sampling"
        images = pipe.generate(
            [req.prompt] * req.n,
            steps=req.steps,
            guidance=req.guidance,
            sampler=req.sampler,
            seed=req.seed,
            callback=lambda i, t, x: job.progress(i + 1, req.steps),
        )
        return {"model": entry.to_dict(), **_write_samples(job, images)}

    return work


def inpaint_inputs(image: np.ndarray, mask: np.ndarray, size: int, channels: int) -> tuple:
    """(C×size×size image in [-1, 1], 1×size×size 0/1 mask) for the pipeline: the upload
    is resized to the model's size (the page lets users brush on any picture)."""
    pic = preview(image)  # uint8, grey or RGB
    if pic.ndim == 3 and channels == 1:
        pic = pic.mean(-1).astype(np.uint8)
    if pic.ndim == 2 and channels > 1:
        pic = np.repeat(pic[..., None], channels, -1)
    small = np.asarray(Image.fromarray(pic).resize((size, size), Image.BILINEAR), np.float32)
    small = small.reshape(size, size, -1)[..., :channels]
    m = Image.fromarray((mask > 0).astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    tensor = torch.from_numpy(small / 127.5 - 1).permute(2, 0, 1)
    return tensor, torch.from_numpy(np.asarray(m) > 0).float()[None]


def inpaint_task(
    cache: ModelCache, entry: ModelEntry, image: StoredImage, mask: np.ndarray, req: SampleRequest
) -> Any:
    """Repaint the brushed region of an uploaded image, ``req.n`` times."""

    def work(job: Job) -> dict[str, Any]:
        job.stage = f"loading {entry.name}"
        pipe = cache.get(entry)
        x, m = inpaint_inputs(read_upload(image), mask, pipe.size, pipe.channels)
        if not m.any():
            raise DataError("mask: nothing brushed at the model's size; brush a larger area")
        job.stage = "inpainting"
        images = pipe.inpaint(
            x,
            m,
            req.prompt,
            n=req.n,
            steps=req.steps,
            guidance=req.guidance,
            sampler=req.sampler,
            seed=req.seed,
            callback=lambda i, t, z: job.progress(i + 1, req.steps),
        )
        return {"model": entry.to_dict(), **_write_samples(job, images)}

    return work
