"""Reading bioimage.io model packages: run a unetkit model's package, test any package.

``load_package`` rebuilds the model of a package whose ``pytorch_state_dict`` architecture
is ``unetkit.formats.bioimageio.build_model`` (or runs its ONNX weights), so ``unetkit
predict model.zip images/`` works; ``check_package`` runs bioimageio.core's own test.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats._bioimageio_spec import require_spec
from unetkit.formats.bioimageio import ARCHITECTURE_MODULE, RDF_NAMES, build_model
from unetkit.formats.checkpoint import load_state_dict_strict
from unetkit.formats.onnx import OnnxModel


def _rdf_name(path: Path) -> str:
    """The RDF file inside a package zip; CheckpointError if it is no bioimage.io package."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such bioimage.io package file")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        raise CheckpointError(f"{path}: not a readable .zip file") from None
    found = [n for n in RDF_NAMES if n in names]
    if not found:
        raise CheckpointError(
            f"{path}: zip has no rdf.yaml or bioimageio.yaml; not a bioimage.io model package"
        )
    return found[0]


def _member(z: zipfile.ZipFile, descr: Any, source: Path) -> bytes:
    """A weights file's bytes, checked against the RDF's SHA-256."""
    name = str(descr.source.path if hasattr(descr.source, "path") else descr.source)
    try:
        data = z.read(name)
    except KeyError:
        raise CheckpointError(f"{source}: package lists {name} but does not contain it") from None
    if descr.sha256 is not None and hashlib.sha256(data).hexdigest() != str(descr.sha256):
        raise CheckpointError(
            f"{source}: {name} does not match its sha256 in the RDF (a changed or damaged file)"
        )
    return data


def load_package(
    path: str | os.PathLike, *, backend: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a bioimage.io package whose architecture is a unetkit model, and the
    metadata predict needs (target and the rest from ``config.unetkit``; the normalisation
    from the RDF's pre-processing, which every other consumer runs).

    Args:
        path: the package ``.zip``.
        backend: "torch" (default; the ``pytorch_state_dict`` weights) or "onnx" (the
            ``onnx`` weights in onnxruntime).

    Example:
        >>> model, meta = load_package("model.zip")  # doctest: +SKIP
    """
    require_spec()
    from bioimageio.spec import InvalidDescr, load_model_description
    from bioimageio.spec.model import v0_5 as v5

    source = Path(path)
    _rdf_name(source)
    try:  # io checks off: a package's URLs must not make predict wait on the network
        descr = load_model_description(source, perform_io_checks=False)
    except Exception as e:  # the spec's own validation errors, many types
        raise CheckpointError(f"{source}: not a valid bioimage.io model ({_first(e)})") from None
    if isinstance(descr, InvalidDescr) or not isinstance(descr, v5.ModelDescr):
        raise CheckpointError(f"{source}: not a valid bioimage.io model in format 0.5")
    weights = descr.weights.pytorch_state_dict
    arch = getattr(weights, "architecture", None)
    if not (
        isinstance(arch, v5.ArchitectureFromLibraryDescr)
        and arch.import_from == ARCHITECTURE_MODULE
    ):
        raise CheckpointError(
            f"{source}: its architecture is not a unetkit model; run it with bioimageio.core "
            "(`bioimageio predict`) or the tool it came from"
        )
    extra = getattr(descr.config, "model_extra", None) or {}
    meta = {"target": "semantic", **extra.get("unetkit", {}), **_normalization_of(descr)}
    meta.update(model=arch.kwargs["model"], config=arch.kwargs["config"])
    with zipfile.ZipFile(source) as z:
        if backend == "onnx":
            if descr.weights.onnx is None:
                raise CheckpointError(f"{source}: package has no onnx weights; use --backend torch")
            model = OnnxModel(_member(z, descr.weights.onnx, source), source_name=str(source))
            return model, {**meta, **model.meta}
        raw = io.BytesIO(_member(z, weights, source))
        # the restricted loader: tensors and containers only, never arbitrary objects
        state = torch.load(raw, map_location="cpu", weights_only=True)
    model = build_model(**arch.kwargs)
    load_state_dict_strict(model, state, source=str(source))
    return model.eval(), meta


def _normalization_of(descr: Any) -> dict[str, Any]:
    """The input normalisation the RDF describes (what every consumer runs), as metadata."""
    for step in descr.inputs[0].preprocessing:
        if step.id == "zero_mean_unit_variance":
            return {"normalize": "zscore"}
        if step.id == "scale_range":
            low, high = step.kwargs.min_percentile, step.kwargs.max_percentile
            return {"normalize": "percentile", "normalize_percentiles": [low, high]}
    return {"normalize": "none"}


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[:2])[:240] if text else type(e).__name__


def check_package(path: str | os.PathLike, *, weight_format: str | None = None) -> Any:
    """Run bioimageio.core's ``test_description`` on a package (spec validation, file
    checksums, reproduction of the test outputs with each weights format, inference at
    several sizes); returns its ``ValidationSummary`` (``.status == "passed"``)."""
    require_spec()
    try:
        from bioimageio.core import test_description
    except ImportError:
        raise ConfigError(
            "testing a package needs bioimageio.core: pip install 'unetkit[bio]'"
        ) from None
    return test_description(Path(path), weight_format=weight_format)
