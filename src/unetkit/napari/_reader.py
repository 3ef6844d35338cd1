"""Reader: ``unetkit predict`` outputs and training run directories.

* a prediction file ``<stem>_instances.png/.tif`` (or ``_mask``) -> a Labels layer;
* a prediction folder (``counts.csv`` or ``*_instances.*`` inside) -> every image's
  instances as Labels and its overlay as an RGB image (hidden);
* a run directory (``checkpoints/`` or ``config.json``) -> ``curves.png`` and the sample
  overlays/predictions under ``samples/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unetkit.data.io import read_image

LayerData = tuple[Any, dict[str, Any], str]
_LABEL_SUFFIXES = ("_instances", "_mask")
_EXTENSIONS = (".png", ".tif", ".tiff")


def _is_prediction(path: Path) -> bool:
    return path.suffix.lower() in _EXTENSIONS and path.stem.endswith(_LABEL_SUFFIXES)


def _is_prediction_folder(path: Path) -> bool:
    return (path / "counts.csv").is_file() or any(
        _is_prediction(p) for p in path.glob("*_instances.*")
    )


def _is_run(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / "config.json").is_file()


def get_reader(path: str | os.PathLike | list) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader contribution: a reader function for unetkit files, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir():
        if _is_prediction_folder(p):
            return read_predictions
        return read_run if _is_run(p) else None
    return read_prediction_file if _is_prediction(p) else None


def read_prediction_file(path: str | os.PathLike | list) -> list[LayerData]:
    """One ``_instances``/``_mask`` file as a Labels layer named after it."""
    p = Path(path[0] if isinstance(path, list) else path)
    labels = np.asarray(read_image(p))
    if labels.ndim == 3 and labels.shape[-1] in (3, 4):  # an RGB(A) mask: the first channel
        labels = labels[..., 0]
    return [(labels.astype(np.int32), {"name": p.stem}, "labels")]


def read_predictions(path: str | os.PathLike | list) -> list[LayerData]:
    """A ``unetkit predict --out`` folder: instances as Labels, overlays as hidden images."""
    folder = Path(path[0] if isinstance(path, list) else path)
    layers: list[LayerData] = []
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in _EXTENSIONS:
            continue
        if f.stem.endswith("_instances"):
            layers += read_prediction_file(f)
        elif f.stem.endswith("_overlay"):
            layers.append((read_image(f), {"name": f.stem, "rgb": True, "visible": False}, "image"))
    return layers


def read_run(path: str | os.PathLike | list) -> list[LayerData]:
    """A training run: ``curves.png`` and the pictures in ``samples/`` as image layers."""
    run = Path(path[0] if isinstance(path, list) else path)
    files = [run / "curves.png"] if (run / "curves.png").is_file() else []
    if (run / "samples").is_dir():
        files += sorted(f for f in (run / "samples").iterdir() if f.suffix.lower() == ".png")
    layers: list[LayerData] = []
    for i, f in enumerate(files):
        image = read_image(f)
        meta = {"name": f"{run.name}/{f.stem}", "visible": i == len(files) - 1}
        layers.append((image, {**meta, "rgb": image.ndim == 3}, "image"))
    return layers
