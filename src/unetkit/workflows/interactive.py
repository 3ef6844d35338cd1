"""Segment one array and fine-tune on corrected labels: what the napari plugin and the web
page call (the CLI's ``predict`` and ``lora-train`` run the same engines on files).

Example:
    >>> seg = Segmenter("runs/demo")                                        # doctest: +SKIP
    >>> res = seg.segment(image)                                            # doctest: +SKIP
    >>> adapter = finetune_on_labels("runs/demo", [image], [fixed], "runs/fix", steps=50)
    >>> Segmenter(adapter).segment(image).count                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from unetkit.data.io import to_float_image
from unetkit.errors import DataError, UnetkitError
from unetkit.formats.loading import base_checkpoint, is_adapter_file
from unetkit.formats.lora_files import read_adapter
from unetkit.inference import TileOptions
from unetkit.segmentation.postprocess import object_table
from unetkit.training.fit_config import FitConfig
from unetkit.training.trainer import fit
from unetkit.workflows import segment_train as S
from unetkit.workflows.adapt import LoRAOptions, adapter_saver, attach
from unetkit.workflows.calibrate import calibrate_seed_threshold
from unetkit.workflows.pictures import overlay
from unetkit.workflows.segment import (
    InferenceOptions,
    load_for_inference,
    predict_image,
)
from unetkit.workflows.segment_data import build_datasets
from unetkit.workflows.segment_task import segmentation_task

ProgressFn = Callable[[int, int], None]
StepFn = Callable[[int, int, float], None]


class Cancelled(UnetkitError):
    """A job stopped because its ``should_stop`` callback said so."""


@dataclasses.dataclass
class SegmentResult:
    """instances: H×W int32 objects (0 = background); labels: H×W class mask;
    probabilities: C×H×W float32; table: one dict per object; overlay: H×W×3 uint8."""

    instances: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    table: list[dict[str, Any]]
    overlay: np.ndarray

    @property
    def count(self) -> int:
        return len(self.table)


def as_channels_first(image: np.ndarray, in_channels: int, *, name: str = "image") -> np.ndarray:
    """An array as a user holds it (H×W, H×W×C or C×H×W) -> float32 C×H×W for the model.

    The channel axis is the one of length ``in_channels`` (last wins for H×W×C); a
    grey model given RGB gets the channel mean. Raises DataError naming ``name`` otherwise.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == in_channels and arr.shape[-1] != in_channels:
        arr = np.moveaxis(arr, 0, -1)  # C×H×W -> H×W×C, as files are read
    if arr.ndim == 3 and arr.shape[-1] > 4:
        raise DataError(f"{name}: shape {arr.shape} has no channel axis of {in_channels}")
    x = to_float_image(arr, path=name)
    if x.shape[0] == in_channels:
        return x
    if in_channels == 1:
        return x.mean(0, keepdims=True)
    raise DataError(
        f"{name}: {x.shape[0]} channel(s), but the model takes {in_channels}; "
        f"give an image with {in_channels} channels"
    )


class Segmenter:
    """A segmentation model opened once (run directory, checkpoint, adapter or ONNX file)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.model, self.meta = load_for_inference(_model_file(self.path))
        if self.meta.get("diffusion") or self.meta.get("task") == "regression":
            kind = "diffusion" if self.meta.get("diffusion") else "regression"
            raise DataError(f"{self.path}: a {kind} model, not a segmentation model")
        self.in_channels = int(getattr(self.model, "in_channels", 1))
        self.dims = int(getattr(self.model, "dims", 2))

    def segment(
        self,
        image: np.ndarray,
        *,
        tiles: TileOptions | None = None,
        precision: str = "auto",
        progress: ProgressFn | None = None,
    ) -> SegmentResult:
        """Segment one 2-D image; ``progress(tiles_done, tiles_total)`` is called as tiles
        finish (an exception raised by it, e.g. a cancelled job's, stops the work)."""
        x = as_channels_first(image, self.in_channels)
        options = InferenceOptions(tiles=tiles or TileOptions(), precision=precision)
        pred = predict_image(self.model, x, self.meta, options, progress=progress)
        table = object_table(pred.instances, x)
        return SegmentResult(
            pred.instances, pred.labels, pred.probabilities, table, overlay(x, pred.instances)
        )


def _model_file(path: Path) -> Path:
    """A run directory's best checkpoint, or the file itself."""
    return base_checkpoint(path) if path.is_dir() else path


class _Reporting:
    """A task that reports each training step's loss and stops when asked."""

    def __init__(self, task: Any, total: int, progress: StepFn | None, should_stop: Any) -> None:
        self.task, self.total, self.step = task, total, 0
        self.progress, self.should_stop = progress, should_stop
        self.monitor, self.mode = task.monitor, task.mode

    def training_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"fine-tuning cancelled after {self.step} of {self.total} steps")
        loss = self.task.training_loss(model, batch)
        self.step += 1
        if self.progress is not None:
            self.progress(self.step, self.total, float(loss.detach()))
        return loss

    def validation_metrics(self, model: torch.nn.Module, batch: Any) -> dict[str, float]:
        return self.task.validation_metrics(model, batch)


