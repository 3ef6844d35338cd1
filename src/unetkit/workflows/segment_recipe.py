"""The segmentation recipe: one frozen config, its named presets and what config.json holds.

Two presets name the two ways to train a U-Net: ``"modern"`` (same padding, batch norm,
Dice+CE, AdamW, cosine schedule) and ``"paper"`` (Ronneberger et al. 2015: valid
convolutions, border-weighted cross-entropy with w0=10 and sigma=5, elastic deformation, SGD
with momentum 0.99). ``workflows.segment_train.train`` runs a recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unetkit import config as cfg
from unetkit.errors import ConfigError
from unetkit.training.fit_config import FitConfig


@dataclasses.dataclass(frozen=True)
class SegmentationRecipe:
    """Everything a segmentation run needs; saved (task's fields only) as the run's config.

    The budget counts optimiser steps, not passes over the data: an epoch is
    ``steps_per_epoch`` steps of ``batch_size`` freshly augmented draws whatever the number
    of images, so ``epochs * steps_per_epoch`` steps train one annotated image or thousands
    (nnU-Net: 250 steps per epoch on a GPU; 50 here, so a 2-core CPU validates every few
    minutes and early stopping can act).

    Args:
        task: segmentation | regression (dense continuous targets: depth, restoration).
        output: regression only: depth (network predicts log-depth) | linear (as is).
        target_scale: regression only: multiplies integer target files (1/256: KITTI PNG).
        synthetic_regression: built-in regression data: depth (rendered scenes) | denoise.
        spatial_dims: 2 (images) or 3 (volumes: multi-page TIFF, NIfTI); sets model dims.
        data: folder with ``images/`` and ``masks/``; None trains on built-in synthetic cells.
        val_data: separate validation folder (default: split ``data``: whole images when it
            holds 5 or more, else the last ``val_fraction`` of each image's longest axis).
        channels: image channels to train on, in order (Cellpose's "cytoplasm, nucleus"
            habit); recorded in the checkpoint so predict reads inputs the same way.
        pixel_size: µm per pixel of the training images (default: what the first image
            file states); recorded so predict can rescale inputs of another magnification.
        num_classes, mask_mode: how masks are read (see unetkit.data.io.decode_mask).
        target: semantic | separated | boundary (3 classes; gives instances by watershed).
        model, preset, model_options: registry name, preset and config overrides (the
            modern U-Net defaults to channels 16..256: ~2 M parameters, trainable on a CPU).
        normalize, norm_percentiles: per-image intensity normalisation, percentile (the
            percentiles map to 0 and 1) | zscore | none.
        crop: training patch size (output size for valid-padding models); limited to the
            smallest image.
        affine, zoom, rotate: scale augmentation: zoom factor range and rotation (degrees),
            resampled together with the crop and the elastic field.
        elastic, flips, intensity: augmentations; elastic_sigma in pixels (paper: 10).
        loss: ce | dice | dice_ce | weighted_ce; w0, sigma: the paper's border weight map.
        epochs, steps_per_epoch, max_steps: the budget (max_steps cuts the last epoch short).
        early_stopping: stop after this many epochs without a better validation score.
        batch_size, lr, optimizer, momentum, weight_decay, scheduler, warmup_steps,
        grad_accum, grad_clip, precision: optimisation (see training.fit); warmup_steps 0
        warms up over 5 % of the run, and the schedule's horizon is the run's steps. The
        paper recipe uses lr 1e-3 with gradient clipping at norm 1: its SGD with momentum
        0.99 on the un-normalised net diverged at lr 1e-2 here.
        synthetic_train, synthetic_val, synthetic_size, synthetic_style: built-in data.
    """

    task: str = "segmentation"
    output: str = "depth"
    target_scale: float = 1.0
    synthetic_regression: str = "depth"
    data: str | None = None
    val_data: str | None = None
    channels: tuple[int, ...] | None = None
    pixel_size: float | None = None
    spatial_dims: int = 2
    num_classes: int = 2
    mask_mode: str = "auto"
    target: str = "boundary"
    val_fraction: float = 0.2
    model: str = "unet"
    preset: str | None = None
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    normalize: str = "percentile"
    norm_percentiles: tuple[float, float] = (1.0, 99.8)
    crop: int = 128
    affine: bool = True
    zoom: tuple[float, float] = (0.8, 1.25)
    rotate: float = 180.0
    elastic: bool = True
    elastic_sigma: float = 10.0
    flips: bool = True
    intensity: bool = True
    loss: str = "dice_ce"
    w0: float = 10.0
    sigma: float = 5.0
    epochs: int = 20
    steps_per_epoch: int = 50
    max_steps: int | None = None
    early_stopping: int | None = None
    batch_size: int = 8
    lr: float = 2e-3
    optimizer: str = "adamw"
    momentum: float = 0.99
    weight_decay: float = 1e-4
    scheduler: str = "warmup_cosine"
    warmup_steps: int = 0
    grad_accum: int = 1
    grad_clip: float | None = None
    precision: str = "auto"
    num_workers: int = 0
    seed: int = 0
    synthetic_train: int = 48
    synthetic_val: int = 8
    synthetic_size: int = 256
    synthetic_style: str = "fluorescence"


DEFAULT_UNET_CHANNELS = (16, 32, 64, 128, 256)
TASKS = ("segmentation", "regression")
SPATIAL_DIMS = (2, 3)
# fields that mean something for one task only: left out of the other task's config.json
REGRESSION_FIELDS = ("output", "target_scale", "synthetic_regression")
SEGMENTATION_FIELDS = ("num_classes", "mask_mode", "target", "w0", "sigma")
SYNTHETIC_FIELDS = ("synthetic_train", "synthetic_val", "synthetic_size", "synthetic_style")

PRESETS: dict[str, dict[str, Any]] = {
    "modern": {},
    "paper": dict(
        preset="paper",
        target="separated",
        loss="weighted_ce",
        optimizer="sgd",
        lr=0.001,
        momentum=0.99,
        grad_clip=1.0,
        weight_decay=0.0,
        scheduler="constant",
        warmup_steps=0,
        batch_size=1,
        crop=388,
        intensity=False,
        affine=False,
        normalize="zscore",
        steps_per_epoch=100,
    ),
    "depth-demo": dict(
        task="regression",
        output="depth",
        loss="silog",
        model_options={"channels": (16, 32, 64, 128)},
        epochs=10,
        batch_size=8,
        steps_per_epoch=20,
        synthetic_train=96,
        synthetic_val=12,
        synthetic_size=128,
        crop=96,
        elastic=False,
        affine=False,
    ),
    "demo": dict(
        model_options={"channels": (16, 32, 64, 128)},
        epochs=16,
        batch_size=8,
        steps_per_epoch=40,
        synthetic_train=96,
        synthetic_val=12,
    ),
}


def make_recipe(name: str | None = None, /, **overrides: Any) -> SegmentationRecipe:
    """A recipe from defaults, then a named recipe (modern | paper | demo | depth-demo), then
    overrides (recipe fields; ``preset=`` is the model's preset).

    ``samples_per_epoch`` (older configs) is read as ``ceil(samples / batch_size)`` steps.
    """
    values: dict[str, Any] = {}
    if name is not None:
        cfg.check_choice("recipe", name, PRESETS)
        values.update(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    samples = values.pop("samples_per_epoch", None)
    if samples is not None and overrides.get("steps_per_epoch") is None:
        values["steps_per_epoch"] = -(-int(samples) // int(values.get("batch_size", 8)))
    if values.get("task") == "regression" and values.get("loss", "dice_ce") == "dice_ce":
        values["loss"] = "silog" if values.get("output", "depth") == "depth" else "l1"
    if not isinstance(values.get("model_options") or {}, dict):
        raise ConfigError(
            f"recipe: model_options must be a table of model config overrides (e.g. "
            f"channels = [16, 32]), got {values['model_options']!r}"
        )
    if values.get("model", "unet") == "unet" and values.get("preset") is None:
        options = dict(values.get("model_options") or {})
        options.setdefault("channels", DEFAULT_UNET_CHANNELS)
        values["model_options"] = options
    recipe = cfg.from_dict(SegmentationRecipe, values, source="recipe")
    cfg.check_choice("task", recipe.task, ("segmentation", "regression"))
    _check_budget(recipe)
    return recipe


def _check_budget(recipe: SegmentationRecipe) -> None:
    for name in ("epochs", "steps_per_epoch", "batch_size"):
        if getattr(recipe, name) < 1:
            raise ConfigError(f"{name}={getattr(recipe, name)} must be at least 1")
    for name in ("max_steps", "early_stopping"):
        value = getattr(recipe, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be at least 1 (or unset)")
    if not 0.0 < recipe.val_fraction < 1.0:
        raise ConfigError(f"val_fraction={recipe.val_fraction} must be in (0, 1)")
    if recipe.crop < 1:
        raise ConfigError(f"crop={recipe.crop} must be at least 1 pixel")


def total_steps(recipe: SegmentationRecipe) -> int:
    """Optimiser steps of the whole run (before early stopping)."""
    steps = recipe.epochs * -(-recipe.steps_per_epoch // recipe.grad_accum)
    return min(steps, recipe.max_steps) if recipe.max_steps is not None else steps


def record(recipe: SegmentationRecipe) -> dict[str, Any]:
    """The recipe as config.json holds it: only the fields its task and data use."""
    skip = set(SEGMENTATION_FIELDS if recipe.task == "regression" else REGRESSION_FIELDS)
    if recipe.data is not None:
        skip.update(SYNTHETIC_FIELDS)
    if recipe.loss != "weighted_ce":
        skip.update(("w0", "sigma"))
    if recipe.optimizer != "sgd":
        skip.add("momentum")
    if recipe.normalize != "percentile":
        skip.add("norm_percentiles")
    return {k: v for k, v in cfg.to_dict(recipe).items() if k not in skip}


def fit_config(recipe: SegmentationRecipe) -> FitConfig:
    """The recipe's optimisation settings as the trainer's typed config."""
    return FitConfig(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        momentum=recipe.momentum if recipe.optimizer == "sgd" else None,
        scheduler=recipe.scheduler,
        warmup_steps=recipe.warmup_steps,
        precision=recipe.precision,
        grad_accum=recipe.grad_accum,
        grad_clip=recipe.grad_clip,
        num_workers=recipe.num_workers,
        seed=recipe.seed,
        max_steps=recipe.max_steps,
    )
