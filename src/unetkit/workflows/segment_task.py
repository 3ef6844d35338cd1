"""What a segmentation (or dense regression) run optimises and reports: the recipe's loss
on (logits, batch), valid-padding aware, and its validation metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unetkit.errors import ConfigError
from unetkit.nn.sampling import center_crop
from unetkit.regression import RegressionMetrics, build_regression_loss
from unetkit.segmentation.losses import build_loss
from unetkit.segmentation.metrics import dice, pixel_error
from unetkit.training.tasks import SupervisedTask

if TYPE_CHECKING:  # typing only: the recipe module imports this one
    from unetkit.workflows.segment_recipe import SegmentationRecipe

TARGET_CHANNELS = {"semantic": None, "separated": 2, "boundary": 3}  # None: num_classes


def target_channels(recipe: SegmentationRecipe) -> int:
    """Output channels the recipe's target needs (1 for regression: the data decides)."""
    if recipe.task == "regression":
        return 1  # overridden by the data's target channels in build_model's caller
    return TARGET_CHANNELS[recipe.target] or recipe.num_classes


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


def regression_task(recipe: SegmentationRecipe) -> Any:
    """Loss and metrics of a regression recipe (silog/L1/L2; AbsRel, RMSE, δ or PSNR)."""
    metrics = RegressionMetrics(recipe.output)
    loss = build_regression_loss(recipe.loss, output=recipe.output)
    return SupervisedTask(loss, metrics, monitor=metrics.monitor, mode=metrics.mode)


def segmentation_task(recipe: SegmentationRecipe) -> SupervisedTask:
    """Loss and metrics of a segmentation recipe; the best checkpoint has the best
    validation foreground Dice."""
    if recipe.target == "semantic" and recipe.num_classes < 2:
        raise ConfigError("num_classes must be at least 2 (background + one class)")
    return SupervisedTask(
        SegmentationLoss(recipe),
        SegmentationMetrics(target_channels(recipe)),
        monitor="val/fg_dice",
        mode="max",
    )
