"""`unetkit train`: train a segmentation model on a folder, or on built-in synthetic cells."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from unetkit._atomic import atomic_write_text
from unetkit.cli import flags as F
from unetkit.cli.folds import add_folds_flag, run_folds
from unetkit.cli.train_config import VALUE_FLAGS, recipe_from_args
from unetkit.data.datasets import TARGETS
from unetkit.data.io import parse_channels
from unetkit.data.masks import MASK_MODES
from unetkit.data.transforms import Normalize
from unetkit.errors import ConfigError
from unetkit.outputs import output_folder
from unetkit.regression.losses import LOSSES as REGRESSION_LOSSES
from unetkit.regression.losses import OUTPUTS as REGRESSION_OUTPUTS
from unetkit.runlock import check_same_run, run_lock
from unetkit.runtime import PRECISIONS
from unetkit.segmentation.losses import LOSSES as SEGMENTATION_LOSSES
from unetkit.training import distributed
from unetkit.training.optim import OPTIMIZERS, SCHEDULERS
from unetkit.workflows import segment_train as R
from unetkit.workflows.report import heldout_report
from unetkit.workflows.segment_data import SYNTHETIC_REGRESSION

# recipe defaults, for help texts (the flags themselves default to None: --recipe and
# --config come first, so a flag only overrides what is given)
_DEFAULTS = R.SegmentationRecipe()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a segmentation model (built-in synthetic cells without --data)",
        description="Train a U-Net (or any registered model) for segmentation. Options come "
        "from --recipe, then --config (TOML), then the flags. The run directory gets the "
        "resolved config, checkpoints, metrics.csv and curves.png; an interrupted run "
        "resumes when started again with the same --out.",
    )
    _add_run_flags(p)
    _add_data_flags(p.add_argument_group("data"))
    _add_augmentation_flags(p.add_argument_group("normalisation and augmentation"))
    _add_model_flags(p.add_argument_group("model"))
    _add_budget_flags(p.add_argument_group("budget"))
    _add_optimisation_flags(p.add_argument_group("loss and optimisation"))
    # a --config value is checked by the parser of the flag of the same name (one rule each)
    checks = {a.dest: a.type for a in p._actions if a.type is not None and a.dest in VALUE_FLAGS}
    p.set_defaults(run=run, config_checks=checks)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the run goes, what it starts from, and how it resumes."""
    p.add_argument("--out", default=None, help="run directory (default runs/<time>)")
    p.add_argument("--config", help="TOML file with recipe fields (see README)")
    p.add_argument(
        "--recipe",
        choices=sorted(R.PRESETS),
        help=f"named recipe: {' | '.join(R.PRESETS)} (default: the modern defaults)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="the README demo: --recipe demo, then evaluation on held-out images",
    )
    p.add_argument(
        "--task",
        choices=R.TASKS,
        help="regression: continuous targets (depth, restoration) from targets/",
    )
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an old run")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start the run in --out over (its checkpoints are replaced), e.g. with new data",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_folds_flag(p)


def _add_data_flags(g: argparse._ArgumentGroup) -> None:
    """Which data, how it is read, and what the model learns from it."""
    g.add_argument(
        "--data",
        help="folder with images/ and masks/ (or targets/ for "
        "regression); default: built-in synthetic data",
    )
    g.add_argument("--val-data", help="separate validation folder")
    g.add_argument(
        "--val-fraction",
        type=F.finite_float(0, 1, lo_open=True, hi_open=True),
        help="held out for validation without --val-data: whole images, or a strip of each "
        f"image when there are fewer than 5 (default {_DEFAULTS.val_fraction:g})",
    )
    g.add_argument(
        "--channels",
        type=parse_channels,
        help="image channels to train on, in order, e.g. 1,0 (cytoplasm, nucleus); "
        "predict then reads inputs the same way; default: all channels",
    )
    g.add_argument(
        "--pixel-size",
        type=F.positive_float,
        help="µm per pixel of the training images (default: what the files state); "
        "recorded so `predict --pixel-size` can rescale other magnifications",
    )
    g.add_argument(
        "--spatial-dims",
        type=int,
        choices=R.SPATIAL_DIMS,
        help="3: volumes (multi-page TIFF, NIfTI) and a 3D model",
    )
    g.add_argument(
        "--num-classes",
        type=F.positive_int,
        help=f"classes in the masks (default {_DEFAULTS.num_classes})",
    )
    g.add_argument("--mask-mode", choices=MASK_MODES)
    g.add_argument(
        "--target",
        choices=TARGETS,
        help=f"{' | '.join(TARGETS)} (default {_DEFAULTS.target}); boundary learns "
        "background/interior/boundary -> instances",
    )
    g.add_argument(
        "--output",
        choices=REGRESSION_OUTPUTS,
        help="regression output: depth (log-depth network, silog loss) | linear",
    )
    g.add_argument(
        "--target-scale",
        type=F.positive_float,
        help="regression: multiply integer target files, e.g. 1/256 for KITTI PNG",
    )
    g.add_argument(
        "--synthetic-regression",
        choices=SYNTHETIC_REGRESSION,
        help="built-in regression data: rendered depth scenes or denoising",
    )


