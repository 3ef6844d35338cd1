"""Segmentation training: a recipe -> data, model, loss, trainer.

``train(recipe, run_dir)`` is what `unetkit train` calls. The recipe itself (the frozen
config, its presets, what config.json records) is ``workflows.segment_recipe``; its names are
importable from here too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit import registry
from unetkit.data import transforms as T
from unetkit.data.io import list_images, read_pixel_size
from unetkit.data.segmentation_base import fmt_size
from unetkit.data.transforms import DEFAULT_PERCENTILES
from unetkit.errors import DataError
from unetkit.training import distributed
from unetkit.training.logging import RunDirectory
from unetkit.training.trainer import fit
from unetkit.workflows.calibrate import calibrate_seed_threshold
from unetkit.workflows.segment_data import TrainingData, build_datasets
from unetkit.workflows.segment_recipe import (
    DEFAULT_UNET_CHANNELS,
    PRESETS,
    REGRESSION_FIELDS,
    SEGMENTATION_FIELDS,
    SPATIAL_DIMS,
    SYNTHETIC_FIELDS,
    TASKS,
    SegmentationRecipe,
    fit_config,
    make_recipe,
    record,
    total_steps,
)
from unetkit.workflows.segment_task import regression_task, segmentation_task, target_channels

__all__ = [
    "DEFAULT_UNET_CHANNELS", "PRESETS", "REGRESSION_FIELDS", "SEGMENTATION_FIELDS",
    "SPATIAL_DIMS", "SYNTHETIC_FIELDS", "TASKS", "SegmentationRecipe", "build_model",
    "checkpoint_extra", "checkpoint_recipe_fields", "fit_config", "input_crop", "make_recipe",
    "record", "total_steps", "train",
]  # fmt: skip

log = logging.getLogger(__name__)


def build_model(
    recipe: SegmentationRecipe, in_channels: int, out_channels: int | None = None
) -> torch.nn.Module:
    options = dict(recipe.model_options)
    options.setdefault("in_channels", in_channels)
    if recipe.spatial_dims != 2:
        options.setdefault("dims", recipe.spatial_dims)
    options.setdefault("out_channels", out_channels or target_channels(recipe))
    return registry.create_model(recipe.model, preset=recipe.preset, **options)


def input_crop(model: torch.nn.Module, crop: int) -> int:
    """Training patch size: valid-padding models need ``crop`` of output plus their margin."""
    if getattr(model, "is_valid_padding", False):
        return model.input_size_for((crop,) * model.dims)[0]
    return crop


def _largest_valid_input(model: torch.nn.Module) -> T.CenterCrop:
    """Validation images are centre-cropped to the largest size a valid model accepts."""

    def size(shape: tuple[int, ...]) -> tuple[int, ...]:
        lengths = tuple(model._nearest_valid_lengths(s)[0] for s in shape)
        if None in lengths:
            smallest = model._nearest_valid_lengths(1)[1]
            raise DataError(
                f"validation image of {fmt_size(shape)} pixels: the valid-padding "
                f"{type(model).__name__} needs at least {smallest} pixels per side — use "
                "larger validation images (--val-data) or a same-padding recipe (modern)"
            )
        return lengths

    return T.CenterCrop(size)


def checkpoint_extra(recipe: SegmentationRecipe, masks: Any = None) -> dict[str, Any]:
    """Facts `unetkit predict` needs besides the weights (``masks``: the run's MaskSummary,
    whose median object diameter is the training scale)."""
    if recipe.task == "regression":
        restoration = recipe.output == "linear"
        return {
            "task": "regression",
            "output": recipe.output,
            "target_scale": recipe.target_scale,
            "normalize": "none" if restoration else recipe.normalize,
        }
    extra = {
        "task": "segmentation",
        "target": recipe.target,
        "normalize": recipe.normalize,
        "num_classes": recipe.num_classes,
    }
    if recipe.normalize == "percentile":
        extra["normalize_percentiles"] = list(recipe.norm_percentiles)
    if recipe.channels is not None:
        extra["channels"] = list(recipe.channels)  # predict reads inputs the same way
    pixel_size = recipe.pixel_size or _data_pixel_size(recipe)
    if pixel_size is not None:
        extra["pixel_size"] = pixel_size  # the training scale predict rescales inputs to
    if masks is not None and masks.object_diameter is not None:
        extra["object_diameter"] = masks.object_diameter  # for --object-diameter, min size
    return extra


def _data_pixel_size(recipe: SegmentationRecipe) -> float | None:
    """The pixel size (µm) the first training image states, if any."""
    if recipe.data is None or recipe.spatial_dims != 2:
        return None
    images = list_images(Path(recipe.data) / "images")
    size = read_pixel_size(images[0]) if images else None
    return size.x if size is not None else None


def checkpoint_recipe_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """Recipe fields that continue training a checkpoint the way it was trained (target,
    classes, normalisation: older checkpoints without recorded percentiles used 1-99)."""
    fields = {k: meta[k] for k in ("target", "normalize", "num_classes") if k in meta}
    if meta.get("normalize") == "percentile":
        fields["norm_percentiles"] = tuple(meta.get("normalize_percentiles", DEFAULT_PERCENTILES))
    return fields


class _EpochEnd:
    """After each epoch: move the draws to the next epoch's augmentations, and stop early
    when the monitored score has not improved for ``patience`` epochs."""

    def __init__(self, draws: Any, monitor: str, mode: str, patience: int | None) -> None:
        self.draws, self.monitor, self.mode, self.patience = draws, monitor, mode, patience
        self.best: float | None = None
        self.since_best = 0

    def __call__(self, epoch: int, row: dict[str, Any], model: torch.nn.Module) -> bool:
        self.draws.set_epoch(epoch)  # ``epoch`` epochs are done: the next is 0-based ``epoch``
        value = row.get(self.monitor)
        if self.patience is None or value is None or not np.isfinite(value):
            return False
        better = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        self.best, self.since_best = (value, 0) if better else (self.best, self.since_best + 1)
        if self.since_best >= self.patience:
            log.info(
                "early stopping: %s has not improved for %d epochs (best %.4f)",
                self.monitor,
                self.patience,
                self.best,
            )
            return True
        return False


def _describe(recipe: SegmentationRecipe, data: TrainingData, model: torch.nn.Module) -> None:
    """Say at the start what the run read, how it split it and what it will do."""
    source = recipe.data or (
        "built-in synthetic cells"
        if recipe.task == "segmentation"
        else f"built-in synthetic {recipe.synthetic_regression} scenes"
    )
    params = f"{sum(p.numel() for p in model.parameters()):,}"
    log.info("training %s (%s parameters) on %s", recipe.model, params, source)
    if data.masks is not None:
        log.info("masks: %s; target %s", data.masks.describe(), recipe.target)
    log.info("split: %s", data.split)
    log.info(
        "budget: %d epochs x %d steps of %d %s crops = %d optimiser steps",
        recipe.epochs,
        recipe.steps_per_epoch,
        recipe.batch_size,
        "whole-image" if data.crop is None else f"{data.crop}-pixel",
        total_steps(recipe),
    )


def train(
    recipe: SegmentationRecipe,
    run_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    model: torch.nn.Module | None = None,
    save_model: Any = None,
    lora: dict[str, Any] | None = None,
) -> Any:
    """Train a segmentation (or dense regression) model as ``recipe`` says; returns the
    trainer's FitResult.

    ``model`` starts from given weights instead of a fresh model (fine-tuning; with LoRA
    adapters injected, only they train); ``save_model`` replaces the checkpoint writer
    (LoRA runs write adapter files); ``lora`` is recorded in the run's config.json.
    """
    torch.manual_seed(recipe.seed)
    given = model
    probe_model = given if given is not None else build_model(recipe, in_channels=1)
    crop = input_crop(probe_model, recipe.crop)
    valid = probe_model.is_valid_padding
    valid_crop = _largest_valid_input(probe_model) if valid else None
    data = build_datasets(
        recipe,
        crop,
        valid_crop,
        margin=crop - recipe.crop,
        valid_input=(lambda n: probe_model._nearest_valid_lengths(n)[0] or n) if valid else None,
    )
    train_ds, val_ds, in_channels = data.train, data.val, data.in_channels
    if valid:
        val_ds[0]  # a validation image too small for the network fails now, before any step
    if given is not None:
        model = given
        task = regression_task(recipe) if recipe.task == "regression" else None
    elif recipe.task == "regression":
        model = build_model(recipe, in_channels, int(val_ds[0]["target"].shape[0]))
        task = regression_task(recipe)
    else:
        model = build_model(recipe, in_channels) if in_channels != 1 else probe_model
    if recipe.task == "segmentation":
        task = segmentation_task(recipe)
    _describe(recipe, data, model)
    run = RunDirectory(run_dir)
    if resume and run.has_state():  # a resumed run continues the draws where it stopped
        # a state saved mid-way through the first epoch comes before any metrics.csv row
        done = len(run.read_metrics()) if run.metrics_path.is_file() else 0
        train_ds.set_epoch(done)
    result = fit(
        model,
        task,
        train_ds,
        val_ds,
        fit_config(recipe),
        run_dir=Path(run_dir),
        resume=resume,
        progress=progress,
        checkpoint_extra=checkpoint_extra(recipe, data.masks),
        run_config={**record(recipe), **({"lora": lora} if lora else {})},
        save_model=save_model,
        on_epoch_end=_EpochEnd(train_ds, task.monitor, task.mode, recipe.early_stopping),
    )
    log.info(
        "ran %d optimiser steps in %d epochs; best %s %.4f (epoch %s)",
        result.step,
        result.epochs_run,
        result.monitor,
        result.best_metric if result.best_metric is not None else float("nan"),
        result.best_epoch,
    )
    if recipe.task == "segmentation" and recipe.target == "boundary" and distributed.is_main():
        calibrate_seed_threshold(Path(run_dir) / "checkpoints" / "best.safetensors", val_ds)
    return result
