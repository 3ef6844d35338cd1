"""Paper reproduction on the ISBI 2012 EM stack (U-Net paper, Table 1 data).

Trains the paper configuration (valid convolutions, border-weighted cross-entropy, elastic
deformation, SGD momentum 0.99, overlap-tile inference) and/or the modern configuration
(same padding, batch norm, Dice+CE, AdamW, zoom/rotation/elastic augmentation) through the
API `unetkit train` uses, for exactly ``--steps`` optimiser steps each:

- training slices 00-19; model selection (best checkpoint) on training slices 20-24;
- test slices 25-29, never seen by training or by model selection.

    python benchmarks/isbi2012.py --steps 300                  # both configurations
    python benchmarks/isbi2012.py --only modern --steps 100
    python benchmarks/isbi2012.py --score-only --out runs/isbi2012   # rescore, no training

``--data`` defaults to ../shared/data/isbi2012 beside the checkout (see its README);
relative paths are taken from the current directory. Scores on slices 25-29, two ways:

- the challenge's definitions (``segmentation.isbi``, the ISBI 2012 leaderboard the paper
  reports), on the predicted cell probability (1 - membrane probability) of the test stack,
  thresholded at 0.0, 0.1, ..., 0.9 as the challenge's Fiji script does:
  challenge pixel error = 1 - the maximal F-score of pixel similarity (cell class);
  challenge Rand error = 1 - the maximal F-score of the foreground-restricted Rand index,
  cells = 4-connected components of the thresholded map and of the truth's cell pixels;
  counts summed over the 5 slices, each metric at its own best threshold;
- on one argmax segmentation (no threshold chosen), mean over the slices:
  argmax pixel error = fraction of pixels whose membrane/cell label differs from the truth;
  argmax Rand error = 1 - F-score of the foreground-restricted Rand index (pairs of
  truth-cell pixels), cells = connected components of the predicted and of the true cell
  class; Dice of the cell class.

The paper's 0.0611 pixel error and 0.0382 Rand error are the challenge's definitions on its
hidden test stack after about 10 GPU hours; a 2-core CPU budget is far smaller, so the
table says what each budget reaches.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetkit import config as cfg
from unetkit.data.datasets import FolderSegmentationDataset
from unetkit.formats.checkpoint import read_metadata
from unetkit.inference import TileOptions
from unetkit.segmentation.instances import rand_error
from unetkit.segmentation.isbi import isbi2012_errors
from unetkit.segmentation.metrics import dice, pixel_error
from unetkit.workflows import segment_train as R
from unetkit.workflows.segment import InferenceOptions, load_for_inference, predict_image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "isbi2012"
TRAIN, SELECT, TEST = range(0, 20), range(20, 25), range(25, 30)
PAPER = {"pixel_error": 0.0611, "rand_error": 0.0382}
STEPS_PER_EPOCH = 25  # validation (model selection) every 25 steps


def split_folders(data: Path, root: Path) -> dict[str, Path]:
    """Symlinked train/ select/ test/ folders in the layout unetkit reads."""
    out = {}
    for name, idx in (("train", TRAIN), ("select", SELECT), ("test", TEST)):
        for sub in ("images", "masks"):
            folder = root / name / sub
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                link = folder / f"slice{i:02d}.png"
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(data / sub / f"slice{i:02d}.png")
        out[name] = root / name
    return out


def check_data(data: Path) -> Path:
    """The data folder, absolute; exits with one line when a slice is missing."""
    data = data.expanduser().resolve()
    missing = [
        f"{sub}/slice{i:02d}.png"
        for sub in ("images", "masks")
        for i in range(30)
        if not (data / sub / f"slice{i:02d}.png").is_file()
    ]
    if missing:
        sys.exit(
            f"isbi2012.py: error: --data {data}: {len(missing)} of 60 files missing "
            f"(e.g. {missing[0]}); expected images/ and masks/ slice00-29.png"
        )
    return data


def evaluate(checkpoint: Path, test: Path, tile: int | None) -> dict[str, float]:
    """The challenge's errors on the cell probability of the test stack; the argmax
    segmentation's pixel error, Rand error of the cell regions and Dice of cells (class 1)."""
    model, meta = load_for_inference(checkpoint)
    data = FolderSegmentationDataset(test, target="semantic")
    scores, cell_probability, truths = [], [], []
    options = InferenceOptions(TileOptions(tile=tile))
    for i in range(len(data)):
        s = data.sample(i, None)
        pred = predict_image(model, s["image"].numpy(), meta, options)
        truth = s["mask"].numpy()
        cell_probability.append(pred.probabilities[1])  # class 1 = cell interior
        truths.append(truth)
        cells_pred = ndimage.label(pred.labels == 1)[0]
        cells_true = ndimage.label(truth == 1)[0]
        scores.append(
            (
                pixel_error(pred.labels, truth),
                rand_error(cells_pred, cells_true),
                dice(pred.labels, truth, num_classes=2).per_class[1],
            )
        )
    px, rand, d = np.mean(scores, axis=0)
    challenge = isbi2012_errors(cell_probability, truths)
    return {
        "challenge_pixel_error": challenge.pixel_error,
        "challenge_pixel_threshold": challenge.pixel_threshold,
        "challenge_rand_error": challenge.rand_error,
        "challenge_rand_threshold": challenge.rand_threshold,
        "pixel_error": px,
        "rand_error": rand,
        "dice": d,
    }