def _add_augmentation_flags(g: argparse._ArgumentGroup) -> None:
    """Intensity normalisation, the training patch and its augmentation."""
    g.add_argument(
        "--normalize",
        choices=(*Normalize.MODES, "none"),
        help=f"per-image intensity normalisation (default {_DEFAULTS.normalize})",
    )
    low, high = _DEFAULTS.norm_percentiles
    g.add_argument(
        "--norm-percentiles",
        type=F.finite_float(0, 100),
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="percentile normalisation: these percentiles map to 0 and 1 "
        f"(default {low:g} {high:g})",
    )
    g.add_argument(
        "--crop",
        type=F.positive_int,
        help=f"training patch (output) size (default {_DEFAULTS.crop})",
    )
    g.add_argument("--no-elastic", action="store_true", help="disable elastic deformation")
    g.add_argument(
        "--no-affine", action="store_true", help="disable zoom and rotation augmentation"
    )


def _add_model_flags(g: argparse._ArgumentGroup) -> None:
    """The registered model, its preset and config overrides."""
    g.add_argument(
        "--model", help=f"registered model name (see `unetkit models`; default {_DEFAULTS.model})"
    )
    g.add_argument("--preset", help="model preset, e.g. paper")
    g.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, e.g. channels=(16,32,64) (repeatable)",
    )


def _add_budget_flags(g: argparse._ArgumentGroup) -> None:
    """How long the run trains: epochs of a fixed number of optimiser steps."""
    g.add_argument("--epochs", type=F.positive_int, help=f"(default {_DEFAULTS.epochs})")
    g.add_argument("--batch-size", type=F.positive_int, help=f"(default {_DEFAULTS.batch_size})")
    g.add_argument(
        "--steps-per-epoch",
        type=F.positive_int,
        help="optimiser steps per epoch, whatever the number of images "
        f"(default {_DEFAULTS.steps_per_epoch})",
    )
    g.add_argument(
        "--samples-per-epoch",
        type=F.positive_int,
        help="older spelling: steps = samples / batch size",
    )
    g.add_argument("--max-steps", type=F.positive_int, help="stop after this many optimiser steps")
    g.add_argument(
        "--early-stopping",
        type=F.positive_int,
        metavar="EPOCHS",
        help="stop when validation has not improved for EPOCHS epochs",
    )


def _add_optimisation_flags(g: argparse._ArgumentGroup) -> None:
    """Loss, optimiser, schedule, precision and the data loader."""
    g.add_argument(
        "--loss",
        choices=(*SEGMENTATION_LOSSES, *REGRESSION_LOSSES),
        help=f"segmentation: {' | '.join(SEGMENTATION_LOSSES)} (default {_DEFAULTS.loss}); "
        f"regression: {' | '.join(REGRESSION_LOSSES)} (silog: scale-invariant log)",
    )
    g.add_argument(
        "--w0", type=F.nonnegative_float, help="border weight w0 (weighted_ce; paper 10)"
    )
    g.add_argument("--sigma", type=F.positive_float, help="border weight sigma in px (paper 5)")
    g.add_argument("--lr", type=F.positive_float, help=f"(default {_DEFAULTS.lr:g})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default {_DEFAULTS.optimizer})")
    g.add_argument("--scheduler", choices=SCHEDULERS, help=f"(default {_DEFAULTS.scheduler})")
    g.add_argument("--precision", choices=PRECISIONS, help=f"(default {_DEFAULTS.precision})")
    g.add_argument("--grad-accum", type=F.positive_int)
    g.add_argument("--num-workers", type=F.nonnegative_int)
    g.add_argument("--seed", type=F.nonnegative_int)


# recipe fields that define a run: a re-run that changes one of them is another run
RUN_IDENTITY = (
    "data",
    "val_data",
    "channels",
    "task",
    "model",
    "preset",
    "model_options",
    "num_classes",
    "target",
    "spatial_dims",
    "output",
    "synthetic_regression",
)


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    output_folder(out, flag="--out", inputs=[recipe.data, recipe.val_data, args.config])
    if args.no_resume and (out / "checkpoints" / "state.safetensors").exists():
        raise ConfigError(
            f"{out}: holds a run already; remove --no-resume to continue it or choose another --out"
        )
    if not args.restart:
        saved = R.record(recipe)  # as config.json records it
        check_same_run(out, {k: saved[k] for k in RUN_IDENTITY if k in saved})
    if args.folds is not None:
        return run_folds(recipe, out, args)
    start = time.time()
    with run_lock(out) if distributed.is_main() else contextlib.nullcontext():
        result = R.train(
            recipe,
            out,
            resume=not (args.no_resume or args.restart),
            progress=not args.no_progress,
        )
    minutes = (time.time() - start) / 60
    if not distributed.is_main():  # under torchrun only rank 0 reports and writes
        return 0
    print(
        f"trained in {minutes:.1f} min: {result.step} optimiser steps in {result.epochs_run} "
        f"epochs; best {result.monitor} {result.best_metric:.4f} (epoch {result.best_epoch})"
    )
    if recipe.data is None:  # built-in data: score freshly generated, never-seen images
        summary = heldout_report(recipe, out)
        print("held-out synthetic images: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    extra = ", heldout.csv, samples/" if recipe.data is None else ""
    print(f"results in {out}/ (checkpoints/best.safetensors, metrics.csv, curves.png{extra})")
    atomic_write_text(
        out / "run_summary.json",
        json.dumps(
            {
                "minutes": minutes,
                "steps": result.step,
                "best_metric": result.best_metric,
                "recipe": R.record(recipe),
            },
            indent=2,
            default=str,
        ),
    )
    return 0
