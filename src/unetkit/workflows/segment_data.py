"""Training data of a segmentation (or dense regression) recipe: read, summarise, split,
augment and draw a fixed number of samples per epoch.

A run states here how it read the masks and how it split them: one image (or a folder of
fewer than ``SPATIAL_SPLIT_BELOW`` images) is split spatially, each image giving a held-out
strip; larger folders hold out whole images; ``val_data`` replaces the split.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from unetkit import config as cfg
from unetkit.data import transforms as T
from unetkit.data.datasets import (
    FolderSegmentationDataset,
    SyntheticCellsDataset,
    fmt_size,
    split_indices,
)
from unetkit.data.mask_summary import MaskSummary
from unetkit.data.sampling import RandomDraws, spatial_split
from unetkit.errors import DataError
from unetkit.regression import (
    FolderRegressionDataset,
    SyntheticDenoiseDataset,
    SyntheticDepthDataset,
)

if TYPE_CHECKING:  # typing only: the recipe module imports this one
    from unetkit.workflows.segment_recipe import SegmentationRecipe

log = logging.getLogger(__name__)

SPATIAL_SPLIT_BELOW = 5  # fewer images than this: hold out a strip of each, not whole images
_AXES = {2: "HW", 3: "DHW"}

SYNTHETIC_REGRESSION = ("depth", "denoise")  # the built-in regression data


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What ``build_datasets`` found: the data sets and the facts a run reports.

    Args:
        train: draws of augmented samples (``steps_per_epoch * batch_size`` per epoch).
        val: validation samples (normalised, not augmented).
        in_channels: image channels.
        crop: the training patch (input) size used, after clamping to the images.
        split: one line saying how training and validation were separated.
        masks: how the masks were read (None for built-in or regression data).
    """

    train: RandomDraws
    val: Dataset
    in_channels: int
    crop: int | None
    split: str
    masks: MaskSummary | None


def build_transforms(
    recipe: SegmentationRecipe, crop: int | None, valid_crop: Any = None
) -> tuple[T.Compose, T.Compose, T.Normalize | None]:
    """(train augmentation, eval transform, whole-image normalisation or None).

    Segmentation data sets normalise each whole image once (``set_normalize``), as
    prediction does; the augmentation then works in normalised units, so its intensity
    noise and offsets mean the same on a dim 16-bit image as on a full-range 8-bit one.
    The modern recipe crops, zooms, rotates and warps in one resampling
    (:class:`RandomSpatial`); ``affine=False`` (the paper recipe) keeps the paper's elastic
    deformation of the whole image followed by a crop. The eval transform is ``valid_crop``
    (a CenterCrop to sizes a valid-padding model accepts) or nothing.
    """
    train: list[Any] = []
    if recipe.affine and crop is not None:
        sigma = recipe.elastic_sigma if recipe.elastic else 0.0
        train.append(
            T.RandomSpatial(crop, scale=recipe.zoom, rotate=recipe.rotate, elastic_sigma=sigma)
        )
    else:
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
    norm = None
    if not restoration and recipe.normalize != "none":
        norm = T.Normalize(recipe.normalize, percentiles=recipe.norm_percentiles)
    eval_tf = [valid_crop] if valid_crop is not None else []
    return T.Compose(train), T.Compose(eval_tf), norm


def clamp_crop(crop: int, shapes: list[tuple[int, ...]], option: str = "crop") -> int:
    """``crop`` limited to the smallest image side, with a warning when it had to shrink
    (a 4096 crop of 64×64 images would train on mirrored padding, in gigabytes)."""
    side = min(min(s[-2:]) for s in shapes)
    if crop <= side:
        return crop
    log.warning(
        "%s %d is larger than the smallest training image (%s): training on %d-pixel crops",
        option,
        crop,
        fmt_size(min(shapes, key=lambda s: min(s[-2:]))),
        side,
    )
    return side


