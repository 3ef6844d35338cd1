"""One annotated image: `unetkit train` with the defaults vs a classical baseline.

A user with one annotated fluorescence image of nuclei trains with
``unetkit train --data DIR`` (nothing else) and segments images of the same kind. This
benchmark builds such data (synthetic nuclei, 256×512, ~64 per image: touching blobs with
dim valleys between them, textured, on an uneven, vignetted background, with shot and
read noise, saved as 16-bit TIFF), trains on ONE image through the CLI, and scores held-out
images against Otsu threshold + distance-transform watershed (scikit-image; its two
parameters tuned on the same training image, so both methods see the same annotation).

    python benchmarks/one_image.py                           # the defaults
    python benchmarks/one_image.py --epochs 3                # a shorter budget
    python benchmarks/one_image.py --real IMAGE MASK         # a real annotated image

``--real`` takes one real annotated image (any 2-D image unetkit reads, and its instance
labels), cuts it in two halves across its longer side, trains on one half and scores the
other, then the other way round: two "one annotated image" runs on real pixels. The
DSB 2018 nuclei image StarDist ships (``stardist/data/images/img2d.tif`` and
``mask2d.tif`` in its wheel: ``pip download stardist==0.9.2 --no-deps``, then unzip) is
such an image.

Scores: foreground Dice, and instance AP@0.5 = TP / (TP + FP + FN) with one-to-one matching
at IoU > 0.5 (DSB 2018 / StarDist), averaged over the test images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import filters, measure, segmentation
from skimage.feature import peak_local_max

from unetkit.data.datasets import FolderSegmentationDataset
from unetkit.data.io import read_image, write_image
from unetkit.data.synthetic import synth_cells
from unetkit.segmentation.instances import instance_ap
from unetkit.segmentation.metrics import dice
from unetkit.workflows.segment import InferenceOptions, load_for_inference, predict_image

SHAPE = (256, 512)
NUCLEI = (60, 70)


def nuclei_image(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 image, instance labels): synthetic nuclei made harder than the built-in
    cells: a vignetted illumination (dim corners), a bright out-of-focus haze and a 12-bit
    camera offset, as wide-field fluorescence images have."""
    image, labels = synth_cells(SHAPE, seed=(7, seed), n_cells=NUCLEI)
    rng = np.random.default_rng([7, seed, 1])
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]] / np.array(SHAPE).reshape(2, 1, 1)
    centre = rng.uniform(0.3, 0.7, 2)
    vignette = 1.0 - 0.45 * ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    haze = ndimage.gaussian_filter(rng.random(SHAPE), 30)
    haze = 0.15 * (haze - haze.min()) / (np.ptp(haze) + 1e-9)
    signal = image * vignette + haze
    counts = 100 + 3000 * signal + rng.normal(0, 8, SHAPE)
    return np.clip(counts, 0, 4095).astype(np.uint16), labels


def write_folder(root: Path, seeds: range) -> Path:
    for s in seeds:
        image, labels = nuclei_image(s)
        write_image(root / "images" / f"nuclei_{s:02d}.tif", image)
        write_image(root / "masks" / f"nuclei_{s:02d}.tif", labels.astype(np.uint16))
    return root


def write_halves(root: Path, image_file: Path, mask_file: Path) -> list[tuple[Path, Path]]:
    """(train, test) folders for both halves of a real annotated image."""
    image, mask = read_image(image_file), read_image(mask_file)
    if image.shape[:2] != mask.shape[:2]:
        sys.exit(f"--real: {image_file} is {image.shape[:2]}, {mask_file} is {mask.shape[:2]}")
    axis = int(mask.shape[1] > mask.shape[0])
    cut = mask.shape[axis] // 2
    halves = [np.take(a, np.arange(0, cut), axis) for a in (image, mask)]
    halves = [halves, [np.take(a, np.arange(cut, a.shape[axis]), axis) for a in (image, mask)]]
    folders = []
    for k, (img, lab) in enumerate(halves):
        folder = root / f"half{k}"
        write_image(folder / "images" / "half.tif", img)
        write_image(folder / "masks" / "half.tif", lab.astype(np.uint16))
        folders.append(folder)
    return [(folders[0], folders[1]), (folders[1], folders[0])]


