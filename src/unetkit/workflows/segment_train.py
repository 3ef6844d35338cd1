"""The segmentation training recipe: one frozen config -> data, model, loss, trainer.

``train(recipe, run_dir)`` is what `unetkit train` calls. Two presets name the two ways to
train a U-Net: ``"modern"`` (same padding, batch norm, Dice+CE, AdamW, cosine schedule) and
``"paper"`` (Ronneberger et al. 2015: valid convolutions, border-weighted cross-entropy with
w0=10 and sigma=5, elastic deformation, SGD with momentum 0.99).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from unetkit import config as cfg
from unetkit import registry
from unetkit.data import transforms as T
from unetkit.data.datasets import FolderSegmentationDataset, SyntheticCellsDataset, split_indices
from unetkit.errors import ConfigError, DataError
from unetkit.nn.sampling import center_crop
from unetkit.segmentation.losses import build_loss
from unetkit.segmentation.metrics import dice, pixel_error
from unetkit.training.fit_config import FitConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SegmentationRecipe:
    """Everything a segmentation run needs; saved as the run's resolved config.

    Args:
        task: segmentation | regression (dense continuous targets: depth, restoration).
        output: regression only: depth (network predicts log-depth) | linear (as is).
        target_scale: regression only: multiplies integer target files (1/256: KITTI PNG).
        synthetic_regression: built-in regression data: depth (rendered scenes) | denoise.
        spatial_dims: 2 (images) or 3 (volumes: multi-page TIFF, NIfTI); sets model dims.
        data: folder with ``images/`` and ``masks/``; None trains on built-in synthetic cells.
        val_data: separate validation folder (default: ``val_fraction`` of ``data``).
        num_classes, mask_mode: how masks are read (see unetkit.data.io.decode_mask).
        target: semantic | separated | boundary (3 classes; gives instances by watershed).
        model, preset, model_options: registry name, preset and config overrides.
        normalize: per-image intensity normalisation, zscore | percentile.
        crop: training patch size (output size for valid-padding models).
        elastic, flips, intensity: augmentations; elastic_sigma in pixels (paper: 10).
        loss: ce | dice | dice_ce | weighted_ce; w0, sigma: the paper's border weight map.
        epochs, samples_per_epoch, batch_size, lr, optimizer, momentum, weight_decay,
        scheduler, warmup_steps, grad_accum, grad_clip, precision: optimisation (see
        training.fit). The paper recipe uses lr 1e-3 with gradient clipping at norm 1: its
        SGD with momentum 0.99 on the un-normalised net diverged at lr 1e-2 here.
        synthetic_train, synthetic_val, synthetic_size, synthetic_style: built-in data.
    """

    task: str = "segmentation"
    output: str = "depth"
    target_scale: float = 1.0
    synthetic_regression: str = "depth"
    data: str | None = None
    val_data: str | None = None
    spatial_dims: int = 2
    num_classes: int = 2
    mask_mode: str = "auto"
    target: str = "boundary"
    val_fraction: float = 0.2
    model: str = "unet"
    preset: str | None = None
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    normalize: str = "zscore"
    crop: int = 128
    elastic: bool = True
    elastic_sigma: float = 10.0
    flips: bool = True
    intensity: bool = True
    loss: str = "dice_ce"
    w0: float = 10.0
    sigma: float = 5.0
    epochs: int = 20
    samples_per_epoch: int | None = None
    batch_size: int = 8
    lr: float = 2e-3
    optimizer: str = "adamw"
    momentum: float = 0.99
    weight_decay: float = 1e-4
    scheduler: str = "warmup_cosine"
    warmup_steps: int = 20
    grad_accum: int = 1
    grad_clip: float | None = None
    precision: str = "auto"
    num_workers: int = 0
    seed: int = 0
    synthetic_train: int = 48
    synthetic_val: int = 8
    synthetic_size: int = 256
    synthetic_style: str = "fluorescence"


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
    ),
    "depth-demo": dict(
        task="regression",
        output="depth",
        loss="silog",
        model_options={"channels": (16, 32, 64, 128)},
        epochs=10,
        batch_size=8,
        samples_per_epoch=160,
        synthetic_train=96,
        synthetic_val=12,
        synthetic_size=128,
        crop=96,
        elastic=False,
    ),
    "demo": dict(
        model_options={"channels": (16, 32, 64, 128)},
        epochs=16,
        batch_size=8,
        samples_per_epoch=320,
        synthetic_train=96,
        synthetic_val=12,
    ),
}


def make_recipe(name: str | None = None, /, **overrides: Any) -> SegmentationRecipe:
    """A recipe from defaults, then a named recipe (modern | paper | demo | depth-demo), then
    overrides (recipe fields; ``preset=`` is the model's preset)."""
    values: dict[str, Any] = {}
    if name is not None:
        cfg.check_choice("recipe", name, PRESETS)
        values.update(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("task") == "regression" and values.get("loss", "dice_ce") == "dice_ce":
        values["loss"] = "silog" if values.get("output", "depth") == "depth" else "l1"
    recipe = cfg.from_dict(SegmentationRecipe, values, source="recipe")
    cfg.check_choice("task", recipe.task, ("segmentation", "regression"))
    return recipe


def target_channels(recipe: SegmentationRecipe) -> int:
    if recipe.task == "regression":
        return 1  # overridden by the data's target channels in build_model's caller
    return {"semantic": recipe.num_classes, "separated": 2, "boundary": 3}[recipe.target]


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


def build_transforms(
    recipe: SegmentationRecipe, crop: int | None, valid_crop: Any = None
) -> tuple[T.Compose, T.Compose]:
    """(train, eval) transforms: augmentation then normalisation; eval only normalises
    (after ``valid_crop``, a CenterCrop to sizes a valid-padding model accepts)."""
    train: list[Any] = []
    if recipe.elastic:  # before the crop, so warped-in context comes from the real image
        train.append(T.ElasticDeform(grid=3, sigma=recipe.elastic_sigma, p=0.5))
    if crop is not None:
        train.append(T.RandomCrop(crop))
    if recipe.flips:
        train += [T.RandomFlip(), T.RandomRot90()]
    restoration = recipe.task == "regression" and recipe.output == "linear"
    if recipe.intensity and not restoration:
        train.append(T.IntensityJitter())
    # restoration targets share the input's intensity scale: no per-image normalisation
    norm = [] if restoration or recipe.normalize == "none" else [T.Normalize(recipe.normalize)]
    eval_tf = [valid_crop, *norm] if valid_crop is not None else norm
    return T.Compose([*train, *norm]), T.Compose(eval_tf)


def _largest_valid_input(model: torch.nn.Module) -> T.CenterCrop:
    """Validation images are centre-cropped to the largest size a valid model accepts."""

    def size(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(model._nearest_valid_lengths(s)[0] or s for s in shape)

    return T.CenterCrop(size)


class _Repeat(Dataset):
    """``n`` samples drawn cyclically from ``base`` (more random crops per epoch)."""

    def __init__(self, base: Dataset, n: int) -> None:
        self.base, self.n = base, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.base[i % len(self.base)]

    def set_epoch(self, epoch: int) -> None:
        getattr(self.base, "set_epoch", lambda e: None)(
            epoch * ((self.n + len(self.base) - 1) // len(self.base))
        )


def build_datasets(
    recipe: SegmentationRecipe, crop: int | None, valid_crop: Any = None
) -> tuple[Dataset, Dataset, int]:
    """(train, validation, in_channels) for the recipe's data or the synthetic cells."""
    if recipe.task == "regression":
        return _regression_datasets(recipe, crop)
    train_tf, eval_tf = build_transforms(recipe, crop, valid_crop)
    weight = {"w0": recipe.w0, "sigma": recipe.sigma} if recipe.loss == "weighted_ce" else None
    common = dict(target=recipe.target, weight_map=weight)
    if recipe.data is None:
        s = (recipe.synthetic_size,) * 2
        opts = dict(shape=s, style=recipe.synthetic_style, **common)
        train = SyntheticCellsDataset(
            recipe.synthetic_train, seed=recipe.seed, transform=train_tf, **opts
        )
        val = SyntheticCellsDataset(
            recipe.synthetic_val, seed=recipe.seed + 10_000, transform=eval_tf, **opts
        )
        in_channels = 1
    else:
        fopts = dict(
            spatial_dims=recipe.spatial_dims,
            num_classes=recipe.num_classes,
            mask_mode=recipe.mask_mode,
            seed=recipe.seed,
            **common,
        )
        train, val = _folder_split(FolderSegmentationDataset, recipe, train_tf, eval_tf, fopts)
        in_channels = int(val[0]["image"].shape[0])
    if recipe.samples_per_epoch:
        train = _Repeat(train, recipe.samples_per_epoch)
    return train, val, in_channels


def _regression_datasets(
    recipe: SegmentationRecipe, crop: int | None
) -> tuple[Dataset, Dataset, int]:
    from unetkit.regression import (
        FolderRegressionDataset,
        SyntheticDenoiseDataset,
        SyntheticDepthDataset,
    )

    train_tf, eval_tf = build_transforms(recipe, crop)
    if recipe.data is None:
        cfg.check_choice("synthetic_regression", recipe.synthetic_regression, ("depth", "denoise"))
        cls = (
            SyntheticDepthDataset
            if recipe.synthetic_regression == "depth"
            else SyntheticDenoiseDataset
        )
        shape = (recipe.synthetic_size,) * 2
        train = cls(recipe.synthetic_train, shape=shape, seed=recipe.seed, transform=train_tf)
        val = cls(recipe.synthetic_val, shape=shape, seed=recipe.seed + 10_000, transform=eval_tf)
    else:
        opts = dict(
            target_scale=recipe.target_scale, positive=recipe.output == "depth", seed=recipe.seed
        )
        train, val = _folder_split(FolderRegressionDataset, recipe, train_tf, eval_tf, opts)
    in_channels = int(val[0]["image"].shape[0])
    if recipe.samples_per_epoch:
        train = _Repeat(train, recipe.samples_per_epoch)
    return train, val, in_channels


def _folder_split(
    cls: type, recipe: SegmentationRecipe, train_tf: Any, eval_tf: Any, options: dict[str, Any]
) -> tuple[Dataset, Dataset]:
    """Train and validation folder data sets: --val-data, or a seeded split of --data.

    Every file is validated now, so a bad one is named before training, not mid-epoch.
    """
    train = cls(recipe.data, transform=train_tf, **options)
    train.validate()
    if recipe.val_data is not None:
        val = cls(recipe.val_data, transform=eval_tf, **options)
        val.validate()
        return train, val
    val = cls(recipe.data, transform=eval_tf, **options)
    tr_idx, va_idx = split_indices(len(train), recipe.val_fraction, recipe.seed)
    if len(tr_idx) == 0 or len(va_idx) == 0:
        raise DataError(
            f"{recipe.data}: {len(train)} image(s) cannot be split into train and "
            f"validation; add images or pass --val-data"
        )
    return _subset(train, tr_idx), _subset(val, va_idx)


def _subset(ds: Dataset, idx: np.ndarray) -> Subset:
    sub = Subset(ds, idx.tolist())
    sub.set_epoch = ds.set_epoch  # type: ignore[attr-defined]
    return sub


def crop_targets(logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
    """Centre-crop the targets to a valid-padding model's (smaller) output."""
    size = logits.shape[2:]
    if batch["mask"].shape[1:] == size:
        return batch
    out = dict(batch)
    for key in ("mask", "weight", "instances"):
        if key in out:
            out[key] = center_crop(out[key][:, None], size)[:, 0]
    return out


class SegmentationLoss:
    """The recipe's loss on (logits, batch), valid-padding aware."""

    def __init__(self, recipe: SegmentationRecipe) -> None:
        self.loss = build_loss(recipe.loss)

    def __call__(
        self, logits: torch.Tensor | list[torch.Tensor], batch: dict[str, Any]
    ) -> torch.Tensor:
        # deep supervision (U-Net++ in training): a list of heads, the first at full size
        first = logits[0] if isinstance(logits, (list, tuple)) else logits
        return self.loss(logits, crop_targets(first, batch))


class SegmentationMetrics:
    """Per-batch validation sums: pixel error and mean foreground Dice (per image)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, float]:
        batch = crop_targets(logits, batch)
        pred = (
            logits.argmax(1).cpu().numpy()
            if logits.shape[1] > 1
            else (logits[:, 0] > 0).long().cpu().numpy()
        )
        target = batch["mask"].cpu().numpy()
        # dice of "any foreground" as well as the mean over classes; one row per image
        dices = [
            dice(p, t, num_classes=max(2, self.num_classes)).mean
            for p, t in zip(pred, target, strict=True)
        ]
        fg = [dice(p > 0, t > 0, num_classes=2).mean for p, t in zip(pred, target, strict=True)]
        errs = [pixel_error(p > 0, t > 0) for p, t in zip(pred, target, strict=True)]
        return {
            "dice": float(np.sum(dices)),
            "fg_dice": float(np.sum(fg)),
            "pixel_error": float(np.sum(errs)),
        }


def checkpoint_extra(recipe: SegmentationRecipe) -> dict[str, Any]:
    """Facts `unetkit predict` needs besides the weights."""
    if recipe.task == "regression":
        restoration = recipe.output == "linear"
        return {
            "task": "regression",
            "output": recipe.output,
            "target_scale": recipe.target_scale,
            "normalize": "none" if restoration else recipe.normalize,
        }
    return {
        "task": "segmentation",
        "target": recipe.target,
        "normalize": recipe.normalize,
        "num_classes": recipe.num_classes,
    }


def regression_task(recipe: SegmentationRecipe) -> Any:
    """Loss and metrics of a regression recipe (silog/L1/L2; AbsRel, RMSE, δ or PSNR)."""
    from unetkit.regression import RegressionMetrics, build_regression_loss
    from unetkit.training.tasks import SupervisedTask

    metrics = RegressionMetrics(recipe.output)
    loss = build_regression_loss(recipe.loss, output=recipe.output)
    return SupervisedTask(loss, metrics, monitor=metrics.monitor, mode=metrics.mode)


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
    from unetkit.training.tasks import SupervisedTask
    from unetkit.training.trainer import fit

    torch.manual_seed(recipe.seed)
    given = model
    probe_model = given if given is not None else build_model(recipe, in_channels=1)
    crop = input_crop(probe_model, recipe.crop)
    valid_crop = _largest_valid_input(probe_model) if probe_model.is_valid_padding else None
    train_ds, val_ds, in_channels = build_datasets(recipe, crop, valid_crop)
    if given is not None:
        model = given
        task = regression_task(recipe) if recipe.task == "regression" else None
    elif recipe.task == "regression":
        model = build_model(recipe, in_channels, int(val_ds[0]["target"].shape[0]))
        task = regression_task(recipe)
    else:
        model = build_model(recipe, in_channels) if in_channels != 1 else probe_model
    if recipe.task == "segmentation":
        if recipe.target == "semantic" and recipe.num_classes < 2:
            raise ConfigError("num_classes must be at least 2 (background + one class)")
        task = SupervisedTask(
            SegmentationLoss(recipe),
            SegmentationMetrics(target_channels(recipe)),
            monitor="val/fg_dice",
            mode="max",
        )
    log.info(
        "training %s (%s parameters) on %s",
        recipe.model,
        f"{sum(p.numel() for p in model.parameters()):,}",
        recipe.data
        or (
            "built-in synthetic cells"
            if recipe.task == "segmentation"
            else f"built-in synthetic {recipe.synthetic_regression} scenes"
        ),
    )
    fit_config = FitConfig(
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
    )
    result = fit(
        model,
        task,
        train_ds,
        val_ds,
        fit_config,
        run_dir=Path(run_dir),
        resume=resume,
        progress=progress,
        checkpoint_extra=checkpoint_extra(recipe),
        run_config={**cfg.to_dict(recipe), **({"lora": lora} if lora else {})},
        save_model=save_model,
    )
    if recipe.task == "segmentation" and recipe.target == "boundary":
        from unetkit.training import distributed
        from unetkit.workflows.calibrate import calibrate_seed_threshold

        if distributed.is_main():
            calibrate_seed_threshold(Path(run_dir) / "checkpoints" / "best.safetensors", val_ds)
    return result
