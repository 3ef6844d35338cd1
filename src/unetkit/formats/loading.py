"""One place that opens a model file: a unetkit checkpoint, a LoRA adapter (with its
base), or an exported ONNX graph.

Every front-end and workflow that takes "a model file" (predict, evaluate, export,
calibrate, generate, LoRA training, merging) opens it here, so they accept the same files
and fail the same way.

* ``base_checkpoint(path)``: a run directory (its best, else last checkpoint) or a file.
* ``is_adapter_file(path)``: a unetkit LoRA adapter file rather than a model checkpoint.
* ``load_model_or_adapter(path)``: the model, and the checkpoint whose metadata describes it.
* ``load_with_metadata(path)``: the model and that metadata, with an adapter's own
  inference settings (e.g. its calibrated seed threshold) on top.
* ``load_model_file(path)``: any of the above, or an ``.onnx`` file (run by onnxruntime).
* ``fold_checkpoints(path)`` / ``load_ensemble(paths)``: the fold models of a
  ``train --folds K`` run directory, loaded as one averaged-probability ensemble (a run
  directory holding ``fold_0/``, ``fold_1/``, ... is opened this way by the loaders above).
* ``user_metadata(meta)``: the metadata without ``RESERVED_METADATA_KEYS`` (the keys the
  checkpoint writer owns, defined with it in ``formats.checkpoint``): what a re-saved
  model should carry on (normalisation, target, ...).

Example:
    >>> model, meta = load_model_file("runs/cells")              # doctest: +SKIP
    >>> meta["target"]                                            # doctest: +SKIP
    'boundary'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from unetkit.errors import CheckpointError
from unetkit.formats.bioimageio_load import load_package
from unetkit.formats.checkpoint import RESERVED_METADATA_KEYS, load, read_header, read_metadata
from unetkit.formats.lora_files import load_adapter, read_adapter
from unetkit.formats.lora_layouts import UNETKIT_FORMAT
from unetkit.formats.onnx import OnnxModel
from unetkit.models.ensemble import ProbabilityEnsemble

log = logging.getLogger(__name__)

ONNX_SUFFIX = ".onnx"
PACKAGE_SUFFIX = ".zip"
FOLD_PREFIX = "fold_"  # fold k of a `train --folds K` run lives in <run>/fold_<k>/
# what predict reads from the metadata: the fold models of an ensemble must agree on it
_ENSEMBLE_AGREE = (
    "task", "target", "normalize", "normalize_percentiles", "num_classes", "channels",
)  # fmt: skip


def user_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` without ``RESERVED_METADATA_KEYS``: the extras to pass on when re-saving."""
    return {k: v for k, v in meta.items() if k not in RESERVED_METADATA_KEYS}


def base_checkpoint(path: str | os.PathLike) -> Path:
    """The model file of a run directory (best, else last) or the file itself, resolved."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / "checkpoints" / name).is_file():
                return (p / "checkpoints" / name).resolve()
        raise CheckpointError(f"{p}: no checkpoints/best.safetensors or last.safetensors inside")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such run directory or checkpoint file")
    return p.resolve()


def is_adapter_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a LoRA adapter file written by unetkit (not a model checkpoint)."""
    return read_header(path).get("format") == UNETKIT_FORMAT  # CheckpointError: one line


def _load(path: str | os.PathLike) -> tuple[nn.Module, Path, dict[str, Any]]:
    """(model, describing checkpoint, the adapter's inference settings; {} for a model)."""
    file = Path(path)
    if not is_adapter_file(file):
        return load(file), file, {}
    adapter = read_adapter(file)
    base = adapter.info.get("base_model")
    if not base or not Path(base).is_file():
        raise CheckpointError(
            f"{file}: LoRA adapter whose base checkpoint {base!r} is not there; merge it "
            f"onto its base with `unetkit lora-merge BASE {file}` or move the base back"
        )
    model = load(base)
    load_adapter(model, adapter)
    return model, Path(base), dict(adapter.info.get("inference") or {})


def load_model_or_adapter(path: str | os.PathLike) -> tuple[nn.Module, Path]:
    """A model from a checkpoint, or base + adapter from a LoRA run's adapter file.

    Returns:
        (model, the checkpoint whose metadata describes the model: the file itself, or
        the adapter's base).
    """
    model, described, _ = _load(path)
    return model, described