def build_datasets(
    recipe: SegmentationRecipe,
    crop: int | None,
    valid_crop: Any = None,
    *,
    margin: int = 0,
    valid_input: Callable[[int], int] | None = None,
) -> TrainingData:
    """The recipe's training draws and validation samples.

    Args:
        recipe: the run's recipe.
        crop: training input patch size (None: whole images).
        valid_crop: the eval transform's centre crop for valid-padding models.
        margin: input minus output size of a valid-padding model; the output crop, not the
            input, is limited to the image size (the margin is mirrored context).
        valid_input: for a valid-padding model, the largest input length it accepts at or
            below a given length (a clamped crop plus margin need not be one).
    """
    if recipe.task == "regression":
        return _regression_datasets(recipe, crop)
    weight = {"w0": recipe.w0, "sigma": recipe.sigma} if recipe.loss == "weighted_ce" else None
    common = dict(target=recipe.target, weight_map=weight)
    masks = None
    if recipe.data is None:
        s = (recipe.synthetic_size,) * 2
        opts = dict(shape=s, style=recipe.synthetic_style, **common)
        train = SyntheticCellsDataset(recipe.synthetic_train, seed=recipe.seed, **opts)
        val = SyntheticCellsDataset(recipe.synthetic_val, seed=recipe.seed + 10_000, **opts)
        split = f"built-in synthetic cells: {len(train)} for training, {len(val)} for validation"
        shapes = [s]
    else:
        train, val, split, masks, shapes = _folder_data(recipe, common)
    if crop is not None:
        crop = clamp_crop(crop - margin, shapes) + margin
        if valid_input is not None:
            crop = valid_input(crop)
    train_tf, eval_tf, norm = build_transforms(recipe, crop, valid_crop)
    train.transform, val.transform = train_tf, eval_tf
    train.set_normalize(norm)
    val.set_normalize(norm)
    draws = RandomDraws(train, recipe.steps_per_epoch * recipe.batch_size, seed=recipe.seed)
    in_channels = int(val.sample(0, None)["image"].shape[0])
    return TrainingData(draws, val, in_channels, crop, split, masks)


def _folder_data(
    recipe: SegmentationRecipe, common: dict[str, Any]
) -> tuple[Any, Any, str, MaskSummary, list[tuple[int, ...]]]:
    """(train, val, split line, mask summary, training region shapes) of a data folder."""
    options = dict(
        spatial_dims=recipe.spatial_dims,
        num_classes=recipe.num_classes,
        mask_mode=recipe.mask_mode,
        seed=recipe.seed,
        channels=recipe.channels,
        **common,
    )
    data = FolderSegmentationDataset(recipe.data, **options)
    masks = data.validate()
    _check_foreground(masks, str(data.masks_dir))
    if recipe.val_data is not None:
        val = FolderSegmentationDataset(recipe.val_data, **options)
        _check_foreground(val.validate(), str(val.masks_dir))
        split = f"validation on --val-data {recipe.val_data} ({len(val)} images)"
        return data, val, split, masks, list(masks.shapes)
    n = len(data)
    if n < SPATIAL_SPLIT_BELOW:
        train_items, val_items, shapes = [], [], []
        for i, shape in enumerate(masks.shapes):
            tr, va, axis = spatial_split(shape, recipe.val_fraction)
            train_items.append((i, tr))
            val_items.append((i, va))
            shapes.append(
                tuple(len(range(*sl.indices(s))) for sl, s in zip(tr, shape, strict=True))
            )
        if n == 1:
            axis_name = _AXES.get(len(masks.shapes[0]), "")[axis]
            share = f"{recipe.val_fraction:.0%}"
            where = f"1 image split spatially: the last {share} of its {axis_name} axis"
        else:
            where = (
                f"{n} images split spatially: the last {recipe.val_fraction:.0%} of each "
                "image's longest axis"
            )
        split = f"{where} is held out for validation (training region {fmt_size(shapes[0])})"
        return data.select(train_items), data.select(val_items), split, masks, shapes
    tr_idx, va_idx = split_indices(n, recipe.val_fraction, recipe.seed)
    split = (
        f"{n} images split by image (seed {recipe.seed}): {len(tr_idx)} for training, "
        f"{len(va_idx)} held out for validation"
    )
    shapes = [masks.shapes[i] for i in tr_idx]
    train = data.select([(int(i), None) for i in tr_idx])
    return train, data.select([(int(i), None) for i in va_idx]), split, masks, shapes