def recipes(steps: int, folders: dict[str, Path]) -> dict[str, R.SegmentationRecipe]:
    """Both configurations with exactly ``steps`` optimiser steps."""
    per_epoch = min(STEPS_PER_EPOCH, steps)
    budget = dict(
        data=str(folders["train"]),
        val_data=str(folders["select"]),
        steps_per_epoch=per_epoch,
        epochs=math.ceil(steps / per_epoch),
        max_steps=steps,
    )
    return {
        # the paper: one 572->388 tile per step; the border weight map from membrane-separated cells
        "paper": R.make_recipe("paper", target="semantic", crop=388, batch_size=1, **budget),
        "modern": R.make_recipe("modern", target="semantic", crop=256, batch_size=4, **budget),
    }


def read_run(run: Path) -> tuple[Path, int | str, str, int | str]:
    """An existing run folder's best checkpoint, the steps it trained, its training minutes
    and the best checkpoint's epoch."""
    checkpoint = run / "checkpoints" / "best.safetensors"
    if not checkpoint.is_file():
        sys.exit(f"isbi2012.py: error: --score-only: {checkpoint} does not exist")
    training = read_metadata(checkpoint).get("training", {})
    steps, minutes = training.get("step", "?"), ""
    if (run / "metrics.csv").is_file():  # the trainer logs each epoch's step and seconds
        with open(run / "metrics.csv", newline="") as f:
            epochs = list(csv.DictReader(f))
        seconds = [float(r["seconds"]) for r in epochs if r.get("seconds")]
        minutes = f"{sum(seconds) / 60:.1f}" if seconds else ""
        steps = epochs[-1].get("step") or steps if epochs else steps
    return checkpoint, steps, minutes, training.get("epoch", "?")


def score_runs(data: Path, out: Path, only: str | None) -> list[tuple]:
    """Rows for the runs already in ``out`` (its ``paper/`` and/or ``modern/``), scored
    without training; nothing is written into ``out``."""
    names = [only] if only else [n for n in ("paper", "modern") if (out / n).is_dir()]
    if not names:
        sys.exit(f"isbi2012.py: error: --score-only: {out} holds no paper/ or modern/ run")
    rows = []
    with tempfile.TemporaryDirectory(prefix="isbi2012-") as tmp:
        test = split_folders(data, Path(tmp))["test"]
        for name in names:
            checkpoint, step, minutes, epoch = read_run(out / name)
            scores = evaluate(checkpoint, test, tile=388 if name == "paper" else None)
            rows.append((name, step, minutes, epoch, scores))
    return rows


def train_and_score(data: Path, out: Path, steps: int, only: str | None) -> list[tuple]:
    """Train each configuration for exactly ``steps`` steps, then score it."""
    folders = split_folders(data, out.resolve() / "data")
    rows = []
    for name, recipe in recipes(steps, folders).items():
        if only and name != only:
            continue
        print(f"{name}: {cfg.to_json(recipe)}", flush=True)
        start = time.time()
        result = R.train(recipe, out / name, resume=False, progress=True)
        minutes = f"{(time.time() - start) / 60:.1f}"
        scores = evaluate(
            out / name / "checkpoints" / "best.safetensors",
            folders["test"],
            tile=388 if name == "paper" else None,
        )
        rows.append((name, result.step, minutes, result.best_epoch, scores))
    return rows


def print_table(rows: list[tuple]) -> None:
    print("\nslices 00-19 train, 20-24 select the checkpoint, 25-29 test")
    print(
        "challenge = 1 - maximal F-score over thresholds 0.0-0.9 of the cell probability "
        "(ISBI 2012 leaderboard); argmax = one segmentation, mean over slices"
    )
    head = (
        "configuration", "steps", "train min", "best epoch", "challenge pixel error",
        "challenge Rand error", "argmax pixel error", "argmax Rand error", "Dice (cells)",
    )  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, steps, minutes, best, s in rows:
        print(
            f"| {name} | {steps} | {minutes} | {best} | "
            f"{s['challenge_pixel_error']:.4f} (t={s['challenge_pixel_threshold']:.1f}) | "
            f"{s['challenge_rand_error']:.4f} (t={s['challenge_rand_threshold']:.1f}) | "
            f"{s['pixel_error']:.4f} | {s['rand_error']:.4f} | {s['dice']:.4f} |"
        )
    print(
        f"| paper (hidden test set, ~10 GPU hours) | | | | {PAPER['pixel_error']} | "
        f"{PAPER['rand_error']} | | | |"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help=f"default {DATA}")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per configuration")
    ap.add_argument("--only", choices=["paper", "modern"])
    ap.add_argument("--out", type=Path, default=Path("runs/isbi2012"))
    ap.add_argument(
        "--score-only",
        action="store_true",
        help="score the runs already in --out (paper/, modern/) on slices 25-29; no training",
    )
    args = ap.parse_args(argv)
    if args.steps < 1:
        sys.exit(f"isbi2012.py: error: --steps {args.steps}: need at least 1")
    data = check_data(args.data)
    if args.score_only:
        rows = score_runs(data, args.out, args.only)
    else:
        rows = train_and_score(data, args.out, args.steps, args.only)
    print_table(rows)


if __name__ == "__main__":
    main()
