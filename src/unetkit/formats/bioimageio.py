"""bioimage.io model packages (model RDF format 0.5): export and import.

``export_package`` writes one ``.zip`` in the current bioimage.io model spec, built with
``bioimageio.spec``'s own ``v0_5`` classes and packed by its ``save_bioimageio_package``:

* axes ``batch, channel, (z,) y, x``; the input's spatial sizes are parameterized from the
  model's size planner (``min + n*step``); a valid-padding model's output refers to the
  input's size minus the context it loses;
* pre-processing that repeats the checkpoint's training normalisation (``zscore`` ->
  ``zero_mean_unit_variance``, ``percentile`` -> ``scale_range`` at the recorded
  percentiles, 1..99 by default; per channel over the spatial axes; ``none`` -> nothing)
  and post-processing for the head (``sigmoid`` for one output channel, else ``softmax``
  over channels): the weights output logits;
* ``onnx`` weights (``formats.onnx.export_onnx``, onnxruntime-checked) and
  ``pytorch_state_dict`` weights whose architecture is ``build_model`` below, an importable
  callable whose kwargs are the registry name and the model config;
* test input/output tensors (``.npy``), a cover picture, a README with a Validation
  section, authors / licence / citations, the training data and unetkit's own facts
  (target, normalisation, ...) under ``config.unetkit``.

``formats.bioimageio_load`` goes the other way (``unetkit predict model.zip images/``).
bioimage.io consumers (deepImageJ in Fiji, ilastik, napari via the bioimageio plugins,
bioimageio.core) run the package without unetkit's post-processing into instances: they
get the probability maps.

``bioimageio.spec`` / ``bioimageio.core`` are the ``bio`` extra, imported inside functions.
"""

import dataclasses
import json
import os
import shutil
import tempfile
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
from unetkit.data.io import write_image
from unetkit.data.synthetic import synth_cells
from unetkit.data.transforms import DEFAULT_PERCENTILES, Normalize
from unetkit.errors import ConfigError
from unetkit.formats._bioimageio_spec import check_package_fields, require_spec
from unetkit.formats.checkpoint import RESERVED_METADATA_KEYS, unwrap
from unetkit.formats.onnx import DEFAULT_OPSET, export_onnx

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


ARCHITECTURE_MODULE = __name__  # build_model lives here; packages name it


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


def normalizer(meta: dict[str, Any]) -> Normalize | None:
    """The checkpoint's training normalisation (None for ``"none"``); percentiles as
    recorded, (1, 99) for checkpoints that recorded none."""
    mode = meta.get("normalize", "zscore")
    if mode == "none":
        return None
    percentiles = tuple(meta.get("normalize_percentiles", DEFAULT_PERCENTILES))
    return Normalize(mode, percentiles=percentiles)


def _preprocessing(v5: Any, meta: dict[str, Any], dims: int) -> list[Any]:
    axes = [v5.AxisId(a) for a in _SPATIAL[-dims:]]
    norm = normalizer(meta)
    if norm is None:
        return []
    if norm.mode == "zscore":
        kw = v5.ZeroMeanUnitVarianceKwargs(axes=axes, eps=_EPS)
        return [v5.ZeroMeanUnitVarianceDescr(kwargs=kw)]
    if norm.mode == "percentile":
        low, high = norm.percentiles
        kw = v5.ScaleRangeKwargs(axes=axes, min_percentile=low, max_percentile=high, eps=_EPS)
        return [v5.ScaleRangeDescr(kwargs=kw)]
    raise ConfigError(f"normalize={norm.mode!r} in the checkpoint has no bioimage.io equivalent")


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
        preprocessing=_preprocessing(v5, meta, model.dims),
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


def expected_output(model: nn.Module, image: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """What a package's consumer must get for ``image`` (float C×S in [0, 1]): unetkit's
    training normalisation (``normalizer(meta)``), the model in float32, then its
    probabilities; 1×K×S'."""
    norm = normalizer(meta)
    x = image if norm is None else norm({"image": image})["image"]
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
    np.save(files["test_output"], expected_output(model, test_image, meta))
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
    spec = require_spec()
    check_package_fields(info.license, info.authors, info.cite)  # before any work
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
            weights=_weights(v5, model, files),
            config=v5.Config(unetkit={**_jsonable(meta), "unetkit_version": __version__}),
        )
        packed = spec.save_bioimageio_package(descr, output_path=Path(tmp) / "package.zip")
        with atomic_path(path) as target:
            shutil.copyfile(packed, target)
    return Path(path)


def _weights(v5: Any, model: nn.Module, files: dict[str, Path]) -> Any:
    """State dict (architecture: ``build_model`` with the registry name and config) and the
    ONNX graph exported from it."""
    arch = v5.ArchitectureFromLibraryDescr(
        import_from=ARCHITECTURE_MODULE,
        callable=v5.Identifier("build_model"),
        kwargs={"model": registry.name_of(model), "config": cfg.to_dict(model.config)},
    )
    return v5.WeightsDescr(
        pytorch_state_dict=v5.PytorchStateDictWeightsDescr(
            source=files["state_dict"],
            architecture=arch,
            pytorch_version=v5.Version(torch.__version__.split("+")[0]),
            dependencies=v5.FileDescr(source=files["env"]),
        ),
        onnx=v5.OnnxWeightsDescr(
            source=files["onnx"], opset_version=DEFAULT_OPSET, parent="pytorch_state_dict"
        ),
    )


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint facts as YAML-safe values (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in meta.items() if k != "format"}))
