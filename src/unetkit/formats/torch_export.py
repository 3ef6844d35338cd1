"""``torch.export`` programs (``.pt2``): an ahead-of-time graph of a model, batch dynamic.

``torch.export`` specialises the Python integers a model computes from its input shape;
unetkit models check and pad sizes in Python, so the spatial size is fixed at export time
(one tile size, like ``export_onnx(dynamic_spatial=False)``) while the batch stays dynamic.
The unetkit metadata (model, config, version, extras) travels in the archive as
``unetkit.json``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unetkit import config as cfg
from unetkit import registry
from unetkit._atomic import atomic_write_bytes
from unetkit._version import __version__
from unetkit.errors import CheckpointError, ConfigError, InputSizeError
from unetkit.formats.checkpoint import unwrap
from unetkit.formats.onnx import clear_shape_caches, example_size

FORMAT = "unetkit-torch-export"
_META = "unetkit.json"


def export_torch(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    size: Sequence[int] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``torch.export.export(model)`` with ``torch.export.save`` (atomic write).

    Args:
        model: a registered unetkit model.
        path: the ``.pt2`` file to write.
        size: the spatial size the program accepts (default ``example_size(model)``).
        metadata: extra JSON facts stored with the program (e.g. ``normalize``).

    Returns:
        ``path``. The program takes ``N×C×*size`` for any batch ``N``.

    Example:
        >>> net = unetkit.create_model("unet", channels=(4, 8))  # doctest: +SKIP
        >>> export_torch(net, "unet.pt2", size=(64, 64))  # doctest: +SKIP
    """
    model = unwrap(model)
    name = registry.name_of(model)
    size = tuple(int(s) for s in (size or example_size(model)))
    if len(size) != model.dims:
        raise InputSizeError(f"size={size} must have {model.dims} axes for this {name}")
    model.output_size_for(size)
    meta = {"format": FORMAT, "model": name, "config": cfg.to_dict(model.config)}
    meta.update(unetkit_version=__version__, size=list(size), **(metadata or {}))
    # batch 2 as the example: torch.export specialises dimensions of size 0 and 1
    x = torch.randn(2, model.in_channels, *size)
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(
            model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        )
    except Exception as e:  # torch's export errors are many types; name the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"{name}: torch.export failed ({type(e).__name__}: {first}); use export_onnx"
        ) from None
    finally:
        model.train(was_training)
        clear_shape_caches()
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={_META: json.dumps(meta)})
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


class ExportedModel(nn.Module):
    """A loaded ``.pt2`` program with its metadata; checks the spatial size first."""

    def __init__(self, program: torch.export.ExportedProgram, meta: dict[str, Any]) -> None:
        super().__init__()
        self.module = program.module()
        self.meta = meta
        self.fixed_size = tuple(meta["size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.fixed_size:
            raise InputSizeError(
                f"exported program takes spatial size {self.fixed_size}, got "
                f"{tuple(x.shape[2:])}; export again with that size"
            )
        return self.module(x)


def load_torch_export(path: str | os.PathLike) -> ExportedModel:
    """Load a file written by ``export_torch``."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such file")
    extra = {_META: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # a zip that is no torch.export archive, or no zip at all
        raise CheckpointError(f"{path}: not a torch.export archive ({type(e).__name__})") from None
    meta = json.loads(extra[_META] or "{}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: exported program has no unetkit metadata")
    return ExportedModel(program, meta)
