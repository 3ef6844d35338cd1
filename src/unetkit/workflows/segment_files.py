"""Files and folders in, results on disk out: what `unetkit predict` calls.

``predict_files`` reads each input axis-aware (:func:`read_input`), segments it with
:func:`~unetkit.workflows.segment.predict_image` at the model's training scale, and writes
the results with :mod:`unetkit.workflows.segment_outputs`, resumably.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit.data.io import (
    IMAGE_EXTENSIONS,
    LoadedImage,
    list_images,
    load_image,
    read_image,
    read_pixel_size,
    to_float_image,
    write_image,
)
from unetkit.data.tiff import PixelSize
from unetkit.data.vendor import VENDOR_EXTENSIONS
from unetkit.data.volumes import VOLUME_EXTENSIONS, read_volume, volume_stem
from unetkit.errors import ConfigError, DataError, OutputError
from unetkit.formats.checkpoint import unwrap
from unetkit.formats.onnx import OnnxModel
from unetkit.inference.attention_maps import attention_coefficients, write_attention_heatmaps
from unetkit.inference.backends import load_inference_model, options_for
from unetkit.regression.io import colorize, write_target
from unetkit.workflows import segment
from unetkit.workflows.pictures import attention_preview, map_with_colorbar, overlay
from unetkit.workflows.segment import (
    InferenceOptions,
    check_inference_metadata,
    normalize_input,
    predict_regression,
    scale_factor,
)
from unetkit.workflows.segment_outputs import (
    OutputOptions,
    PredictLedger,
    unique_names,
    write_outputs,
)

__all__ = ["expand_inputs", "predict_files", "read_float_input", "read_input"]

log = logging.getLogger(__name__)


def read_float_input(
    path: Path,
    *,
    volumes: bool = False,
    channels: Sequence[int] | None = None,
    scene: int | None = None,
) -> np.ndarray:
    """A float C×H×W image (C×D×H×W volume) scaled by dtype, as training reads it."""
    return read_input(path, volumes=volumes, channels=channels, scene=scene).image


def read_input(
    path: Path,
    *,
    volumes: bool = False,
    channels: Sequence[int] | None = None,
    scene: int | None = None,
) -> LoadedImage:
    """An input image or volume as float C×[D×]H×W with the pixel size its file states;
    ``scene`` picks the scene of a CZI/ND2/LIF file (None: the first)."""
    path = Path(path)
    if not volumes:
        return load_image(path, channels=channels, scene=scene)
    raw, _ = read_volume(path, scene=scene)  # NIfTI too; a single 2-D page becomes one slice
    image = to_float_image(raw, path=path, spatial_dims=3, channels=channels)
    pixel_size = None
    if path.suffix.lower() in (".tif", ".tiff", *VENDOR_EXTENSIONS):
        pixel_size = read_pixel_size(path, scene=scene)
    return LoadedImage(image, pixel_size, "ZYXC")


def expand_inputs(inputs: Iterable[str | os.PathLike], *, volumes: bool = False) -> list[Path]:
    """Files as given, folders expanded to their images; a missing path is a DataError."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p, extensions=VOLUME_EXTENSIONS) if volumes else list_images(p)
            if not found:
                kinds = ", ".join(VOLUME_EXTENSIONS if volumes else IMAGE_EXTENSIONS)
                raise DataError(f"{p}: folder has no images ({kinds})")
            # entries named like images but unreadable are named by list_images itself
            endings = VOLUME_EXTENSIONS if volumes else IMAGE_EXTENSIONS
            skipped = sorted(
                e.name
                for e in p.iterdir()
                if not e.name.startswith(".") and not e.name.lower().endswith(endings)
            )
            if skipped:
                shown = ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
                log.warning(
                    "%s: skipped %d entries that are not images: %s", p, len(skipped), shown
                )
            files += found
        elif p.is_file():
            files.append(p)
        elif p.exists():  # a FIFO, socket or device: reading it could block for ever
            raise DataError(f"{p}: not a regular file or folder")
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def predict_files(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    options: InferenceOptions | None = None,
    *,
    outputs: OutputOptions | None = None,
    attention_maps: bool = False,
    backend: str | None = None,
    compile: bool | str = False,
) -> list[dict[str, Any]]:
    """Segment files and folders into ``out_dir``, resumably; one ``counts.csv`` row each.

    Per image ``<name>`` (the stem, made unique when stems collide): ``_mask``,
    ``_instances`` (uint16 PNG, or uint32 TIFF above 65,535 objects), ``_labels_preview``,
    ``_overlay``, ``_objects.csv`` and what ``outputs`` asks for (see
    :mod:`unetkit.workflows.segment_outputs`). Images finished by an earlier run with the
    same settings are skipped (``outputs.overwrite`` redoes them).
    ``attention_maps``: also ``<name>_attention_level<l>.png`` heat maps (Attention U-Net)
    and ``_attention_preview_level<l>.png`` with a colour bar;
    regression models write ``<stem>_depth.tif/.png`` (or ``_restored``) instead.
    ``backend``/``compile``: see ``unetkit.inference.backends.load_inference_model``
    (``checkpoint`` may then be an ``.onnx`` file).

    Returns:
        the counts.csv rows of every image (finished earlier or now), in input order.
    """
    options, outputs = options or InferenceOptions(), outputs or OutputOptions()
    model, meta = load_inference_model(checkpoint, backend=backend, compile=compile)
    check_inference_metadata(meta, source=str(checkpoint))
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
    stem_of = volume_stem if volumes else (lambda p: p.stem)
    names = unique_names(files, stem_of)
    _refuse_overwriting_inputs(files, names, out)
    if not outputs.overwrite:
        _refuse_foreign_files(names, out, outputs, regression=meta.get("task") == "regression")
    if meta.get("task") == "regression":
        return _predict_regression_files(model, meta, files, names, out, options)
    settings = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "inference": dataclasses.asdict(options),
        "outputs": {k: v for k, v in dataclasses.asdict(outputs).items() if k != "overwrite"},
    }
    ledger = PredictLedger(out, json.loads(json.dumps(settings)), overwrite=outputs.overwrite)
    if ledger.names():  # names an earlier run gave stay, so its finished images are found
        names = unique_names(files, stem_of, previous=ledger.names())
        _refuse_overwriting_inputs(files, names, out)
    resumed = 0
    for f in files:
        if ledger.done(f, names[f]):
            resumed += 1
            continue
        row = _predict_one(model, meta, f, out / names[f], options, outputs, attention_maps)
        ledger.add({"image": str(f), **row})
    if resumed:
        log.warning(
            "%s: %d image(s) finished by an earlier run were skipped (--overwrite redoes them)",
            out,
            resumed,
        )
    order = {str(f): i for i, f in enumerate(files)}
    return sorted((r for r in ledger.rows if r["image"] in order), key=lambda r: order[r["image"]])


