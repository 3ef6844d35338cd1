"""Files in, segmented and counted cells out: what `unetkit predict` / `evaluate` call.

``predict_image`` normalises an image as in training, runs the tiling engine, and turns
probabilities into a class mask and labelled instances (rescaled to the model's training
scale when pixel sizes or object diameters say so); ``evaluate_dataset`` scores
predictions against labelled images. Files and folders: :mod:`.segment_files`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from skimage.segmentation import relabel_sequential
from skimage.transform import resize

from unetkit import runtime
from unetkit.data.datasets import TARGETS
from unetkit.data.io import load_image, to_float_image
from unetkit.data.mask_summary import object_area
from unetkit.data.tiff import PixelSize
from unetkit.data.transforms import DEFAULT_PERCENTILES, Normalize
from unetkit.errors import CheckpointError, ConfigError, DataError
from unetkit.formats.loading import PACKAGE_SUFFIX, load_model_file, load_with_metadata
from unetkit.inference import TileOptions
from unetkit.inference.backends import load_inference_model, options_for
from unetkit.inference.tiling import predict_tiled
from unetkit.regression import depth_metrics, psnr, to_prediction
from unetkit.segmentation.metrics import MetricAccumulator, evaluate_segmentation
from unetkit.segmentation.postprocess import instances_from_boundary, instances_from_semantic

log = logging.getLogger(__name__)

RESCALE_TOLERANCE = 0.01  # inputs within 1 % of the training scale are not resampled
DEFAULT_MIN_SIZE = 10  # pixels, for checkpoints that do not record their objects' size
MIN_SIZE_FRACTION = 0.1  # of the median training object's area
MAX_ZOOM = 64.0  # rescaling beyond this (either way) is a wrong pixel size or diameter


@dataclasses.dataclass
class Prediction:
    """probabilities: C×H×W; labels: H×W class indices (foreground classes for instance
    targets); instances: H×W int32 labelled objects (0 = background)."""

    probabilities: np.ndarray
    labels: np.ndarray
    instances: np.ndarray


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """``tiles``: how the image is tiled (:class:`~unetkit.inference.TileOptions`: tile,
    overlap, batch size, TTA), handed unchanged to the tiling engine.

    ``min_size``: objects smaller than this (pixels) are dropped.

    ``precision``: one of ``runtime.PRECISIONS``: "auto" (default: bf16 where the hardware
    computes it natively, a frozen copy with prepacked weights on CPUs), "bf16" or "fp32"
    (exact); applied once by ``runtime.prepared``.

    ``channels``: input channels to use, in order (``--channels 1,0``); None: all.
    ``pixel_size``: µm per pixel of the inputs, overriding what the files state.
    ``min_size``: objects with fewer pixels are dropped; None: 10 % of the median training
    object's area where the checkpoint records its diameter (fragments, not cells), else 10.
    ``object_diameter``: typical object diameter in the inputs (pixels). With the
    checkpoint's ``pixel_size`` / ``object_diameter`` (the training scale), inputs are
    rescaled to that scale, predicted, and the results mapped back to the input grid.
    ``scene``: the scene of CZI/ND2/LIF inputs (from 0); None: the first (with a warning).
    """

    tiles: TileOptions = TileOptions()
    min_size: int | None = None
    precision: str = runtime.DEFAULT_PRECISION
    channels: tuple[int, ...] | None = None
    pixel_size: float | None = None
    object_diameter: float | None = None
    scene: int | None = None

    def __post_init__(self) -> None:
        for flag, value in (
            ("--pixel-size", self.pixel_size),
            ("--object-diameter", self.object_diameter),
        ):
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} {value}: expected a positive number")


def min_object_size(meta: dict[str, Any], spatial_dims: int, given: int | None = None) -> int:
    """Smallest object kept: ``given``, else 10 % of the area of the median training object
    (checkpoint ``object_diameter``, in training pixels), else ``DEFAULT_MIN_SIZE``.

    Example:
        >>> min_object_size({"object_diameter": 20.0}, 2)
        31
    """
    if given is not None:
        return int(given)
    diameter = meta.get("object_diameter")
    if not isinstance(diameter, (int, float)) or not diameter > 0:
        return DEFAULT_MIN_SIZE
    return max(1, round(MIN_SIZE_FRACTION * object_area(float(diameter), spatial_dims)))


def inference_options(**fields: Any) -> InferenceOptions:
    """InferenceOptions from flat keyword fields: TileOptions' own go into ``tiles``."""
    names = {f.name for f in dataclasses.fields(TileOptions)}
    tiles = TileOptions(**{k: v for k, v in fields.items() if k in names})
    return InferenceOptions(tiles=tiles, **{k: v for k, v in fields.items() if k not in names})


