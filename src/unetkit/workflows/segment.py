"""Files in, segmented and counted cells out: what `unetkit predict` / `evaluate` call.

``predict_image`` normalises an image as in training, runs the tiling engine, and turns
probabilities into a class mask and labelled instances; ``predict_files`` writes masks,
instance labels, overlays and per-object tables; ``evaluate_dataset`` scores predictions
against labelled images.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.color import label2rgb
from skimage.segmentation import find_boundaries

from unetkit.data.io import list_images, read_image, to_float_image, write_image
from unetkit.data.transforms import DEFAULT_PERCENTILES, Normalize
from unetkit.data.volumes import VOLUME_EXTENSIONS, read_volume, volume_stem
from unetkit.errors import ConfigError, DataError
from unetkit.formats.checkpoint import unwrap
from unetkit.formats.onnx import OnnxModel
from unetkit.inference.backends import load_inference_model, options_for
from unetkit.inference.tiling import predict_tiled
from unetkit.segmentation.metrics import MetricAccumulator, evaluate_segmentation
from unetkit.segmentation.postprocess import (
    instances_from_boundary,
    instances_from_semantic,
    object_table,
    write_object_table_csv,
)


@dataclasses.dataclass
class Prediction:
    """probabilities: C×H×W; labels: H×W class indices (foreground classes for instance
    targets); instances: H×W int32 labelled objects (0 = background)."""

    probabilities: np.ndarray
    labels: np.ndarray
    instances: np.ndarray


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """``precision``: "fp32" (exact), "bf16" or "auto" (bf16 where the hardware computes it
    natively: a frozen copy with prepacked weights on CPUs); see
    ``unetkit.inference.tiling.predict_tiled``."""

    tile: int | None = None
    overlap: float = 0.25
    tta: bool = False
    batch_size: int = 4
    min_size: int = 10
    precision: str = "fp32"


def load_for_inference(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and the facts predict needs (target, normalisation) from a checkpoint, or
    from a LoRA run's adapter file (loaded onto the base checkpoint it names)."""
    from unetkit.workflows.adapt import load_with_metadata

    return load_with_metadata(checkpoint)


def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    meta: dict[str, Any],
    options: InferenceOptions = InferenceOptions(),
) -> Prediction:
    """Segment one float image C×H×W (scaled as read, e.g. by ``to_float_image``)."""
    x = _normalized(image, meta)
    probs = predict_tiled(
        model,
        x,
        tile=options.tile,
        overlap=options.overlap,
        tta=options.tta,
        batch_size=options.batch_size,
        precision=options.precision,
    ).numpy()
    target = meta.get("target", "semantic")
    if target == "boundary":
        threshold = meta.get("seed_threshold", 0.5)  # calibrated on validation data
        instances = instances_from_boundary(
            probs, interior_threshold=threshold, min_size=options.min_size, min_seed_size=5
        )
        labels = (instances > 0).astype(np.int64)
    else:
        labels = (probs[0] > 0.5).astype(np.int64) if probs.shape[0] == 1 else probs.argmax(0)
        instances = instances_from_semantic(labels, min_size=options.min_size)
    return Prediction(probs, labels, instances.astype(np.int32))


def _normalized(image: np.ndarray, meta: dict[str, Any]) -> torch.Tensor:
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
    from unetkit.regression import to_prediction

    output = meta.get("output", "depth")
    return predict_tiled(
        model,
        _normalized(image, meta),
        tile=options.tile,
        overlap=options.overlap,
        tta=options.tta,
        batch_size=options.batch_size,
        activation=lambda y: to_prediction(y, output),
        precision=options.precision,
    ).numpy()


