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
* ``user_metadata(meta)``: the metadata without ``RESERVED_METADATA_KEYS`` (the keys the
  checkpoint writer owns, defined with it in ``formats.checkpoint``): what a re-saved
  model should carry on (normalisation, target, ...).

Example:
    >>> model, meta = load_model_file("runs/cells")              # doctest: +SKIP
    >>> meta["target"]                                            # doctest: +SKIP
    'boundary'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from unetkit.errors import CheckpointError
from unetkit.formats.bioimageio_load import load_package
from unetkit.formats.checkpoint import RESERVED_METADATA_KEYS, load, read_header, read_metadata
from unetkit.formats.lora_files import load_adapter, read_adapter
from unetkit.formats.lora_layouts import UNETKIT_FORMAT
from unetkit.formats.onnx import OnnxModel

ONNX_SUFFIX = ".onnx"
PACKAGE_SUFFIX = ".zip"


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
    model, described, inference = _load(path)
    return model, {**read_metadata(described), **inference}


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
    return load_with_metadata(base_checkpoint(path))


__all__ = [
    "ONNX_SUFFIX",
    "PACKAGE_SUFFIX",
    "base_checkpoint",
    "is_adapter_file",
    "load_model_file",
    "load_model_or_adapter",
    "load_with_metadata",
    "user_metadata",
]