def load_for_inference(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and the facts predict needs (target, normalisation) from a checkpoint, or
    from a LoRA run's adapter file (loaded onto the base checkpoint it names), or from a
    bioimage.io package ``.zip`` of a unetkit model."""
    if os.fspath(checkpoint).lower().endswith(PACKAGE_SUFFIX):
        model, meta = load_model_file(checkpoint)
    else:
        model, meta = load_with_metadata(checkpoint)
    check_inference_metadata(meta, source=str(checkpoint))
    return model, meta


def check_inference_metadata(meta: dict[str, Any], *, source: str) -> None:
    """Refuse checkpoints predict/evaluate cannot use: a diffusion model, or metadata with
    an unknown task/target/normalisation or a class count below 1 (CheckpointError)."""
    if "diffusion" in meta:
        raise CheckpointError(
            f"{source}: a text-to-image diffusion checkpoint; predict/evaluate/export need a "
            f"segmentation or regression model (use `unetkit generate` for this one)"
        )
    choices = {
        "task": ("segmentation", "regression"),
        "target": TARGETS,
        "normalize": ("zscore", "percentile", "none"),
    }
    for key, allowed in choices.items():
        if key in meta and meta[key] not in allowed:
            raise CheckpointError(
                f"{source}: metadata {key}={meta[key]!r} is not one of {', '.join(allowed)}; "
                f"the file was edited or written by another tool"
            )
    n = meta.get("num_classes", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{source}: metadata num_classes={n!r} is not an integer >= 1")
    for key in ("pixel_size", "object_diameter"):  # the training scale inputs are zoomed to
        value = meta.get(key)
        if value is not None and not _positive_number(value):
            raise CheckpointError(f"{source}: metadata {key}={value!r} is not a positive number")


def _positive_number(value: Any) -> bool:
    return type(value) in (int, float) and bool(np.isfinite(value)) and value > 0  # not bool


def scale_factor(
    meta: dict[str, Any], options: InferenceOptions, pixel_size: PixelSize | None = None
) -> float:
    """How much to zoom an input so its objects appear at the model's training scale.

    ``object_diameter`` in the options and the checkpoint: trained / given diameter;
    else a known input pixel size (``options.pixel_size``, else the file's) and the
    checkpoint's ``pixel_size``: input / trained pixel size; else 1.
    """
    for key in ("pixel_size", "object_diameter"):
        if meta.get(key) is not None and not _positive_number(meta[key]):
            raise CheckpointError(f"checkpoint metadata {key}={meta[key]!r} is not positive")
    if options.object_diameter is not None:
        trained = meta.get("object_diameter")
        if not trained:
            raise ConfigError(
                "--object-diameter: the checkpoint does not state the object diameter it was "
                "trained at (metadata 'object_diameter'); use --pixel-size, or leave it out"
            )
        what = f"--object-diameter {options.object_diameter:g}"
        return _check_zoom(float(trained) / options.object_diameter, what, trained)
    given = options.pixel_size or (pixel_size.x if pixel_size is not None else None)
    trained = meta.get("pixel_size")
    if given is None or not trained:
        if options.pixel_size is not None:
            log.info("the checkpoint states no training pixel size: inputs are not rescaled")
        return 1.0
    what = f"--pixel-size {options.pixel_size:g}" if options.pixel_size else None
    what = what or f"the input's pixel size {given:g} µm (file metadata; or give --pixel-size)"
    return _check_zoom(float(given) / float(trained), what, trained)


def _check_zoom(factor: float, what: str, trained: float) -> float:
    """``factor``, or a ConfigError naming ``what`` beyond ``MAX_ZOOM`` (nm given for µm)."""
    if not 1 / MAX_ZOOM <= factor <= MAX_ZOOM:
        raise ConfigError(
            f"{what}: the zoom to the checkpoint's training scale ({trained:g}) would be "
            f"{factor:.3g}, beyond {1 / MAX_ZOOM:g}..{MAX_ZOOM:g}; check the value and unit (µm)"
        )
    return factor


def _rescaled(pred: Prediction, shape: tuple[int, ...]) -> Prediction:
    """Probabilities (linear) and labels (nearest) mapped back to the input grid."""
    probs = resize(pred.probabilities, (pred.probabilities.shape[0], *shape), order=1)
    nearest = {"order": 0, "preserve_range": True, "anti_aliasing": False}
    labels = resize(pred.labels, shape, **nearest).astype(pred.labels.dtype)
    instances = resize(pred.instances, shape, **nearest).astype(np.int32)
    return Prediction(probs.astype(np.float32), labels, relabel_sequential(instances)[0])


def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    meta: dict[str, Any],
    options: InferenceOptions = InferenceOptions(),
    *,
    scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> Prediction:
    """Segment one float image C×H×W (scaled as read, e.g. by ``to_float_image``).

    ``scale`` (see :func:`scale_factor`): the image is zoomed by it before prediction
    and the results are mapped back to its own grid (labels by nearest neighbour).
    ``progress(tiles_done, tiles_total)`` is called as tiles finish (raising stops)."""
    if abs(scale - 1.0) > RESCALE_TOLERANCE:
        shape = image.shape[1:]
        zoomed = tuple(max(1, round(n * scale)) for n in shape)
        small = scale < 1
        image = resize(image, (image.shape[0], *zoomed), order=1, anti_aliasing=small)
        pred = predict_image(model, image.astype(np.float32), meta, options, progress=progress)
        return _rescaled(pred, shape)
    x = normalize_input(image, meta)
    with runtime.prepared(model, options.precision) as runner:
        probs = predict_tiled(
            model,
            x,
            options.tiles,
            runner=runner,
            progress=progress,
        ).numpy()
    target = meta.get("target", "semantic")
    min_size = min_object_size(meta, probs.ndim - 1, options.min_size)
    if target == "boundary":
        threshold = meta.get("seed_threshold", 0.5)  # calibrated on validation data
        instances = instances_from_boundary(
            probs, interior_threshold=threshold, min_size=min_size, min_seed_size=5
        )
        labels = (instances > 0).astype(np.int64)
    else:
        labels = (probs[0] > 0.5).astype(np.int64) if probs.shape[0] == 1 else probs.argmax(0)
        instances = instances_from_semantic(labels, min_size=min_size)
    return Prediction(probs, labels, instances.astype(np.int32))


def normalize_input(image: np.ndarray, meta: dict[str, Any]) -> torch.Tensor:
    """The float C×... image normalised as the checkpoint's training did, as a tensor."""
    mode = meta.get("normalize", "zscore")
    if mode != "none":
        percentiles = tuple(meta.get("normalize_percentiles", DEFAULT_PERCENTILES))
        image = Normalize(mode, percentiles=percentiles)({"image": image})["image"]
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))


