"""bioimage.io model packages (model RDF format 0.5): export and import.

``export_package`` writes one ``.zip`` in the current bioimage.io model spec, built with
``bioimageio.spec``'s own ``v0_5`` classes and packed by its ``save_bioimageio_package``:

* axes ``batch, channel, (z,) y, x``; the input's spatial sizes are parameterized from the
  model's size planner (``min + n*step``); a valid-padding model's output refers to the
  input's size minus the context it loses;
* pre-processing that repeats the checkpoint's training normalisation (``zscore`` ->
  ``zero_mean_unit_variance``, ``percentile`` -> ``scale_range`` 1..99, per channel over
  the spatial axes; ``none`` -> nothing) and post-processing for the head (``sigmoid`` for
  one output channel, else ``softmax`` over channels): the weights output logits;
* ``onnx`` weights (``formats.onnx.export_onnx``, onnxruntime-checked) and
  ``pytorch_state_dict`` weights whose architecture is ``build_model`` below, an importable
  callable whose kwargs are the registry name and the model config;
* test input/output tensors (``.npy``), a cover picture, a README with a Validation
  section, authors / licence / citations, the training data and unetkit's own facts
  (target, normalisation, ...) under ``config.unetkit``.

``load_package`` goes the other way for packages whose architecture is a unetkit model, so
``unetkit predict model.zip images/`` runs them (with the state dict, or the ONNX weights
with ``--backend onnx``). bioimage.io consumers (deepImageJ in Fiji, ilastik, napari via
the bioimageio plugins, bioimageio.core) run the package without unetkit's post-processing
into instances: they get the probability maps.

``bioimageio.spec`` / ``bioimageio.core`` are the ``bio`` extra, imported here only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from unetkit import config as cfg
from unetkit import registry
from unetkit._atomic import atomic_path
from unetkit._version import __version__
from unetkit.data.transforms import Normalize
from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats.checkpoint import RESERVED_METADATA_KEYS, load_state_dict_strict, unwrap

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
INPUT_ID, OUTPUT_ID = "input", "probabilities"
# the paper every unetkit model descends from; cited in every package
UNET_CITATION = (
    "Ronneberger, Fischer and Brox: U-Net: Convolutional Networks for Biomedical Image "
    "Segmentation. MICCAI 2015",
    "10.1007/978-3-319-24574-4_28",
)
_SPATIAL = ("z", "y", "x")
_EPS = 1e-6  # unetkit's Normalize floors the scale at 1e-6; the spec adds eps instead
_TEST_EDGE = {2: 64, 3: 24}  # spatial size of the default test input


def _require_spec() -> Any:
    try:
        import bioimageio.spec as spec
        from bioimageio.spec._internal import io_packaging
    except ImportError:
        raise ConfigError(
            "bioimage.io packages need bioimageio.spec: pip install 'unetkit[bio]'"
        ) from None
    from bioimageio.spec.model import v0_4

    for serializer in (io_packaging.package_file_descr_serializer, v0_4.package_weights):
        _tolerate_handler_call(serializer)
    return spec


class _TolerantHandler:
    """A pydantic serializer handler that ignores extra positional arguments."""

    def __init__(self, handler: Any) -> None:
        self._handler = handler

    def __call__(self, value: Any, *_ignored: Any) -> Any:
        return self._handler(value)


def _trampoline(value: Any, handler: Any, info: Any) -> Any:
    return _unetkit_original(value, _UnetkitTolerantHandler(handler), info)  # noqa: F821


def _tolerate_handler_call(serializer: Any) -> None:
    """bioimageio.spec 0.5.12's wrap serializers call pydantic's handler as
    ``handler(value, info)``; the pydantic-core that pydantic 2.14 ships reads the second
    argument as an index key and raises TypeError on every dump (packaging, test runs).
    The serializers are bound into the spec's schemas, so their code is swapped for a
    trampoline (one per module, in the module's own globals) that hands the original a
    handler taking ``handler(value)``, the documented call in every pydantic 2 release."""
    if serializer.__code__ is _trampoline.__code__:
        return
    module = serializer.__globals__
    module["_unetkit_original"] = type(serializer)(
        serializer.__code__, module, serializer.__name__, serializer.__defaults__
    )
    module["_UnetkitTolerantHandler"] = _TolerantHandler
    serializer.__code__ = _trampoline.__code__


def build_model(model: str, config: dict[str, Any]) -> nn.Module:
    """The package's ``pytorch_state_dict`` architecture: a registered unetkit model.

    Args:
        model: registry name, e.g. ``"unet"``.
        config: the model config as a dict (the checkpoint's ``config`` metadata).

    Example:
        >>> net = build_model("unet", {"channels": [4, 8]})  # doctest: +SKIP
    """
    return registry.model_from_config(model, dict(config), source="bioimage.io package")


@dataclasses.dataclass(frozen=True)
class PackageInfo:
    """What a person says about the model (the spec requires name, description, authors,
    licence and at least one citation; the U-Net paper is always cited).

    Attributes:
        name: human-readable model name (letters, digits, spaces, ``_-.``).
        description: one or two sentences.
        authors: author names.
        license: SPDX identifier.
        cite: extra (text, DOI) citations.
        tags: keywords; "unetkit", "unet" and "segmentation" are always added.
        training_data: a description of the training images.
    """

    name: str
    description: str
    authors: tuple[str, ...]
    license: str = "CC-BY-4.0"
    cite: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    training_data: str | None = None

    def __post_init__(self) -> None:
        if not self.authors or not all(a.strip() for a in self.authors):
            raise ConfigError("--authors: a bioimage.io package needs at least one author name")
        if not self.name.strip() or not self.description.strip():
            raise ConfigError("--name and --description must not be empty")


def default_test_image(model: nn.Module) -> np.ndarray:
    """A float C×(D×)H×W test image in [0, 1]: synthetic cells, one copy per channel
    (a 3-D model gets the cells slightly shifted per slice)."""
    from unetkit.data.synthetic import synth_cells

    edge = _TEST_EDGE[model.dims]
    size = _planned_size(model, (edge,) * model.dims)
    image, _ = synth_cells(size[-2:], seed=0, n_cells=(4, 8))
    if model.dims == 3:
        image = np.stack([np.roll(image, i, axis=1) for i in range(size[0])])
    return np.repeat(image[None], model.in_channels, axis=0).astype(np.float32)


def _planned_size(model: nn.Module, want: Sequence[int]) -> tuple[int, ...]:
    return tuple(model.nearest_valid_input(want))


def _axis_sizes(model: nn.Module) -> tuple[int, int, int]:
    """(min, step, output offset) per spatial axis from the size planner: every input
    ``min + n*step`` is valid; the output is ``input + offset`` (0 for same padding)."""
    if not model.is_valid_padding:
        # same padding runs any size; the step is the model's pad multiple so that tiling
        # tools pick sizes that need no padding
        step = int(getattr(model, "multiple", 16))
        return step, step, 0
    lo = model.nearest_valid_input((1,))[0]
    step = model.nearest_valid_input((lo + 1,))[0] - lo
    nxt = lo + 1
    while step <= 0:  # ties go down: walk up to the next valid length
        nxt += 1
        step = model.nearest_valid_input((nxt,))[0] - lo
    return lo, step, model.output_size_for((lo,))[0] - lo


def _preprocessing(v5: Any, normalize: str, dims: int) -> list[Any]:
    axes = [v5.AxisId(a) for a in _SPATIAL[-dims:]]
    if normalize == "zscore":
        kw = v5.ZeroMeanUnitVarianceKwargs(axes=axes, eps=_EPS)
        return [v5.ZeroMeanUnitVarianceDescr(kwargs=kw)]
    if normalize == "percentile":
        kw = v5.ScaleRangeKwargs(axes=axes, min_percentile=1.0, max_percentile=99.0, eps=_EPS)
        return [v5.ScaleRangeDescr(kwargs=kw)]
    if normalize == "none":
        return []
    raise ConfigError(f"normalize={normalize!r} in the checkpoint has no bioimage.io equivalent")


def _tensors(v5: Any, model: nn.Module, meta: dict[str, Any], files: dict[str, Path]) -> tuple:
    lo, step, offset = _axis_sizes(model)
    names = _SPATIAL[-model.dims :]
    in_axes = [
        v5.BatchAxis(),
        v5.ChannelAxis(
            channel_names=[v5.Identifier(f"channel{i}") for i in range(model.in_channels)]
        ),
        *[
            v5.SpaceInputAxis(id=v5.AxisId(a), size=v5.ParameterizedSize(min=lo, step=step))
            for a in names
        ],
    ]
    out_axes = [
        v5.BatchAxis(),
        v5.ChannelAxis(
            channel_names=[v5.Identifier(f"class{i}") for i in range(model.out_channels)]
        ),
        *[
            v5.SpaceOutputAxis(
                id=v5.AxisId(a),
                size=v5.SizeReference(
                    tensor_id=v5.TensorId(INPUT_ID), axis_id=v5.AxisId(a), offset=offset
                ),
            )
            for a in names
        ],
    ]
    head = (
        v5.SigmoidDescr()
        if model.out_channels == 1
        else v5.SoftmaxDescr(kwargs=v5.SoftmaxKwargs(axis=v5.AxisId("channel")))
    )
    normalize = meta.get("normalize", "zscore")
    inputs = v5.InputTensorDescr(
        id=v5.TensorId(INPUT_ID),
        description=f"image scaled to [0, 1] by its dtype; normalised per channel ({normalize})",
        axes=in_axes,
        test_tensor=v5.FileDescr(source=files["test_input"]),
        data=v5.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=_preprocessing(v5, normalize, model.dims),
    )
    outputs = v5.OutputTensorDescr(
        id=v5.TensorId(OUTPUT_ID),
        description=f"class probabilities (unetkit target: {meta.get('target', 'semantic')})",
        axes=out_axes,
        test_tensor=v5.FileDescr(source=files["test_output"]),
        data=v5.IntervalOrRatioDataDescr(type="float32"),
        postprocessing=[head],
    )
    return inputs, outputs


def expected_output(model: nn.Module, image: np.ndarray, normalize: str) -> np.ndarray:
    """What a package's consumer must get for ``image`` (float C×S in [0, 1]): unetkit's
    training normalisation, the model in float32, then its probabilities; 1×K×S'."""
    x = image if normalize == "none" else Normalize(normalize)({"image": image})["image"]
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None])
        return model.probabilities(logits).numpy().astype(np.float32)


