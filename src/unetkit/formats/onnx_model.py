"""Run an exported ONNX graph with onnxruntime wherever a unetkit model is expected.

``OnnxModel(path)`` reads the unetkit metadata ``formats.onnx.export_onnx`` stored in the
file (model name, config, version, training facts) and answers the size-planner questions
from it, so tiling, TTA and post-processing need no change; ``read_onnx_metadata`` reads the
metadata alone. Both are importable from :mod:`unetkit.formats.onnx` too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unetkit import registry
from unetkit.errors import CheckpointError, ConfigError, InputSizeError

__all__ = ["FORMAT", "OnnxModel", "read_onnx_metadata", "sha256_file"]

FORMAT = "unetkit-onnx"
INPUT, OUTPUT = "image", "logits"


def require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(
            f"ONNX support needs the {module!r} package: pip install 'unetkit[onnx]' "
            "(onnx and onnxruntime)"
        ) from None


def first_line(e: BaseException, limit: int = 240) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (ties an exported graph to the checkpoint it came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_metadata(props: dict[str, str], source: str) -> dict[str, Any]:
    if props.get("format") != FORMAT or "model" not in props:
        raise CheckpointError(
            f"{source}: ONNX file has no unetkit metadata (format={props.get('format')!r}); "
            "export it with `unetkit export CHECKPOINT --onnx FILE`"
        )
    return {
        k: (v if k in ("format", "model", "unetkit_version") else json.loads(v))
        for k, v in props.items()
    }


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The unetkit metadata of an exported file: model, config, version, ``onnx`` (export
    facts: dynamic_spatial, size, opset, exporter) and the extras (JSON-decoded)."""
    onnx = require("onnx")
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise CheckpointError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    return _parse_metadata({p.key: p.value for p in proto.metadata_props}, str(path))


class OnnxModel(nn.Module):
    """An exported graph run by onnxruntime, usable wherever a unetkit model is.

    It has no parameters (the tiling engine then runs it on the CPU in float32) and answers
    the size-planner questions (``dims``, ``is_valid_padding``, ``output_size_for``, ...)
    from the model config in the file, so tiling, TTA and post-processing need no change.

    Args:
        source: an ``.onnx`` path, or the serialized model bytes.
        threads: onnxruntime intra-op threads; default ``torch.get_num_threads()``.
        source_name: the name errors use for bytes input.

    Example:
        >>> net = OnnxModel("unet.onnx")  # doctest: +SKIP
        >>> net(torch.rand(2, 1, 100, 90)).shape  # doctest: +SKIP
        torch.Size([2, 2, 100, 90])
    """

    def __init__(
        self,
        source: str | os.PathLike | bytes,
        *,
        threads: int | None = None,
        source_name: str | None = None,
    ) -> None:
        super().__init__()
        ort = require("onnxruntime")
        name = source_name or ("<bytes>" if isinstance(source, bytes) else str(source))
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise CheckpointError(f"{name}: no such ONNX file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 4  # errors surface as exceptions, not console lines
        try:
            session = ort.InferenceSession(
                source if isinstance(source, bytes) else str(source),
                opts,
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CheckpointError(f"{name}: onnxruntime cannot load it ({e})") from None
        self.source = name
        self.meta = _parse_metadata(session.get_modelmeta().custom_metadata_map, name)
        with torch.device("meta"):  # the architecture's planner only; no weights
            spec = registry.model_from_config(self.meta["model"], self.meta["config"])
        object.__setattr__(self, "_spec", spec)  # not a submodule: keep parameters() empty
        object.__setattr__(self, "_session", session)
        export = self.meta.get("onnx", {})
        self.fixed_size = None if export.get("dynamic_spatial", True) else tuple(export["size"])
        self.dims, self.config = spec.dims, spec.config
        self.in_channels, self.out_channels = spec.in_channels, spec.out_channels

    @property
    def is_valid_padding(self) -> bool:
        return self._spec.is_valid_padding

    def output_size_for(self, input_size: Sequence[int]) -> tuple[int, ...]:
        return self._spec.output_size_for(input_size)

    def input_size_for(self, output_size: Sequence[int]) -> tuple[int, ...]:
        return self._spec.input_size_for(output_size)

    def nearest_valid_input(self, input_size: Sequence[int]) -> tuple[int, ...]:
        return self._spec.nearest_valid_input(input_size)

    def margin(self) -> tuple[int, ...]:
        return self._spec.margin()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self._spec.probabilities(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N×C×*S`` float -> ``N×K×*S'`` float32 logits (CPU)."""
        self._spec.check_input(x)
        if self.fixed_size is not None and tuple(x.shape[2:]) != self.fixed_size:
            raise InputSizeError(
                f"{self.source}: graph exported for spatial size {self.fixed_size}, got "
                f"{tuple(x.shape[2:])}; predict with --tile {' '.join(map(str, self.fixed_size))}"
                " or export again with that size"
            )
        try:
            y = self.run(x.detach().to("cpu", torch.float32).contiguous().numpy())
        except Exception as e:  # onnxruntime's Fail / InvalidArgument
            raise InputSizeError(
                f"{self.source}: onnxruntime cannot run input {tuple(x.shape)} "
                f"({first_line(e)}); an axis shorter than the model's stride cannot be "
                "padded by the graph: use a larger --tile, or --backend torch"
            ) from None
        return torch.from_numpy(y)

    def run(self, array: Any) -> Any:
        """The raw session call: float32 numpy ``N×C×*S`` -> numpy logits."""
        return self._session.run([OUTPUT], {INPUT: array})[0]