def load_with_metadata(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """``load_model_or_adapter`` plus the metadata of the checkpoint describing the model
    (normalisation, target, task) with an adapter's own ``inference`` settings (e.g. its
    calibrated seed threshold) on top: what predict, evaluate and export need."""
    folds = fold_checkpoints(path)
    if folds:  # a `train --folds K` run directory
        return load_ensemble(folds)
    if Path(path).is_dir():  # a run directory: its best (else last) checkpoint
        path = base_checkpoint(path)
    model, described, inference = _load(path)
    return model, {**read_metadata(described), **inference}


def fold_checkpoints(path: str | os.PathLike) -> list[Path]:
    """The best checkpoint of each fold of a ``train --folds K`` run directory
    (``fold_0/``, ``fold_1/``, ...), in fold order; [] for any other path."""
    p = Path(path)
    if not p.is_dir() or (p / "checkpoints").is_dir():
        return []
    folds = [d for d in p.iterdir() if d.is_dir() and d.name.startswith(FOLD_PREFIX)]
    folds = [d for d in folds if d.name[len(FOLD_PREFIX) :].isdigit()]
    folds.sort(key=lambda d: int(d.name[len(FOLD_PREFIX) :]))
    return [base_checkpoint(d) for d in folds]


def load_ensemble(paths: Sequence[str | os.PathLike]) -> tuple[nn.Module, dict[str, Any]]:
    """Fold models as one :class:`~unetkit.models.ensemble.ProbabilityEnsemble`.

    The members must agree on what predict reads from the metadata (task, target,
    normalisation, classes, channels); numbers calibrated per fold (the seed threshold,
    the object diameter) are averaged. ``meta["ensemble"]`` lists the member files.
    """
    if not paths:
        raise CheckpointError("load_ensemble: no checkpoints given")
    loaded = [load_with_metadata(p) for p in paths]
    first = loaded[0][1]
    if first.get("task", "segmentation") != "segmentation":
        raise CheckpointError(
            f"{paths[0]}: a {first.get('task')} model; fold ensembles average segmentation "
            "probabilities"
        )
    for path, (_, meta) in zip(paths[1:], loaded[1:], strict=True):
        for key in _ENSEMBLE_AGREE:
            if meta.get(key) != first.get(key):
                raise CheckpointError(
                    f"{path}: metadata {key}={meta.get(key)!r} differs from {paths[0]} "
                    f"({first.get(key)!r}); fold models must be trained alike"
                )
    combined = dict(first)
    for key in ("seed_threshold", "object_diameter"):
        values = [m[key] for _, m in loaded if isinstance(m.get(key), (int, float))]
        if len(values) == len(loaded):
            combined[key] = sum(values) / len(values)
    combined["ensemble"] = [str(p) for p in paths]
    model = ProbabilityEnsemble([m for m, _ in loaded])
    log.info("ensemble of %d fold models: probabilities averaged", len(loaded))
    return model, combined


def load_model_file(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Any model file unetkit reads, as (model, metadata).

    Args:
        path: a run directory, a ``.safetensors`` checkpoint, a unetkit LoRA adapter file
            (loaded onto the base checkpoint it names) or an ``.onnx`` file exported by
            unetkit (an ``OnnxModel`` run by onnxruntime; needs the ``onnx`` extra), or a
            bioimage.io package ``.zip`` of a unetkit model (needs the ``bio`` extra).

    Returns:
        (model, metadata as ``load_with_metadata`` gives it; for ONNX the graph's own).
    """
    if Path(path).suffix.lower() == ONNX_SUFFIX:
        model = OnnxModel(path)
        return model, model.meta
    if Path(path).suffix.lower() == PACKAGE_SUFFIX:  # a bioimage.io package (extra: bio)
        return load_package(path)
    folds = fold_checkpoints(path)
    if folds:
        return load_ensemble(folds)
    return load_with_metadata(base_checkpoint(path))


__all__ = [
    "FOLD_PREFIX",
    "ONNX_SUFFIX",
    "PACKAGE_SUFFIX",
    "base_checkpoint",
    "fold_checkpoints",
    "is_adapter_file",
    "load_ensemble",
    "load_model_file",
    "load_model_or_adapter",
    "load_with_metadata",
    "user_metadata",
]