def _check_foreground(masks: MaskSummary, where: str) -> None:
    if masks.empty == masks.files:
        raise DataError(
            f"{where}: every mask is background only (no pixel > 0); nothing to learn — "
            "check the masks or --mask-mode"
        )


def _regression_datasets(recipe: SegmentationRecipe, crop: int | None) -> TrainingData:
    train_aug, eval_aug, norm = build_transforms(recipe, crop)
    # regression data sets have no whole-image hook: normalise after augmentation, per sample
    train_tf = T.Compose([*train_aug.transforms, *([norm] if norm else [])])
    eval_tf = T.Compose([*eval_aug.transforms, *([norm] if norm else [])])
    if recipe.data is None:
        cfg.check_choice("synthetic_regression", recipe.synthetic_regression, SYNTHETIC_REGRESSION)
        cls = (
            SyntheticDepthDataset
            if recipe.synthetic_regression == "depth"
            else SyntheticDenoiseDataset
        )
        shape = (recipe.synthetic_size,) * 2
        train = cls(recipe.synthetic_train, shape=shape, seed=recipe.seed, transform=train_tf)
        val = cls(recipe.synthetic_val, shape=shape, seed=recipe.seed + 10_000, transform=eval_tf)
        split = f"built-in synthetic {recipe.synthetic_regression}: {len(train)} / {len(val)}"
    else:
        opts = dict(
            target_scale=recipe.target_scale, positive=recipe.output == "depth", seed=recipe.seed
        )
        train, val, split = _regression_split(
            FolderRegressionDataset, recipe, train_tf, eval_tf, opts
        )
    in_channels = int(val[0]["image"].shape[0])
    draws = RandomDraws(train, recipe.steps_per_epoch * recipe.batch_size, seed=recipe.seed)
    return TrainingData(draws, val, in_channels, crop, split, None)


def _regression_split(
    cls: type, recipe: SegmentationRecipe, train_tf: Any, eval_tf: Any, options: dict[str, Any]
) -> tuple[Dataset, Dataset, str]:
    """Regression folders: --val-data, or a seeded split of whole images."""
    from torch.utils.data import Subset

    train = cls(recipe.data, transform=train_tf, **options)
    train.validate()
    if recipe.val_data is not None:
        val = cls(recipe.val_data, transform=eval_tf, **options)
        val.validate()
        return train, val, f"validation on --val-data {recipe.val_data}"
    val = cls(recipe.data, transform=eval_tf, **options)
    tr_idx, va_idx = split_indices(len(train), recipe.val_fraction, recipe.seed)
    if len(tr_idx) == 0 or len(va_idx) == 0:
        raise DataError(
            f"{recipe.data}: {len(train)} image(s) cannot be split into train and "
            f"validation; add images or pass --val-data"
        )
    split = f"{len(train)} images: {len(tr_idx)} for training, {len(va_idx)} for validation"
    sub_train = Subset(train, tr_idx.tolist())
    sub_train.set_epoch = train.set_epoch  # type: ignore[attr-defined]
    return sub_train, Subset(val, va_idx.tolist()), split


def shapes_summary(shapes: list[tuple[int, ...]]) -> str:
    """``256×512`` or ``3 sizes, 64×64 to 512×512``."""
    unique = sorted(set(shapes), key=lambda s: int(np.prod(s)))
    if len(unique) == 1:
        return fmt_size(unique[0])
    return f"{len(unique)} sizes, {fmt_size(unique[0])} to {fmt_size(unique[-1])}"
