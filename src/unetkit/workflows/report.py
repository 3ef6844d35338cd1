"""Held-out evaluation of a run trained on the built-in synthetic cells."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from unetkit.data.datasets import SyntheticCellsDataset
from unetkit.data.io import write_image
from unetkit.regression import SyntheticDenoiseDataset, SyntheticDepthDataset
from unetkit.segmentation.postprocess import write_object_table_csv
from unetkit.workflows.pictures import evaluation_picture, regression_picture
from unetkit.workflows.segment import (
    Prediction,
    evaluate_dataset,
    evaluate_regression,
    load_for_inference,
)
from unetkit.workflows.segment_recipe import SegmentationRecipe

HELDOUT_SEED_OFFSET = 20_000  # train uses seed, validation seed + 10_000
HELDOUT_IMAGES = 8
SAMPLE_PICTURES = 3  # overlays written to samples/


def heldout_report(recipe: SegmentationRecipe, run_dir: str | os.PathLike) -> dict[str, float]:
    """Evaluate ``best.safetensors`` on freshly generated images no run has seen.

    Writes ``heldout.csv`` (per image) and ``samples/*_overlay.png`` (input | prediction |
    truth side by side); returns mean foreground Dice, IoU, instance AP at IoU 0.5 and the
    relative cell-count error.
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

    drawn: list[str] = []

    def draw(sample: dict, pred: Prediction) -> None:
        if len(drawn) < SAMPLE_PICTURES:
            drawn.append(sample["name"])
            picture = evaluation_picture(sample, pred)
            write_image(run / "samples" / f"{sample['name']}_overlay.png", picture)

    rows, means = evaluate_dataset(
        model, meta, (data[i] for i in range(len(data))), on_prediction=draw
    )
    for row in rows:
        row["count_error"] = abs(row["n_instances_pred"] - row["n_instances_true"]) / max(
            row["n_instances_true"], 1
        )
    write_object_table_csv(rows, run / "heldout.csv")
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
    ``heldout.csv`` and pictures of the first predictions in ``samples/``: input |
    prediction | truth, depth maps with a colour bar in metres on one shared scale."""

    cls = (
        SyntheticDepthDataset if recipe.synthetic_regression == "depth" else SyntheticDenoiseDataset
    )
    data = cls(
        HELDOUT_IMAGES, shape=(recipe.synthetic_size,) * 2, seed=recipe.seed + HELDOUT_SEED_OFFSET
    )
    drawn: list[str] = []

    def draw(sample: dict, pred: np.ndarray) -> None:
        if len(drawn) < SAMPLE_PICTURES:
            picture = regression_picture(
                sample["image"], pred, sample["target"], output=recipe.output
            )
            drawn.append(sample["name"])
            write_image(run / "samples" / f"{sample['name']}_prediction.png", picture)

    samples = (data[i] for i in range(len(data)))
    rows, means = evaluate_regression(model, meta, samples, on_prediction=draw)
    write_object_table_csv(rows, run / "heldout.csv")
    keys = ("abs_rel", "rmse", "delta1") if recipe.output == "depth" else ("mae", "psnr")
    return {k: means[k] for k in keys}
