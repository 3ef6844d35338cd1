"""K-fold training (nnU-Net's ``--folds 5``): K models, each validated on its own fold.

The images of ``recipe.data`` are dealt into K folds (shuffled by the recipe's seed, sizes
differing by at most one). Model k trains on every fold but k and selects its checkpoint on
fold k, so every image validates exactly one model. The run directory holds
``fold_0/`` … ``fold_<K-1>/`` (ordinary run directories) and ``folds.json`` (which images
each fold validated on); predict and evaluate open the whole directory as one
averaged-probability ensemble (``formats.loading.load_ensemble``).

Example:
    >>> from unetkit.workflows.segment_recipe import make_recipe
    >>> train_folds(make_recipe("modern", data="cells/"), "runs/cv", 5)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from unetkit._atomic import atomic_write_text
from unetkit.data.folder_dataset import FolderSegmentationDataset
from unetkit.errors import ConfigError
from unetkit.formats.loading import FOLD_PREFIX
from unetkit.workflows import segment_train
from unetkit.workflows.segment_recipe import SegmentationRecipe

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.json"


def fold_of_each(n_images: int, k: int, seed: int) -> list[int]:
    """The fold (0 … k-1) of each of ``n_images`` images: shuffled, sizes within one.

    Example:
        >>> sorted(fold_of_each(5, 2, seed=0))
        [0, 0, 0, 1, 1]
    """
    order = np.random.default_rng(seed).permutation(n_images)
    folds = [0] * n_images
    for position, image in enumerate(order):
        folds[int(image)] = position % k
    return folds


def _link_view(pairs: list[tuple[Path, Path]], root: Path) -> str:
    """``root/images`` and ``root/masks`` of symlinks to ``pairs``: a data folder view."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for old in (root / sub).iterdir():  # a rerun's view is rebuilt, not merged
            old.unlink()
    for image, mask in pairs:
        (root / "images" / image.name).symlink_to(image.resolve())
        (root / "masks" / mask.name).symlink_to(mask.resolve())
    return str(root)


def _check_same_folds(run: Path, record: dict, images: list[str], resume: bool) -> None:
    """ConfigError when ``run`` resumes folds of other data, K or seed: its fold models
    would continue on images they were not split from."""
    path = run / FOLDS_FILE
    if not resume or not path.is_file():
        return
    old = json.loads(path.read_text())
    old_images = sorted(i for f in old.get("folds", []) for i in f["validation_images"])
    same = all(old.get(key) == record[key] for key in ("data", "k", "seed"))
    # folds.json grows fold by fold: an interrupted run has listed only some images
    if not same or not set(old_images) <= set(images):
        raise ConfigError(
            f"{run}: holds --folds {old.get('k')} of {old.get('data')} (seed "
            f"{old.get('seed')}); use another --out, or --restart to train these folds anew"
        )


def train_folds(
    recipe: SegmentationRecipe,
    run_dir: str | os.PathLike,
    k: int,
    *,
    resume: bool = True,
    progress: bool = True,
) -> list[Any]:
    """Train ``k`` models on ``k`` splits of ``recipe.data`` (module docs).

    Args:
        recipe: the recipe every fold trains with; needs ``data`` and no ``val_data``.
        run_dir: the run directory; fold k trains into ``run_dir/fold_<k>``.
        k: number of folds, at least 2 and at most the number of images.
        resume, progress: as for ``segment_train.train``, per fold.

    Returns:
        each fold's FitResult, in fold order.
    """
    if k < 2:
        raise ConfigError(f"--folds {k}: need at least 2 folds (or leave --folds out)")
    if recipe.data is None or recipe.task != "segmentation":
        raise ConfigError(f"--folds {k}: needs segmentation training on --data (a folder)")
    if recipe.val_data is not None:
        raise ConfigError(
            f"--folds {k}: each fold validates on its own images of --data; leave out --val-data"
        )
    listing = FolderSegmentationDataset(recipe.data, spatial_dims=recipe.spatial_dims)
    pairs = list(listing.pairs)
    if len(pairs) < k:
        raise ConfigError(
            f"--folds {k}: {recipe.data} holds {len(pairs)} image(s); each fold needs at "
            f"least one validation image (use --folds {len(pairs)} or fewer)"
            if len(pairs) >= 2
            else f"--folds {k}: {recipe.data} holds {len(pairs)} image(s); need at least 2"
        )
    run = Path(run_dir)
    fold = fold_of_each(len(pairs), k, recipe.seed)
    source = str(Path(recipe.data).resolve())
    record: dict[str, Any] = {"data": source, "k": k, "seed": recipe.seed, "folds": []}
    _check_same_folds(run, record, [str(image.resolve()) for image, _ in pairs], resume)
    results = []
    for f in range(k):
        held = [p for p, g in zip(pairs, fold, strict=True) if g == f]
        kept = [p for p, g in zip(pairs, fold, strict=True) if g != f]
        views = run / "fold_data" / f"{FOLD_PREFIX}{f}"
        fold_recipe = dataclasses.replace(
            recipe, data=_link_view(kept, views / "train"), val_data=_link_view(held, views / "val")
        )
        log.info(
            "fold %d/%d: %d image(s) train, %d validate (%s)",
            f + 1,
            k,
            len(kept),
            len(held),
            ", ".join(image.name for image, _ in held),
        )
        results.append(
            segment_train.train(
                fold_recipe, run / f"{FOLD_PREFIX}{f}", resume=resume, progress=progress
            )
        )
        record["folds"].append(
            {"fold": f, "validation_images": [str(image.resolve()) for image, _ in held]}
        )
        atomic_write_text(run / FOLDS_FILE, json.dumps(record, indent=2) + "\n")
    return results
