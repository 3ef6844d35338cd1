"""Paper reproduction on the ISBI 2012 EM stack (U-Net paper, Table 1 data).

Trains the paper configuration (valid convolutions, border-weighted cross-entropy, elastic
deformation, SGD momentum 0.99, overlap-tile inference) and the modern configuration (same
padding, batch norm, Dice+CE, AdamW) on slices 00-24 through the same API `unetkit train`
uses, then reports pixel error, Rand error and Dice on slices 25-29.

    python benchmarks/isbi2012.py --steps 300            # both configurations
    python benchmarks/isbi2012.py --only modern --steps 100

The data lives beside the checkout in ../shared/data/isbi2012 (see its README). The paper
trained for about 10 hours on a GPU; on a 2-core CPU this script's budget is far smaller,
so the numbers measure the pipeline at a fixed budget, not the paper's converged result.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetkit import config as cfg
from unetkit.data.datasets import FolderSegmentationDataset
from unetkit.segmentation.instances import rand_error
from unetkit.segmentation.metrics import dice, pixel_error
from unetkit.workflows import segment_train as R
from unetkit.workflows.segment import InferenceOptions, load_for_inference, predict_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"
TRAIN, TEST = range(0, 25), range(25, 30)


def split_folders(data: Path, root: Path) -> tuple[Path, Path]:
    """Symlinked train/ (00-24) and test/ (25-29) folders in the layout unetkit reads."""
    out = []
    for name, idx in (("train", TRAIN), ("test", TEST)):
        for sub in ("images", "masks"):
            (root / name / sub).mkdir(parents=True)
            for i in idx:
                (root / name / sub / f"slice{i:02d}.png").symlink_to(
                    data / sub / f"slice{i:02d}.png"
                )
        out.append(root / name)
    return out[0], out[1]


def evaluate(checkpoint: Path, test: Path, tile: int | None) -> dict[str, float]:
    """Membrane pixel error, Rand error of the cell regions, Dice of cells (class 1)."""
    model, meta = load_for_inference(checkpoint)
    data = FolderSegmentationDataset(test, target="semantic")
    scores = []
    for i in range(len(data)):
        s = data[i]
        pred = predict_image(model, s["image"].numpy(), meta, InferenceOptions(tile=tile))
        truth = s["mask"].numpy()
        cells_pred = ndimage.label(pred.labels == 1)[0]
        cells_true = ndimage.label(truth == 1)[0]
        scores.append(
            (
                pixel_error(pred.labels, truth),
                rand_error(cells_pred, cells_true),
                dice(pred.labels, truth, num_classes=2).mean,
            )
        )
    px, rand, d = np.mean(scores, axis=0)
    return {"pixel_error": px, "rand_error": rand, "dice": d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per configuration")
    ap.add_argument("--only", choices=["paper", "modern"])
    ap.add_argument("--out", type=Path, default=Path("runs/isbi2012"))
    args = ap.parse_args()
    configs = {
        # the paper: one 572->388 tile per step; the border weight map from membrane-separated cells
        "paper": R.make_recipe("paper", target="semantic", crop=388, batch_size=1),
        "modern": R.make_recipe(
            "modern",
            target="semantic",
            crop=256,
            batch_size=4,
            model_options={"channels": (32, 64, 128, 256, 512)},
        ),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train, test = split_folders(args.data, Path(tmp))
        for name, base in configs.items():
            if args.only and name != args.only:
                continue
            per_epoch = 25
            recipe = R.make_recipe(
                None,
                **{
                    **cfg.to_dict(base),
                    "data": str(train),
                    "val_data": str(test),
                    "samples_per_epoch": per_epoch * base.batch_size,
                    "epochs": max(1, args.steps // per_epoch),
                },
            )
            start = time.time()
            R.train(recipe, args.out / name, resume=False, progress=True)
            minutes = (time.time() - start) / 60
            scores = evaluate(
                args.out / name / "checkpoints" / "best.safetensors",
                test,
                tile=388 if name == "paper" else None,
            )
            rows.append((name, recipe.epochs * per_epoch, minutes, scores))
    print("\n| configuration | steps | train min | pixel error | Rand error | Dice (cells) |")
    print("|---|---|---|---|---|---|")
    for name, steps, minutes, s in rows:
        print(
            f"| {name} | {steps} | {minutes:.1f} | {s['pixel_error']:.4f} | "
            f"{s['rand_error']:.4f} | {s['dice']:.4f} |"
        )


if __name__ == "__main__":
    main()