def otsu_watershed(image: np.ndarray, min_distance: int, smooth: float) -> np.ndarray:
    """Otsu threshold of the smoothed image, holes filled, then a watershed of the
    distance transform from its local maxima (peaks ``min_distance`` apart)."""
    smoothed = filters.gaussian(image.astype(np.float64), smooth)
    fg = ndimage.binary_fill_holes(smoothed > filters.threshold_otsu(smoothed))
    distance = ndimage.distance_transform_edt(fg)
    labels_fg = measure.label(fg)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=labels_fg)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    out = segmentation.watershed(-distance, markers, mask=fg)
    return measure.label(out > 0) if out.max() == 0 else out


def score(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    return dice(pred > 0, truth > 0, num_classes=2).per_class[1], instance_ap(pred, truth)


def tune_baseline(image: np.ndarray, truth: np.ndarray) -> tuple[int, float]:
    """The baseline's (min_distance, smoothing) with the best AP@0.5 on the training image."""
    grid = [(d, s) for d in (3, 4, 5, 7, 9) for s in (0.5, 1.0, 2.0)]
    return max(grid, key=lambda p: score(otsu_watershed(image, *p), truth)[1])


def train_and_score(
    train_dir: Path, test_dir: Path, run: Path, args: argparse.Namespace
) -> tuple[float, dict[str, list[tuple[float, float]]]]:
    """Train with the CLI's defaults on ``train_dir``; (minutes, {method: [(Dice, AP)]})."""
    cmd = [sys.executable, "-m", "unetkit.cli.main", "train", "--data", str(train_dir)]
    cmd += ["--out", str(run), "--no-progress"]
    for flag, value in (("--epochs", args.epochs), ("--steps-per-epoch", args.steps_per_epoch)):
        if value is not None:
            cmd += [flag, str(value)]
    start = time.time()
    if not args.score_only:
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    minutes = (time.time() - start) / 60
    model, meta = load_for_inference(run / "checkpoints" / "best.safetensors")
    train = FolderSegmentationDataset(train_dir, mask_mode="instances").sample(0, None)
    params = tune_baseline(train["image"][0].numpy(), train["instances"].numpy())
    test = FolderSegmentationDataset(test_dir, mask_mode="instances")
    rows: dict[str, list[tuple[float, float]]] = {"unetkit train (defaults)": [], BASELINE: []}
    for i in range(len(test)):
        s = test.sample(i, None)
        truth = s["instances"].numpy()
        pred = predict_image(model, s["image"].numpy(), meta, InferenceOptions()).instances
        rows["unetkit train (defaults)"].append(score(pred, truth))
        rows[BASELINE].append(score(otsu_watershed(s["image"][0].numpy(), *params), truth))
    print(f"baseline parameters (min_distance, smoothing) tuned on the training image: {params}")
    return minutes, rows


BASELINE = "Otsu + distance watershed (tuned on the training image)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/one_image"))
    ap.add_argument("--test-images", type=int, default=4)
    ap.add_argument("--real", nargs=2, type=Path, metavar=("IMAGE", "MASK"))
    ap.add_argument("--epochs", type=int, help="passed to unetkit train (default: its own)")
    ap.add_argument("--steps-per-epoch", type=int, help="passed to unetkit train")
    ap.add_argument(
        "--score-only", action="store_true", help="score the run already in --out (no training)"
    )
    args = ap.parse_args()
    if args.real:
        pairs = write_halves(args.out, *args.real)
        runs = [args.out / f"run_half{k}" for k in range(len(pairs))]
    else:
        pairs = [
            (
                write_folder(args.out / "train", range(0, 1)),
                write_folder(args.out / "test", range(100, 100 + args.test_images)),
            )
        ]
        runs = [args.out / "run"]
    total: dict[str, list[tuple[float, float]]] = {}
    for (train_dir, test_dir), run in zip(pairs, runs, strict=True):
        minutes, rows = train_and_score(train_dir, test_dir, run, args)
        print(f"\ntrained on {train_dir} in {minutes:.1f} min; scored on {test_dir}")
        print("| method | Dice (fg) | AP@0.5 |\n|---|---|---|")
        for name, values in rows.items():
            d, a = np.mean(values, axis=0)
            print(f"| {name} | {d:.3f} | {a:.3f} |")
            total.setdefault(name, []).extend(values)
    if len(pairs) > 1:
        print("\nboth directions")
        print("| method | Dice (fg) | AP@0.5 |\n|---|---|---|")
        for name, values in total.items():
            d, a = np.mean(values, axis=0)
            print(f"| {name} | {d:.3f} | {a:.3f} |")


if __name__ == "__main__":
    main()
