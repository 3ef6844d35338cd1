"""What runs the forward pass of ``predict``: eager PyTorch, torch.compile, or onnxruntime.

Every backend yields an ``nn.Module``-like object that the tiling engine drives unchanged:

* ``"torch"``: the checkpoint's model; ``compile=True`` wraps it in ``torch.compile`` and falls
  back to eager (one logged warning) if compilation fails, on the first call or a later one.
* ``"onnx"``: an ``OnnxModel`` (onnxruntime session). Given an ``.onnx`` file it runs that;
  given a ``.safetensors`` checkpoint it exports it once to ``<checkpoint>.onnx`` next to
  the checkpoint (reused while the checkpoint's SHA-256, stored in the graph, matches; in a
  temporary folder if the checkpoint's folder is read-only).

Precision (``InferenceOptions.precision``) is applied by the tiling engine (bf16: a frozen
copy on CPUs, ``fastpath``; autocast on GPUs); the onnx backend runs float32 graphs, so it
takes "fp32" or "auto".
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError, UnetkitError
from unetkit.formats.bioimageio_load import load_package
from unetkit.formats.loading import (
    PACKAGE_SUFFIX,
    base_checkpoint,
    fold_checkpoints,
    load_model_file,
    load_with_metadata,
    user_metadata,
)
from unetkit.formats.onnx import OnnxModel, export_onnx, read_onnx_metadata, sha256_file

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
DEFAULT_COMPILE_BACKEND = "inductor"


class CompiledModel(nn.Module):
    """``torch.compile(module)`` that falls back to the eager module if compiling fails.

    Compilation happens on the first call (and again on new shapes), so failures are caught
    there: the first one is logged as a warning and every later call runs eagerly. Errors
    that eager PyTorch raises too (bad input sizes) still reach the caller. Attributes the
    tiling engine asks for (``dims``, ``is_valid_padding``, size planner) come from the
    eager module, which is also ``.module`` (so ``checkpoint.unwrap`` finds it).

    Args:
        module: the model to compile.
        backend: a ``torch.compile`` backend name ("inductor", "eager", ...) or callable.

    Example:
        >>> fast = CompiledModel(unetkit.create_model("unet", channels=(4, 8)))  # doctest: +SKIP
    """

    freezable = False  # compiled graphs do their own weight handling (fastpath.can_freeze)

    def __init__(self, module: nn.Module, *, backend: str | Callable = DEFAULT_COMPILE_BACKEND):
        super().__init__()
        self.module = module
        self.compiled: Callable[..., torch.Tensor] | None = torch.compile(module, backend=backend)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except UnetkitError:
                raise  # the model's own input checks: eager would raise the same
            except Exception as e:  # dynamo/inductor/C++ toolchain failures, many types
                logger.warning(
                    "torch.compile failed (%s: %s); running the model eagerly",
                    type(e).__name__,
                    " ".join(str(e).split())[:300],  # dynamo's messages span many lines
                )
                self.compiled = None
        return self.module(x)


def onnx_cache_path(checkpoint: str | os.PathLike) -> Path:
    """Where predict caches the ONNX export of a checkpoint: ``<checkpoint>.onnx``."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".onnx")


def cached_onnx(checkpoint: str | os.PathLike) -> Path:
    """The ONNX export of ``checkpoint`` (dynamic spatial size), exported if not cached."""

    digest = sha256_file(checkpoint)
    cache = onnx_cache_path(checkpoint)
    if cache.is_file():
        try:
            if read_onnx_metadata(cache).get("source_sha256") == digest:
                logger.debug("using cached ONNX export %s", cache)
                return cache
        except UnetkitError:
            pass  # unreadable cache: export again

    model, meta = load_with_metadata(checkpoint)
    extra = user_metadata(meta)
    extra["source_sha256"] = digest
    logger.info("exporting %s to ONNX (cached as %s)", checkpoint, cache)
    try:
        return export_onnx(model, cache, metadata=extra)
    except PermissionError:
        target = Path(tempfile.mkdtemp(prefix="unetkit-onnx-")) / cache.name
        logger.warning("%s is read-only; ONNX export kept in %s", cache.parent, target)
        return export_onnx(model, target, metadata=extra)


def load_inference_model(
    source: str | os.PathLike,
    *,
    backend: str | None = None,
    compile: bool | str | Callable = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model predict runs and the metadata it needs (normalisation, target, task).

    Args:
        source: a ``.safetensors`` checkpoint, an ``.onnx`` file exported by unetkit, or
            a bioimage.io package ``.zip`` of a unetkit model.
        backend: "torch" or "onnx"; None picks by file type (``.onnx`` -> onnx).
        compile: torch backend only: True (inductor), a torch.compile backend name or
            callable; falls back to eager with a warning if compilation fails.

    Example:
        >>> model, meta = load_inference_model("best.safetensors", backend="onnx")  # doctest: +SKIP
    """
    is_onnx = Path(source).suffix.lower() == ".onnx"
    backend = backend or ("onnx" if is_onnx else "torch")
    check_choice("backend", backend, BACKENDS)
    if Path(source).suffix.lower() == PACKAGE_SUFFIX and backend == "onnx":
        return load_package(source, backend="onnx")  # the package's own ONNX weights
    if backend == "torch":
        if is_onnx:
            raise ConfigError(
                f"{source}: an ONNX file runs with --backend onnx; for --backend torch pass "
                "the .safetensors checkpoint it was exported from"
            )
        model, meta = load_model_file(source)  # a checkpoint, LoRA adapter or bioimage.io zip
        if compile:
            how = DEFAULT_COMPILE_BACKEND if compile is True else compile
            model = CompiledModel(model, backend=how)
        return model, meta
    if compile:
        raise ConfigError("--compile applies to --backend torch; onnxruntime optimises itself")
    folds = fold_checkpoints(source)
    if folds:
        raise ConfigError(
            f"{source}: a --folds run ({len(folds)} models averaged); it runs with --backend "
            "torch (or export one fold's checkpoint to ONNX)"
        )
    if Path(source).is_dir():  # a run directory: its best (else last) checkpoint
        source = base_checkpoint(source)
    return load_model_file(source if is_onnx else cached_onnx(source))


def options_for(model: nn.Module, options: Any) -> Any:
    """``options`` (an ``InferenceOptions``) adapted to the backend: a fixed-size ONNX graph
    sets the tile size; onnxruntime runs float32 ("auto" precision becomes "fp32")."""

    if not isinstance(model, OnnxModel):
        return options
    changes: dict[str, Any] = {"precision": "fp32"}
    if options.precision == "bf16":
        raise ConfigError(
            "--precision bf16 applies to --backend torch; the ONNX graph runs in float32 "
            "(use --precision fp32 or auto)"
        )
    if model.fixed_size is not None:
        size = model.fixed_size
        tile = model.output_size_for(size) if model.is_valid_padding else size
        asked = options.tiles.tile_size(len(tile))
        if asked is not None and asked != tuple(tile):
            raise ConfigError(
                f"{model.source}: graph exported for tile {tuple(tile)}, --tile "
                f"{options.tiles.tile} asked; omit --tile or export again with that size"
            )
        changes["tiles"] = dataclasses.replace(options.tiles, tile=tuple(tile))
    return dataclasses.replace(options, **changes)