def _predict_one(
    model: torch.nn.Module,
    meta: dict[str, Any],
    path: Path,
    prefix: Path,
    options: InferenceOptions,
    outputs: OutputOptions,
    attention_maps: bool,
) -> dict[str, Any]:
    """Read, segment (at the training scale) and write one input; its counts.csv row.

    ``prefix``: the output folder joined with the image's unique output name."""
    volumes = getattr(model, "dims", 2) == 3
    channels = options.channels if options.channels is not None else trained_channels(meta)
    loaded = read_input(path, volumes=volumes, channels=channels, scene=options.scene)
    _check_channels(path, loaded.image, model)
    pixel_size = loaded.pixel_size
    if options.pixel_size is not None:  # the user's size wins; a file's z spacing is kept
        z = pixel_size.z if pixel_size is not None else None
        pixel_size = PixelSize(options.pixel_size, options.pixel_size, z)
    scale = scale_factor(meta, options, pixel_size)
    pred = segment.predict_image(model, loaded.image, meta, options, scale=scale)
    if attention_maps:
        _write_attention(unwrap(model), normalize_input(loaded.image, meta), prefix)
    row = write_outputs(
        prefix.parent,
        prefix.name,
        loaded.image,
        pred,
        outputs,
        pixel_size=pixel_size,
        overlay_picture=overlay(loaded.image, pred.instances),
    )
    return {**row, "scale": round(scale, 4)} if scale != 1 else row


def _write_attention(model: torch.nn.Module, image: torch.Tensor, prefix: Path) -> None:
    """``<prefix>_attention_level<l>.png`` (blended, pixel for pixel) and
    ``<prefix>_attention_preview_level<l>.png`` (the same over the input, with a colour bar
    of the coefficient from 0 to 1) per gate."""
    coefficients = attention_coefficients(model, image)
    write_attention_heatmaps(coefficients, image, prefix)
    picture = image.detach().cpu().numpy().astype(np.float64)
    for level, alpha in coefficients:
        preview = attention_preview(picture, alpha)
        write_image(f"{prefix}_attention_preview_level{level}.png", preview)


