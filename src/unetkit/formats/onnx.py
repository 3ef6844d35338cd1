"""ONNX export with dynamic batch and spatial size (the onnxruntime model that runs the file:
:mod:`unetkit.formats.onnx_model`, re-exported here).

``export_onnx`` writes one ``.onnx`` file whose ``metadata_props`` hold what a checkpoint
holds (model name, config, unetkit version, training facts such as normalisation), so
``OnnxModel(path)`` is enough to predict. The file is checked with onnxruntime against the
eager model before it is written, at a batch and spatial size other than the traced ones.

Why the TorchScript exporter by default: unetkit models check and pad their input with
Python integer arithmetic (``pad_to_multiple``, the size planner). ``torch.export`` (used by
the ``dynamo`` exporter) specialises those integers and freezes H and W; the tracer instead
records ``x.shape`` as graph values, so the pad and crop amounts stay symbolic. A trace
keeps one side of each Python ``if`` on shapes, so the example input is chosen to take the
general one: every axis odd (not a multiple of the model's stride: the pad branch is
traced) and not much smaller than it (reflect, not the replicate fallback for tiny inputs).
Families whose shape logic is not tensor arithmetic (Swin-Unet's window partition,
TransUNet's position-embedding resize) fail the check and say so; they export with
``dynamic_spatial=False`` (one fixed tile size, dynamic batch).
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unetkit import config as cfg
from unetkit import registry
from unetkit._atomic import atomic_write_bytes
from unetkit._version import __version__
from unetkit.config import check_choice
from unetkit.errors import ConfigError, InputSizeError
from unetkit.formats.checkpoint import RESERVED_METADATA_KEYS, unwrap
from unetkit.formats.onnx_model import (
    FORMAT,
    INPUT,
    OUTPUT,
    OnnxModel,
    first_line,
    read_onnx_metadata,
    require,
    sha256_file,
)
from unetkit.nn import swin

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "OnnxModel",
    "example_size",
    "export_onnx",
    "read_onnx_metadata",
    "sha256_file",
]

logger = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 17  # the TorchScript exporter's best-tested opset; dynamo needs >= 18
PARITY_RTOL = 1e-4  # max |onnx - eager| / max |eager| accepted by the export check
# odd, so never a multiple of a (power-of-two) stride; large enough that the pad to the
# next multiple, (-n) % stride, stays below n (reflect, not the tiny-input fallback) for
# strides up to 64 (1D/2D) or 32 (3D)
_EXAMPLE_EDGE = {1: 65, 2: 33, 3: 17}
_RESERVED = (*RESERVED_METADATA_KEYS, "onnx")


def example_size(model: nn.Module) -> tuple[int, ...]:
    """The spatial size ``export_onnx`` traces at by default, from the model's size planner:
    odd axes above any stride for same padding; a valid size for valid padding."""
    edge = _EXAMPLE_EDGE[model.dims]
    if model.is_valid_padding:
        return tuple(model.input_size_for((edge // 4,) * model.dims))
    return tuple(model.nearest_valid_input((edge,) * model.dims))


def probe_sizes(model: nn.Module, size: Sequence[int]) -> list[tuple[int, ...]]:
    """Two more spatial sizes, each different from ``size`` on every axis (a little and
    about twice larger), at which a dynamic export must agree with the eager model: one
    size alone can hit the same window/patch layout by chance."""
    probes = []
    for scale, extra in ((1, 6), (2, 3)):
        want = [scale * n + extra + 2 * i for i, n in enumerate(size)]
        if model.is_valid_padding:
            out = model.output_size_for(size)
            want = model.input_size_for([scale * o + extra for o in out])
        probes.append(tuple(model.nearest_valid_input(want)))
    return probes


def clear_shape_caches() -> None:
    """Drop the per-size tensor caches of the Swin blocks. torch.export traces with fake
    tensors; cached there, they would be handed to later eager calls."""

    for fn in ("relative_position_index", "window_attention_mask"):
        clear = getattr(getattr(swin, fn, None), "cache_clear", None)
        if clear is not None:
            clear()


def _normalize_transpose_perms(proto: Any) -> None:
    """Make Transpose ``perm`` entries non-negative (ONNX forbids negative axes).

    The TorchScript exporter copies ``movedim(1, -1)`` axes verbatim; a perm lists every
    axis once, so its length is the rank and ``p + len(perm)`` is the positive axis.
    """
    for node in proto.graph.node:
        if node.op_type != "Transpose":
            continue
        for attr in node.attribute:
            if attr.name == "perm" and any(p < 0 for p in attr.ints):
                perm = [p + len(attr.ints) if p < 0 else p for p in attr.ints]
                del attr.ints[:]
                attr.ints.extend(perm)


def _trace(
    model: nn.Module, x: torch.Tensor, *, opset: int, dynamic_spatial: bool, exporter: str
) -> bytes:
    dims = x.dim() - 2
    names = dict(zip(range(2, 2 + dims), ("depth", "height", "width")[-dims:], strict=True))
    axes = {0: "batch", **(names if dynamic_spatial else {})}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the tracer warns about every shape it turns into a constant: the parity check
        # below is what tells whether any of them mattered
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (x,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: axes, OUTPUT: axes},
            )
            return buf.getvalue()
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(
            model,
            (x.expand(2, *x.shape[1:]).clone(),),  # torch.export specialises a batch of 1
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        return program.model_proto.SerializeToString()


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_spatial: bool = True,
    size: Sequence[int] | None = None,
    metadata: dict[str, Any] | None = None,
    exporter: str = "torchscript",
    check: bool = True,
) -> Path:
    """Export a registered dense-prediction model to ONNX (atomic write).

    Args:
        model: a model from ``unetkit.create_model`` / ``unetkit.load`` (float32).
        path: the ``.onnx`` file to write; parent folders are created.
        opset: ONNX opset (17 by default; the dynamo exporter uses at least 18).
        dynamic_spatial: graph input ``N×C×*S`` with dynamic ``S`` (and always dynamic N).
            False fixes ``S`` to ``size``: for families whose shape logic cannot be traced.
        size: spatial example size; default ``example_size(model)`` (the size planner).
            Dynamic same-padding graphs are traced at the next odd size on each axis.
        metadata: extra JSON facts stored with the model (e.g. ``normalize``, ``target``).
        exporter: "torchscript" (dynamic H/W) or "dynamo" (torch.export; fixed H/W).
        check: run the graph in onnxruntime at a batch of 2 (if dynamic, at the two
            ``probe_sizes``) and require ``max|onnx - eager| <= 1e-4 * max|eager|``
            before writing anything.

    Returns:
        ``path``.

    Example:
        >>> net = unetkit.create_model("unet", channels=(4, 8))  # doctest: +SKIP
        >>> export_onnx(net, "unet.onnx")  # doctest: +SKIP
    """
    onnx = require("onnx")
    check_choice("exporter", exporter, EXPORTERS)
    model = unwrap(model)
    name = registry.name_of(model)
    if exporter == "dynamo" and dynamic_spatial:
        raise ConfigError(
            "exporter='dynamo' fixes the spatial size (torch.export specialises the models' "
            "size checks); pass dynamic_spatial=False with a size, or use 'torchscript'"
        )
    size = tuple(int(s) for s in (size or example_size(model)))
    if len(size) != model.dims:
        raise InputSizeError(f"size={size} must have {model.dims} axes for this {name}")
    if dynamic_spatial and not model.is_valid_padding:
        size = tuple(n | 1 for n in size)  # odd: the trace must take the pad-to-stride branch
    model.output_size_for(size)  # InputSizeError naming valid sizes, before tracing
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ConfigError(f"metadata keys {clash} are reserved by the ONNX format")
    opset = max(opset, 18) if exporter == "dynamo" else opset
    x = torch.randn(1, model.in_channels, *size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            data = _trace(model, x, opset=opset, dynamic_spatial=dynamic_spatial, exporter=exporter)
    finally:
        model.train(was_training)
        if exporter == "dynamo":
            clear_shape_caches()
    proto = onnx.load_from_string(data)
    _normalize_transpose_perms(proto)
    info = {"dynamic_spatial": dynamic_spatial, "size": list(size), "opset": opset}
    info["exporter"] = exporter
    entries = {
        "format": FORMAT,
        "model": name,
        "config": cfg.to_json(model.config),
        "unetkit_version": __version__,
        "onnx": json.dumps(info),
        **{k: json.dumps(v) for k, v in extra.items()},
    }
    del proto.metadata_props[:]
    for k, v in entries.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if check:
        exported = OnnxModel(data, source_name=str(path))
        for probe in probe_sizes(model, size) if dynamic_spatial else [size]:
            _check_parity(model, exported, probe, name, dynamic_spatial)
    atomic_write_bytes(path, data)
    return Path(path)


def _check_parity(
    model: nn.Module, exported: OnnxModel, size: Sequence[int], name: str, dynamic: bool
) -> None:
    x = torch.randn(2, model.in_channels, *size, generator=torch.Generator().manual_seed(1))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            want = model(x)
    finally:
        model.train(was_training)
    try:
        error = relative_error(torch.from_numpy(exported.run(x.numpy())), want)
    except Exception as e:  # onnxruntime could not run the graph at this size
        error, reason = float("inf"), f"onnxruntime: {first_line(e)}"
    else:
        reason = f"max relative error {error:.2e} > {PARITY_RTOL:g}"
    if error <= PARITY_RTOL:
        logger.debug("onnx export of %s: relative error %.2e at %s", name, error, tuple(size))
        return
    if dynamic:
        raise ConfigError(
            f"{name}: the traced ONNX graph does not generalise to other spatial sizes "
            f"(at {tuple(size)}: {reason}); this family computes shapes in Python (window "
            "partition, position-embedding size), which a trace fixes, or the example size is "
            "too small for its stride (pass a larger size). Export one tile size with "
            "dynamic_spatial=False (CLI: --static --size ...) or predict with --backend torch"
        )
    raise ConfigError(
        f"{name}: the exported graph disagrees with eager PyTorch at its own size "
        f"{tuple(size)} ({reason}); this family's shape logic does not trace at that size: "
        "try another size (e.g. a multiple of the patch and window sizes), "
        "exporter='dynamo', or predict with --backend torch"
    )


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want| / max|want|`` (inf if the shapes differ)."""
    if got.shape != want.shape:
        return float("inf")
    scale = want.abs().max().item() or 1.0
    return (got.float() - want.float()).abs().max().item() / scale