def predict_regression(
    model: torch.nn.Module,
    image: np.ndarray,
    meta: dict[str, Any],
    options: InferenceOptions = InferenceOptions(),
) -> np.ndarray:
    """Dense regression of one float image C×H×W: depth in metres or restored values, K×H×W."""
    output = meta.get("output", "depth")
    with runtime.prepared(model, options.precision) as runner:
        return predict_tiled(
            model,
            normalize_input(image, meta),
            options.tiles,
            activation=lambda y: to_prediction(y, output),
            runner=runner,
        ).numpy()


def evaluate_regression(
    model: torch.nn.Module,
    meta: dict[str, Any],
    samples: Iterable[dict],
    options: InferenceOptions = InferenceOptions(),
    on_prediction: Callable[[dict, np.ndarray], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Depth metrics (AbsRel, RMSE, δ<1.25, ...) or MAE/RMSE/PSNR per image, and their means."""
    acc = MetricAccumulator()
    rows = []
    for s in samples:
        pred = predict_regression(model, np.asarray(s["image"]), meta, options)
        if on_prediction is not None:
            on_prediction(s, pred)
        target, valid = np.asarray(s["target"]), np.asarray(s["valid"])
        if meta.get("output", "depth") == "depth":
            scores = depth_metrics(pred, target, valid)
        else:
            err = (pred - target)[:, valid]
            scores = {
                "mae": float(np.abs(err).mean()),
                "rmse": float(np.sqrt((err**2).mean())),
                "psnr": psnr(pred, target, valid=valid),
            }
        acc.add(scores)
        rows.append({"image": s.get("name", len(rows)), **scores})
    return rows, acc.compute()


def evaluate_dataset(
    model: torch.nn.Module,
    meta: dict[str, Any],
    samples: Iterable[dict],
    options: InferenceOptions = InferenceOptions(),
    *,
    num_classes: int = 2,
    on_prediction: Callable[[dict, Prediction], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Score predictions on samples with ``image`` (float C×H×W, unnormalised), ``mask``
    (semantic classes) and optionally ``instances``; returns (per-image rows, means).

    Instance metrics (AP, Rand error) are computed for every image: against the
    ``instances`` labels where the sample has them, else against the connected components
    of the mask's foreground classes, as the ISBI 2012 challenge scores binary membrane
    maps (cells are the regions between membranes). Each row's ``truth_objects`` says
    which ("labels" or "components"). ``options.channels`` picks input channels.
    ``on_prediction(sample, prediction)`` sees each prediction (e.g. to draw overlays)."""
    acc = MetricAccumulator()
    rows = []
    for s in samples:
        image = s["image"].numpy() if isinstance(s["image"], torch.Tensor) else s["image"]
        if options.channels is not None:
            image = to_float_image(
                np.moveaxis(image, 0, -1),
                path=s.get("name"),
                spatial_dims=image.ndim - 1,
                channels=options.channels,
            )
        expected = getattr(model, "in_channels", None)
        if expected is not None and image.shape[0] != expected:
            raise DataError(
                f"{s.get('name', 'image')}: image has {image.shape[0]} channel(s), the model "
                f"takes {expected}; pick and order channels with --channels (e.g. 0 or 1,0)"
            )
        pred = predict_image(model, image, meta, options, scale=scale_factor(meta, options))
        if on_prediction is not None:
            on_prediction(s, pred)
        mask = np.asarray(s["mask"])
        true_inst = s.get("instances")
        source = "labels" if true_inst is not None else "components"
        true_inst = instances_from_semantic(mask) if true_inst is None else np.asarray(true_inst)
        scores = evaluate_segmentation(
            pred.labels,
            mask,
            num_classes=num_classes,
            instances_pred=pred.instances,
            instances_true=true_inst,
        )
        acc.add(scores)
        rows.append({"image": s.get("name", len(rows)), **scores, "truth_objects": source})
    return rows, acc.compute()


def predict(
    model: torch.nn.Module | str | os.PathLike,
    image: np.ndarray | str | os.PathLike,
    **options: Any,
) -> Prediction:
    """Segment one image with a model or checkpoint path: the one-call Python API.

    Args:
        model: a checkpoint or exported ``.onnx`` path, or a model (then trained on
            z-scored images, semantic).
        image: a file path, or an array as read from a file (H×W, H×W×C, any dtype).
        options: TileOptions fields (tile, overlap, batch_size, tta, ...) and the other
            InferenceOptions fields (min_size, precision, channels, pixel_size,
            object_diameter, scene). A file is read axis-aware
            (OME/ImageJ TIFF) and rescaled to the checkpoint's training scale when its
            pixel size and the checkpoint's are known.

    Example:
        >>> pred = unetkit.predict("run/best.safetensors", "cells.png")  # doctest: +SKIP
        >>> pred.instances.max()  # number of cells  # doctest: +SKIP
    """
    if isinstance(model, (str, os.PathLike)):  # a checkpoint, or an exported .onnx file
        model, meta = load_inference_model(model)
    else:
        meta = {"normalize": "zscore", "target": "semantic"}
    opts = options_for(model, inference_options(**options))
    pixel_size = None
    if isinstance(image, (str, os.PathLike)):
        loaded = load_image(image, channels=opts.channels, scene=opts.scene)
        array, pixel_size = loaded.image, loaded.pixel_size
    else:
        array = to_float_image(np.asarray(image), channels=opts.channels)
    if opts.pixel_size is not None:
        pixel_size = PixelSize(opts.pixel_size, opts.pixel_size)
    return predict_image(model, array, meta, opts, scale=scale_factor(meta, opts, pixel_size))