def overlay(image: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """RGB uint8 picture: the image in grey, objects tinted, their outlines in yellow."""
    grey = image.mean(0) if image.ndim == 3 else image
    lo, hi = np.percentile(grey, [1, 99.5])
    grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = label2rgb(instances, image=grey, alpha=0.3, bg_label=0, image_alpha=1.0)
    rgb[find_boundaries(instances, mode="inner")] = (1.0, 0.9, 0.0)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def read_float_input(path: Path, *, volumes: bool = False) -> np.ndarray:
    """A float C×H×W image (C×D×H×W volume) scaled by dtype, as training reads it."""
    if volumes:
        raw, _ = read_volume(path)
        return to_float_image(raw, path=path, spatial_dims=3)
    return to_float_image(read_image(path), path=path)


def expand_inputs(inputs: Iterable[str | os.PathLike], *, volumes: bool = False) -> list[Path]:
    """Files as given, folders expanded to their images; a missing path is a DataError."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p, extensions=VOLUME_EXTENSIONS) if volumes else list_images(p)
            if not found:
                kinds = ".tif, .tiff, .nii, .nii.gz" if volumes else ".png, .tif, .tiff, .jpg"
                raise DataError(f"{p}: folder has no images ({kinds})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def predict_files(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    options: InferenceOptions = InferenceOptions(),
    *,
    attention_maps: bool = False,
    backend: str | None = None,
    compile: bool | str = False,
) -> list[dict[str, Any]]:
    """Write ``<stem>_mask.png``, ``_instances.png`` (uint16), ``_overlay.png`` and
    ``_objects.csv`` per image, and ``counts.csv``; returns one summary row per image.
    ``attention_maps``: also ``<stem>_attention_level<l>.png`` heat maps (Attention U-Net);
    regression models write ``<stem>_depth.tif/.png`` (or ``_restored``) instead.
    ``backend``/``compile``: see ``unetkit.inference.backends.load_inference_model``
    (``checkpoint`` may then be an ``.onnx`` file)."""
    model, meta = load_inference_model(checkpoint, backend=backend, compile=compile)
    options = options_for(model, options)
    if attention_maps and isinstance(model, OnnxModel):
        raise ConfigError(f"{checkpoint}: --attention-maps needs --backend torch")
    if attention_maps and not hasattr(model, "gated_levels"):
        raise ConfigError(
            f"{checkpoint}: --attention-maps needs a model with attention gates "
            f"(e.g. attention_unet); this is {meta['model']!r}"
        )
    volumes = getattr(model, "dims", 2) == 3
    files = expand_inputs(inputs, volumes=volumes)
    out = Path(out_dir)
    resolved_inputs = {f.resolve() for f in files}
    rows = []
    if meta.get("task") == "regression":
        return _predict_regression_files(model, meta, files, out, options)
    for f in files:
        image = read_float_input(f, volumes=volumes)
        pred = predict_image(model, image, meta, options)
        stem = volume_stem(f) if volumes else f.stem
        # volumes: masks and labels as (multi-page) TIFF, no 2D overlay picture
        names = (
            ("mask.tif", "instances.tif", "objects.csv")
            if volumes
            else ("mask.png", "instances.png", "overlay.png", "objects.csv")
        )
        targets = {k.split(".")[0]: out / f"{stem}_{k}" for k in names}
        clash = [p for p in targets.values() if p.resolve() in resolved_inputs]
        if clash:
            raise DataError(
                f"{clash[0]}: output would overwrite an input image; choose another --out folder"
            )
        mask = pred.labels.astype(np.uint8)
        write_image(targets["mask"], mask * 255 if mask.max() <= 1 else mask)
        write_image(targets["instances"], pred.instances.astype(np.uint16))
        if not volumes:
            write_image(targets["overlay"], overlay(image, pred.instances))
        if attention_maps:
            from unetkit.inference.attention_maps import save_attention_heatmaps

            save_attention_heatmaps(unwrap(model), _normalized(image, meta), out / stem)
        table = object_table(pred.instances, image)
        write_object_table_csv(table, targets["objects"])
        rows.append(
            {
                "image": str(f),
                "objects": len(table),
                "foreground_fraction": float((pred.labels > 0).mean()),
            }
        )
    write_object_table_csv(rows, out / "counts.csv")
    return rows


def _predict_regression_files(
    model: torch.nn.Module,
    meta: dict[str, Any],
    files: list[Path],
    out: Path,
    options: InferenceOptions,
) -> list[dict[str, Any]]:
    """``<stem>_depth.tif`` (float32 metres) + ``<stem>_depth.png`` (colour) per image, or
    ``<stem>_restored.tif``/``.png`` for restoration models."""
    from unetkit.regression.io import colorize, write_target

    kind = "depth" if meta.get("output", "depth") == "depth" else "restored"
    rows = []
    for f in files:
        image = to_float_image(read_image(f), path=f)
        pred = predict_regression(model, image, meta, options)
        write_target(out / f"{f.stem}_{kind}.tif", pred)
        if kind == "depth":
            picture = colorize(pred[0])
        else:
            picture = (
                np.clip(
                    np.moveaxis(pred, 0, -1).squeeze(-1)
                    if pred.shape[0] == 1
                    else np.moveaxis(pred, 0, -1),
                    0,
                    1,
                )
                * 255
            ).astype(np.uint8)
        write_image(out / f"{f.stem}_{kind}.png", picture)
        rows.append(
            {
                "image": str(f),
                "min": float(pred.min()),
                "max": float(pred.max()),
                "mean": float(pred.mean()),
                "objects": 0,
            }
        )
    return rows


def evaluate_regression(
    model: torch.nn.Module,
    meta: dict[str, Any],
    samples: Iterable[dict],
    options: InferenceOptions = InferenceOptions(),
    on_prediction: Callable[[dict, np.ndarray], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Depth metrics (AbsRel, RMSE, δ<1.25, ...) or MAE/RMSE/PSNR per image, and their means."""
    from unetkit.regression import depth_metrics, psnr

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
    ``on_prediction(sample, prediction)`` sees each prediction (e.g. to draw overlays)."""
    acc = MetricAccumulator()
    rows = []
    for s in samples:
        image = s["image"].numpy() if isinstance(s["image"], torch.Tensor) else s["image"]
        pred = predict_image(model, image, meta, options)
        if on_prediction is not None:
            on_prediction(s, pred)
        true_inst = s.get("instances")
        true_inst = None if true_inst is None else np.asarray(true_inst)
        scores = evaluate_segmentation(
            pred.labels,
            np.asarray(s["mask"]),
            num_classes=num_classes,
            instances_pred=pred.instances if true_inst is not None else None,
            instances_true=true_inst,
        )
        acc.add(scores)
        rows.append({"image": s.get("name", len(rows)), **scores})
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
        options: InferenceOptions fields (tile, overlap, tta, batch_size, min_size,
            precision).

    Example:
        >>> pred = unetkit.predict("run/best.safetensors", "cells.png")  # doctest: +SKIP
        >>> pred.instances.max()  # number of cells  # doctest: +SKIP
    """
    if isinstance(model, (str, os.PathLike)):  # a checkpoint, or an exported .onnx file
        model, meta = load_inference_model(model)
    else:
        meta = {"normalize": "zscore", "target": "semantic"}
    path = image if isinstance(image, (str, os.PathLike)) else None
    raw = read_image(path) if path is not None else np.asarray(image)
    opts = options_for(model, InferenceOptions(**options))
    return predict_image(model, to_float_image(raw, path=path), meta, opts)
