"""`unetkit evaluate`: a metrics table for a checkpoint on a labelled folder."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unetkit.cli import flags as F
from unetkit.cli.predict import add_inference_flags, options_from_args
from unetkit.data.datasets import FolderSegmentationDataset
from unetkit.data.io import write_image
from unetkit.data.masks import MASK_MODES
from unetkit.errors import ConfigError
from unetkit.outputs import output_file, output_folder
from unetkit.regression import FolderRegressionDataset
from unetkit.segmentation.postprocess import write_object_table_csv
from unetkit.workflows.pictures import evaluation_picture, regression_picture
from unetkit.workflows.segment import (
    evaluate_dataset,
    evaluate_regression,
    load_for_inference,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a labelled folder",
        description="Predict every image of DATA (images/ + masks/) and report Dice, IoU, "
        "pixel error, Rand error (ISBI 2012: foreground-restricted, 1 - Rand F-score) and "
        "DSB2018 AP@0.5. Objects are the labels of instance masks; of binary or class masks, "
        "the connected components of the foreground (ISBI: cells are the regions between "
        "membranes). It says how it read the masks.",
    )
    p.add_argument("checkpoint")
    p.add_argument(
        "--data",
        required=True,
        help="folder with images/ and masks/ (targets/ for regression models)",
    )
    p.add_argument("--num-classes", type=F.positive_int, default=2)
    p.add_argument("--mask-mode", default="auto", choices=MASK_MODES)
    p.add_argument("--csv", help="also write per-image metrics to this CSV")
    p.add_argument(
        "--pictures",
        metavar="DIR",
        help="also write <image>_comparison.png per image into DIR: input | prediction | "
        "truth side by side (volumes: maximum projections; depth: colour bars in metres)",
    )
    add_inference_flags(p)
    p.set_defaults(run=run)


def data_inputs(data: str) -> list[Path]:
    """The folders and files evaluate reads in ``data``: an output onto any of them (the
    CSV onto an image, pictures into masks/) would destroy or pollute the data set."""
    root = Path(data)
    found: list[Path] = [root]
    for sub in ("images", "masks", "targets"):
        if (root / sub).is_dir():
            found += [root / sub, *(root / sub).iterdir()]
    return found


def run(args: argparse.Namespace) -> int:
    inputs = [args.checkpoint, *data_inputs(args.data)]
    if args.csv:
        output_file(args.csv, flag="--csv", inputs=inputs)
    if args.pictures:
        output_folder(args.pictures, flag="--pictures", inputs=inputs)
    model, meta = load_for_inference(args.checkpoint)
    if meta.get("task") == "regression":
        data = FolderRegressionDataset(
            args.data,
            target_scale=meta.get("target_scale", 1.0),
            positive=meta.get("output") == "depth",
        )
        data.validate()
        rows, means = evaluate_regression(
            model,
            meta,
            (data[i] for i in range(len(data))),
            options_from_args(args),
            on_prediction=_drawer(args.pictures, meta),
        )
    else:
        trained = meta.get("num_classes", args.num_classes)
        if args.num_classes > trained:
            raise ConfigError(
                f"--num-classes {args.num_classes}: {args.checkpoint} predicts {trained} "
                f"classes; scores for classes it cannot predict would be made up"
            )
        data = FolderSegmentationDataset(
            args.data,
            num_classes=args.num_classes,
            mask_mode=args.mask_mode,
            target="semantic",
            spatial_dims=getattr(model, "dims", 2),
        )
        data.validate()
        rows, means = evaluate_dataset(
            model,
            meta,
            (data[i] for i in range(len(data))),
            options_from_args(args),
            num_classes=args.num_classes,
            on_prediction=_drawer(args.pictures, meta),
        )
    if args.csv:
        write_object_table_csv(rows, Path(args.csv))
    if meta.get("task") != "regression":
        print(describe_truth(rows, args.mask_mode))
    width = max(len(k) for k in means)
    print(f"{'metric'.ljust(width)}  mean over {len(rows)} image(s)")
    for k, v in means.items():
        print(f"{k.ljust(width)}  {v:.4f}")
    if "rand_error" in means:
        print("rand_error: ISBI 2012 foreground-restricted Rand error (1 - Rand F-score)")
    return 0


def _drawer(folder: str | None, meta: dict) -> Callable[[dict, Any], None] | None:
    """A callback writing ``<name>_comparison.png`` into ``folder`` (None: no pictures)."""
    if folder is None:
        return None

    def draw(sample: dict, prediction: Any) -> None:
        if meta.get("task") == "regression":
            output = meta.get("output", "depth")
            picture = regression_picture(
                sample["image"], prediction, sample["target"], output=output
            )
        else:
            picture = evaluation_picture(sample, prediction)
        write_image(Path(folder) / f"{sample['name']}_comparison.png", picture)

    return draw


def describe_truth(rows: list[dict], mask_mode: str) -> str:
    """One line: how the masks were read and where the objects of AP/Rand came from."""
    labelled = sum(r.get("truth_objects") == "labels" for r in rows)
    components = len(rows) - labelled
    objects = sum(r.get("n_instances_true", 0) for r in rows) / max(len(rows), 1)
    parts = []
    if labelled:
        parts.append(f"{labelled} instance-label mask(s)")
    if components:
        parts.append(
            f"{components} binary/class mask(s) whose objects are the connected components "
            "of the foreground (as ISBI 2012: cells are the regions between membranes)"
        )
    return f"masks (--mask-mode {mask_mode}): {'; '.join(parts)}; {objects:.1f} objects/image"