def _write_pairs(
    folder: Path, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], in_channels: int
) -> None:
    """images/ and masks/ as the folder reader expects them (float TIFF, label TIFF)."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, (image, lab) in enumerate(zip(images, labels, strict=True)):
        x = as_channels_first(image, in_channels, name=f"image {i}")
        lab = np.asarray(lab)
        if lab.shape != x.shape[1:]:
            raise DataError(f"labels {i}: shape {lab.shape} differs from image {x.shape[1:]}")
        if not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0:
            raise DataError(f"labels {i}: expected non-negative integer labels")
        pixels = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)  # H×W or H×W×C
        tifffile.imwrite(folder / "images" / f"{i:04d}.tif", pixels)
        dtype = np.uint16 if lab.max() <= np.iinfo(np.uint16).max else np.uint32
        tifffile.imwrite(folder / "masks" / f"{i:04d}.tif", lab.astype(dtype))


def finetune_on_labels(
    base: str | os.PathLike,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    run_dir: str | os.PathLike,
    *,
    steps: int = 50,
    rank: int = 4,
    lr: float | None = None,
    progress: StepFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Train a LoRA adapter on corrected instance labels; returns the adapter file.

    Args:
        base: the model the corrections were made on: a run directory or checkpoint (an
            adapter file starts a fresh adapter on its base).
        images / labels: arrays as ``Segmenter.segment`` takes them; labels H×W, 0 =
            background, one integer per object.
        run_dir: where the adapter run is written (``checkpoints/best.safetensors``).
        steps: optimiser steps; rank: LoRA rank; lr: None = the recipe default.
        progress: ``progress(step, steps, loss)`` after every step.
        should_stop: polled before every step; True raises ``Cancelled``.
    """
    if not images or len(images) != len(labels):
        raise DataError("finetune_on_labels: give one label image per image (at least one)")
    if steps < 1:
        raise DataError(f"steps={steps}: must be at least 1")
    base_file = _base_file(Path(base))
    model, meta = load_for_inference(base_file)
    if meta.get("task", "segmentation") != "segmentation" or "diffusion" in meta:
        raise DataError(f"{base}: fine-tuning on labels needs a segmentation model")
    options = LoRAOptions(targets=("attn+ff+conv",), r=rank)
    summary = attach(model, options)
    in_channels = int(getattr(model, "in_channels", 1))
    with tempfile.TemporaryDirectory(prefix="unetkit-finetune-") as tmp:
        _write_pairs(Path(tmp), images, labels, in_channels)
        side = min(min(np.asarray(lab).shape[-2:]) for lab in labels)
        known = S.checkpoint_recipe_fields(meta)
        batch = 4
        recipe = S.make_recipe(
            "modern", model=meta["model"], data=tmp, val_data=tmp, mask_mode="instances",
            steps_per_epoch=steps, batch_size=batch, **known,
        )
        crop = S.input_crop(model, min(recipe.crop, side))
        data = build_datasets(recipe, crop)
        train_ds, val_ds = data.train, data.val
        task = segmentation_task(recipe)
        config = FitConfig(epochs=1, batch_size=batch, lr=lr or recipe.lr, max_steps=steps)
        fit(
            model, _Reporting(task, steps, progress, should_stop), train_ds, val_ds, config,
            run_dir=Path(run_dir), progress=False, resume=False,
            save_model=adapter_saver(options, base_file),
            run_config={"finetune": {"base": str(base_file), "steps": steps, **summary}},
        )
        adapter = Path(run_dir) / "checkpoints" / "last.safetensors"
        if meta.get("target") == "boundary":
            calibrate_seed_threshold(adapter, val_ds)
    return adapter


def _base_file(path: Path) -> Path:
    """The base checkpoint of a run directory, checkpoint or adapter file."""
    file = _model_file(path)
    return Path(read_adapter(file).info["base_model"]) if is_adapter_file(file) else file
