"""`unetkit train --folds K`: the flag and the run (K fold models, workflows.folds)."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from unetkit.cli import flags as F
from unetkit.runlock import run_lock
from unetkit.training import distributed
from unetkit.workflows.folds import train_folds
from unetkit.workflows.segment_recipe import SegmentationRecipe


def add_folds_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--folds",
        type=F.positive_int,
        metavar="K",
        help="train K models, each validated on its own 1/K of the --data images (nnU-Net "
        "cross-validation), into --out/fold_<k>/; predict and evaluate given --out average "
        "the K models' probabilities",
    )


def run_folds(recipe: SegmentationRecipe, out: Path, args: argparse.Namespace) -> int:
    """Train the K fold models of ``recipe`` into ``out``; one line per fold."""
    start = time.time()
    with run_lock(out) if distributed.is_main() else contextlib.nullcontext():
        results = train_folds(
            recipe,
            out,
            args.folds,
            resume=not (args.no_resume or args.restart),
            progress=not args.no_progress,
        )
    if not distributed.is_main():  # under torchrun only rank 0 reports
        return 0
    for k, result in enumerate(results):
        print(
            f"fold {k}: {result.step} optimiser steps; best {result.monitor} "
            f"{result.best_metric:.4f} (epoch {result.best_epoch})"
        )
    print(
        f"trained {len(results)} fold models in {(time.time() - start) / 60:.1f} min; "
        f"results in {out}/ (fold_<k>/, folds.json); `unetkit predict {out} ...` averages "
        "their probabilities"
    )
    return 0
