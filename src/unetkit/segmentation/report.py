"""Held-out evaluation of a run trained on the built-in synthetic cells."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from unetkit.data.datasets import SyntheticCellsDataset
from unetkit.data.io import write_image
from unetkit.segmentation.pipeline import (
    evaluate_dataset,
    load_for_inference,
    overlay,
    predict_image,
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