def trained_channels(meta: dict[str, Any]) -> tuple[int, ...] | None:
    """The ``--channels`` a model was trained with (checkpoint metadata), or None."""
    value = meta.get("channels")
    return tuple(int(c) for c in value) if isinstance(value, list) and value else None


def _check_channels(path: Path, image: np.ndarray, model: torch.nn.Module) -> None:
    """DataError naming the file when its channel count is not the model's."""
    expected = getattr(model, "in_channels", None)
    if expected is not None and image.shape[0] != expected:
        raise DataError(
            f"{path}: image has {image.shape[0]} channel(s), the model takes {expected}; "
            "pick and order channels with --channels (e.g. --channels 0 or 1,0)"
        )


# what predict writes per image: always (segmentation), on request (OutputOptions field ->
# ending), and for regression models
_SEGMENTATION_ENDINGS = (
    "_mask.png",
    "_mask.tif",
    "_instances.png",
    "_instances.tif",
    "_labels_preview.png",
    "_overlay.png",
    "_objects.csv",
)
_REQUESTED_ENDINGS = {
    "save_probabilities": "_probabilities.tif",
    "geojson": ".geojson",
    "imagej_rois": "_RoiSet.zip",
}
_REGRESSION_ENDINGS = (
    "_depth.tif",
    "_depth.png",
    "_depth_preview.png",
    "_restored.tif",
    "_restored.png",
)
_OUTPUT_ENDINGS = (*_SEGMENTATION_ENDINGS, *_REQUESTED_ENDINGS.values(), *_REGRESSION_ENDINGS)


def _refuse_foreign_files(
    names: dict[Path, str], out: Path, outputs: OutputOptions, *, regression: bool
) -> None:
    """OutputError when a file this run would write already exists in an ``out`` that no
    earlier predict run wrote into (it has no counts.csv): the user's own ``x_mask.png``
    or QuPath ``x.geojson`` next to the images is never replaced without --overwrite."""
    if (out / "counts.csv").is_file() or not out.is_dir():
        return  # an earlier run's folder: its files are ours, resumed or refused by the ledger
    if regression:
        endings = _REGRESSION_ENDINGS
    else:
        wanted = [e for field, e in _REQUESTED_ENDINGS.items() if getattr(outputs, field)]
        endings = (*_SEGMENTATION_ENDINGS, *wanted)
    for name in names.values():
        for ending in endings:
            target = out / f"{name}{ending}"
            if target.exists():
                raise OutputError(
                    f"{target}: exists and no earlier `unetkit predict` into {out} wrote it; "
                    "pass --overwrite to replace it, or choose another --out"
                )


def _refuse_overwriting_inputs(files: list[Path], names: dict[Path, str], out: Path) -> None:
    """DataError when any output of any image would land on an input file."""
    inputs = {f.resolve() for f in files}
    fixed = [out / "counts.csv", out / "predict.json"]
    for target in fixed + [out / f"{n}{e}" for n in names.values() for e in _OUTPUT_ENDINGS]:
        if target.resolve() in inputs:
            raise DataError(
                f"{target}: output would overwrite an input image; choose another --out folder"
            )


def _predict_regression_files(
    model: torch.nn.Module,
    meta: dict[str, Any],
    files: list[Path],
    names: dict[Path, str],
    out: Path,
    options: InferenceOptions,
) -> list[dict[str, Any]]:
    """``<stem>_depth.tif`` (float32 metres), ``<stem>_depth.png`` (colour, pixel for pixel)
    and ``<stem>_depth_preview.png`` (with a colour bar in metres) per image, or
    ``<stem>_restored.tif``/``.png`` for restoration models."""
    kind = "depth" if meta.get("output", "depth") == "depth" else "restored"
    rows = []
    for f in files:
        image = to_float_image(read_image(f), path=f)
        pred = predict_regression(model, image, meta, options)
        write_target(out / f"{names[f]}_{kind}.tif", pred)
        if kind == "depth":
            picture = colorize(pred[0])
            preview = map_with_colorbar(pred[0], label="depth (m)", cmap="magma_r")
            write_image(out / f"{names[f]}_depth_preview.png", preview)
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
        write_image(out / f"{names[f]}_{kind}.png", picture)
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
