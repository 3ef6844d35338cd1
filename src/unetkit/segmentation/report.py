"""Held-out evaluation of a run trained on the built-in synthetic cells."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from unetkit.data.datasets import SyntheticCellsDataset
from unetkit.data.io import write_image
from unetkit.segmentation.pipeline import (
    evaluate_dataset,
    evaluate_regression,
    load_for_inference,
    overlay,
    predict_image,
    predict_regression,
)
from unetkit.segmentation.postprocess import write_object_table_csv
from unetkit.segmentation.recipe import SegmentationRecipe

HELDOUT_SEED_OFFSET = 20_000  # train uses seed, validation seed + 10_000
HELDOUT_IMAGES = 8


def heldout_report(recipe: SegmentationRecipe, run_dir: str | os.PathLike) -> dict[str, float]:
    """Evaluate ``best.safetensors`` on freshly generated images no run has seen.

    Writes ``heldout.csv`` (per image) and ``samples/*_overlay.png``; returns mean
    foreground Dice, IoU, instance AP at IoU 0.5 and the relative cell-count error.
    """
    run = Path(run_dir)
    model, meta = load_for_inference(run / "checkpoints" / "best.safetensors")
    if recipe.task == "regression":
        return _heldout_regression(recipe, run, model, meta)
    data = SyntheticCellsDataset(
        HELDOUT_IMAGES,
        shape=(recipe.synthetic_size,) * 2,
        style=recipe.synthetic_style,
        seed=recipe.seed + HELDOUT_SEED_OFFSET,
        target="semantic",
    )
    rows, means = evaluate_dataset(model, meta, (data[i] for i in range(len(data))))
    for row in rows:
        row["count_error"] = abs(row["n_instances_pred"] - row["n_instances_true"]) / max(
            row["n_instances_true"], 1
        )
    write_object_table_csv(rows, run / "heldout.csv")
    for i in range(3):
        s = data[i]
        image = s["image"].numpy()
        pred = predict_image(model, image, meta)
        write_image(run / "samples" / f"{s['name']}_overlay.png", overlay(image, pred.instances))
    return {
        "dice": means["dice_mean"],
        "iou": means["iou_mean"],
        "ap_50": means["ap_50"],
        "count_error": float(np.mean([r["count_error"] for r in rows])),
    }


def _heldout_regression(
    recipe: SegmentationRecipe, run: Path, model: torch.nn.Module, meta: dict
) -> dict[str, float]:
    """Depth (AbsRel, RMSE, δ<1.25) or restoration (MAE, PSNR) metrics on unseen scenes,
    ``heldout.csv`` and colour pictures of the first predictions in ``samples/``."""
    from unetkit.regression import SyntheticDenoiseDataset, SyntheticDepthDataset
    from unetkit.regression.io import colorize

    cls = (
        SyntheticDepthDataset if recipe.synthetic_regression == "depth" else SyntheticDenoiseDataset
    )
    data = cls(
        HELDOUT_IMAGES, shape=(recipe.synthetic_size,) * 2, seed=recipe.seed + HELDOUT_SEED_OFFSET
    )
    samples = [data[i] for i in range(len(data))]
    rows, means = evaluate_regression(model, meta, samples)
    write_object_table_csv(rows, run / "heldout.csv")
    for s in samples[:3]:
        pred = predict_regression(model, s["image"].numpy(), meta)
        picture = (
            colorize(pred[0])
            if recipe.output == "depth"
            else (np.clip(pred[0], 0, 1) * 255).astype(np.uint8)
        )
        write_image(run / "samples" / f"{s['name']}_prediction.png", picture)
    keys = ("abs_rel", "rmse", "delta1") if recipe.output == "depth" else ("mae", "psnr")
    return {k: means[k] for k in keys}