def _readme(info: PackageInfo, meta: dict[str, Any], name: str) -> str:
    facts = {k: v for k, v in meta.items() if k not in RESERVED_METADATA_KEYS}
    return (
        f"# {info.name}\n\n{info.description}\n\n"
        f"A `{name}` model from unetkit {__version__}. Inputs are normalised as in training "
        f"({meta.get('normalize', 'zscore')}); the output is the class probabilities "
        "(sigmoid or softmax of the logits). unetkit turns them into instances "
        "(`unetkit predict model.zip images/ --out out/`).\n\n"
        f"Training data: {info.training_data or 'not described'}\n\n"
        f"unetkit facts: `{facts}`\n\n"
        "## Validation\n\n"
        "The package's test input and output were computed with unetkit in float32; "
        "`bioimageio test model.zip` reproduces them with the ONNX and the PyTorch "
        "state-dict weights. Validate on your own annotated images with "
        "`unetkit evaluate model.zip DATA`.\n"
    )


def _write_files(
    folder: Path,
    model: nn.Module,
    meta: dict[str, Any],
    info: PackageInfo,
    test_image: np.ndarray,
    cover: np.ndarray | None,
) -> dict[str, Path]:
    from unetkit.data.io import write_image
    from unetkit.formats.onnx import export_onnx

    files = {
        "test_input": folder / "test_input.npy",
        "test_output": folder / "test_output.npy",
        "onnx": folder / "weights.onnx",
        "state_dict": folder / "weights.pt",
        "cover": folder / "cover.png",
        "readme": folder / "README.md",
        "env": folder / "environment.yaml",
    }
    np.save(files["test_input"], test_image[None].astype(np.float32))
    np.save(files["test_output"], expected_output(model, test_image, meta["normalize"]))
    extra = {k: v for k, v in meta.items() if k not in RESERVED_METADATA_KEYS}
    export_onnx(model, files["onnx"], metadata=extra)
    # a plain dict of tensors: what torch.load(weights_only=True) in every consumer reads
    torch.save(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        files["state_dict"],
    )
    if cover is None:  # the first output channel's probability as a grey picture
        probs = np.load(files["test_output"])[0, -1]
        cover = (probs[probs.shape[0] // 2] if probs.ndim == 3 else probs) * 255
    write_image(files["cover"], np.asarray(cover).astype(np.uint8))
    files["readme"].write_text(_readme(info, meta, registry.name_of(model)), encoding="utf-8")
    files["env"].write_text(
        "name: unetkit\nchannels: [conda-forge]\ndependencies:\n  - python>=3.11\n  - pip\n"
        f"  - pip:\n    - unetkit=={__version__}\n",
        encoding="utf-8",
    )
    return files


def export_package(
    model: nn.Module,
    meta: dict[str, Any],
    path: str | os.PathLike,
    info: PackageInfo,
    *,
    test_image: np.ndarray | None = None,
    cover: np.ndarray | None = None,
) -> Path:
    """Write a bioimage.io model package (``.zip``, model RDF 0.5; atomic).

    Args:
        model: a registered segmentation model (LoRA adapters merged: no LoRA layers).
        meta: the checkpoint's metadata (``normalize``, ``target``, ...).
        path: the ``.zip`` to write.
        info: name, description, authors, licence, citations, training data.
        test_image: float C×(D×)H×W in [0, 1] (as ``to_float_image`` reads it); default
            ``default_test_image(model)``. Its spatial size must suit the model.
        cover: H×W(×3) uint8 picture (e.g. an overlay); default a probability map.

    Returns:
        ``path``.

    Example:
        >>> info = PackageInfo("cells", "Nuclei in fluorescence.", ("Ada",))  # doctest: +SKIP
        >>> export_package(unetkit.load("best.safetensors"), meta, "m.zip", info)  # doctest: +SKIP
    """
    spec = _require_spec()
    from bioimageio.spec.dataset.v0_3 import DatasetDescr
    from bioimageio.spec.model import v0_5 as v5

    model = unwrap(model).float().eval()
    name = registry.name_of(model)
    meta = {"normalize": "zscore", "target": "semantic", **meta}
    if meta.get("task", "segmentation") != "segmentation":
        raise ConfigError(
            f"{name}: bioimage.io export covers segmentation models, not {meta['task']!r} ones"
        )
    image = default_test_image(model) if test_image is None else np.asarray(test_image)
    if image.shape[0] != model.in_channels or image.ndim != model.dims + 1:
        raise ConfigError(
            f"test image of shape {image.shape} does not fit {name} "
            f"({model.in_channels} channel(s), {model.dims}-D)"
        )
    cites = [UNET_CITATION, *info.cite]
    with tempfile.TemporaryDirectory(prefix="unetkit-bioimageio-") as tmp:
        files = _write_files(Path(tmp), model, meta, info, image, cover)
        inputs, outputs = _tensors(v5, model, meta, files)
        arch = v5.ArchitectureFromLibraryDescr(
            import_from=__name__,
            callable=v5.Identifier("build_model"),
            kwargs={"model": name, "config": cfg.to_dict(model.config)},
        )
        authors = [v5.Author(name=a.strip()) for a in info.authors]
        training = DatasetDescr(
            name=f"{info.name} training data",
            description=info.training_data or "not described by the exporter",
            authors=authors,
            cite=[v5.CiteEntry(text=t, doi=v5.Doi(d)) for t, d in cites[:1]],
            license=info.license,
        )
        descr = v5.ModelDescr(
            name=info.name,
            description=info.description,
            authors=authors,
            cite=[v5.CiteEntry(text=t, doi=v5.Doi(d)) for t, d in cites],
            license=info.license,
            tags=sorted({"unetkit", "unet", "segmentation", name, *info.tags}),
            documentation=v5.FileDescr(source=files["readme"]),
            covers=[v5.FileDescr(source=files["cover"])],
            inputs=[inputs],
            outputs=[outputs],
            training_data=training,
            weights=v5.WeightsDescr(
                pytorch_state_dict=v5.PytorchStateDictWeightsDescr(
                    source=files["state_dict"],
                    architecture=arch,
                    pytorch_version=v5.Version(torch.__version__.split("+")[0]),
                    dependencies=v5.FileDescr(source=files["env"]),
                ),
                onnx=v5.OnnxWeightsDescr(
                    source=files["onnx"], opset_version=17, parent="pytorch_state_dict"
                ),
            ),
            config=v5.Config(unetkit={**_jsonable(meta), "unetkit_version": __version__}),
        )
        packed = spec.save_bioimageio_package(descr, output_path=Path(tmp) / "package.zip")
        with atomic_path(path) as target:
            shutil.copyfile(packed, target)
    return Path(path)


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint facts as YAML-safe values (tuples become lists)."""
    import json

    return json.loads(json.dumps({k: v for k, v in meta.items() if k != "format"}))


def _rdf_name(path: Path) -> str:
    """The RDF file inside a package zip; CheckpointError if it is no bioimage.io package."""
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


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip with a bioimage.io RDF (``rdf.yaml``/``bioimageio.yaml``)."""
    p = Path(path)
    if p.suffix.lower() != ".zip" or not p.is_file():
        return False
    try:
        _rdf_name(p)
    except CheckpointError:
        return False
    return True


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
    metadata predict needs (normalisation, target; from ``config.unetkit``, else from the
    pre-processing).

    Args:
        path: the package ``.zip``.
        backend: "torch" (default; the ``pytorch_state_dict`` weights) or "onnx" (the
            ``onnx`` weights in onnxruntime).

    Example:
        >>> model, meta = load_package("model.zip")  # doctest: +SKIP
    """
    _require_spec()
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
    if not (isinstance(arch, v5.ArchitectureFromLibraryDescr) and arch.import_from == __name__):
        raise CheckpointError(
            f"{source}: its architecture is not a unetkit model; run it with bioimageio.core "
            "(`bioimageio predict`) or the tool it came from"
        )
    extra = getattr(descr.config, "model_extra", None) or {}
    meta = {"normalize": _normalize_of(descr), "target": "semantic", **extra.get("unetkit", {})}
    meta.update(model=arch.kwargs["model"], config=arch.kwargs["config"])
    with zipfile.ZipFile(source) as z:
        if backend == "onnx":
            from unetkit.formats.onnx import OnnxModel

            if descr.weights.onnx is None:
                raise CheckpointError(f"{source}: package has no onnx weights; use --backend torch")
            model = OnnxModel(_member(z, descr.weights.onnx, source), source_name=str(source))
            return model, {**meta, **model.meta}
        state = torch.load(
            io.BytesIO(_member(z, weights, source)), map_location="cpu", weights_only=True
        )  # the restricted loader: tensors and containers only
    model = build_model(**arch.kwargs)
    load_state_dict_strict(model, state, source=str(source))
    return model.eval(), meta


def _normalize_of(descr: Any) -> str:
    ids = [p.id for p in descr.inputs[0].preprocessing]
    if "zero_mean_unit_variance" in ids:
        return "zscore"
    return "percentile" if "scale_range" in ids else "none"


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[:2])[:240] if text else type(e).__name__


def check_package(path: str | os.PathLike, *, weight_format: str | None = None) -> Any:
    """Run bioimageio.core's ``test_description`` on a package (spec validation, file
    checksums, reproduction of the test outputs with each weights format, inference at
    several sizes); returns its ``ValidationSummary`` (``.status == "passed"``)."""
    _require_spec()
    try:
        from bioimageio.core import test_description
    except ImportError:
        raise ConfigError(
            "testing a package needs bioimageio.core: pip install 'unetkit[bio]'"
        ) from None
    return test_description(Path(path), weight_format=weight_format)
