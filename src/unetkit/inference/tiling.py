"""Tiled inference for images and volumes of any size (1D, 2D, 3D).

* **Overlap-tile** (Ronneberger et al., MICCAI 2015, Fig. 2) for valid-padding models: each
  output tile is predicted from the tile plus the context the model consumes, context beyond
  the border filled by mirroring. Tiles start at multiples of the network's shift period
  (``2**depth`` for a U-Net), so every max-pool sees the same pixel pairs as one forward pass
  over the whole mirrored image: the stitched result equals that pass.
* **Sliding window** for same-padding models: overlapping windows weighted by a Gaussian
  importance map (nnU-Net, Isensee et al. 2021) or uniformly, then averaged.

Memory stays bounded: tiles are cut lazily (mirroring is index arithmetic, no padded copy of
the image), run ``batch_size`` at a time and added into one ``out_channels×*S`` float32
output. The Gaussian is separable and the grid a Cartesian product, so the weight sum is a
product of per-axis sums and needs no full-size buffer. Peak memory: the output plus one
tile batch (plus the image, which may be a numpy memmap). With ``reduce`` (e.g. "argmax")
not even the ``K×*S`` float32 output exists: windows are blended in a band one tile high
(``streaming.BandAccumulator``) and each finished slab is reduced (uint8 labels, one class,
float16, ...) as soon as no later window can touch it. Precision is decided once, by the
caller: a ``runner`` from ``runtime.prepared(model, precision)`` (bf16: on CPUs a frozen copy
with prepacked oneDNN weights, elsewhere autocast with channels-last weights and tiles).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError
from unetkit.inference.grid import PAD_MODES, TileGrid, axis_profiles, importance_map
from unetkit.inference.streaming import BandAccumulator, Reduce, resolve_reduce
from unetkit.inference.tile_options import TileOptions
from unetkit.inference.tile_stream import (
    ACTIVATIONS,
    Activation,
    TilePass,
    as_image,
    expand,
    stream_tiles,
    tile_predictor,
)
from unetkit.runtime import Runner

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_TILE_VOXELS",
    "WHOLE_IMAGE_VOXELS",
    "Activation",
    "TileOptions",
    "overlap_tile",
    "predict_tiled",
    "sliding_window",
    "tile_predictor",
]

logger = logging.getLogger(__name__)

DEFAULT_TILE_VOXELS = 2**18  # default tile: 512² in 2D, 64³ in 3D
WHOLE_IMAGE_VOXELS = 2**20  # TileOptions(tile=None) runs smaller inputs in one pass


# --- the engines -------------------------------------------------------------------------
def overlap_tile(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    tile_out: int | Sequence[int],
    batch_size: int = 4,
    activation: Activation = None,
    tta: bool | str = False,
    pad_mode: str = "reflect",
    runner: Runner | None = None,
    reduce: Reduce | None = None,
    out: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Overlap-tile prediction with a valid-padding model (Ronneberger et al. 2015, Fig. 2).

    Args:
        model: a valid-padding ``SegmentationModel`` (``model.is_valid_padding``).
        image: ``C×*S`` float image of any size (numpy accepted).
        tile_out: requested output tile size (int or per axis); raised to the next size the
            model can produce (``model.input_size_for``) and to at least the shift period,
            and capped at the image size. Input tiles add the model's margin on every side.
        batch_size: tiles per forward pass (does not change the result).
        activation: None/"logits" (default), "probabilities" (softmax/sigmoid) or a callable
            on ``N×K×*T`` tensors, applied per tile (tiles do not overlap).
        tta: False, True/"flip" or "flip_rot90": per-tile augmentation, averaged after
            ``activation``.
        pad_mode: context beyond the border: reflect (mirror, the paper) | replicate | constant.
        runner: the model prepared by ``runtime.prepared(model, precision)`` (a frozen bf16
            copy on CPUs, autocast elsewhere); None runs ``model`` as it is, in fp32 (exact).
        reduce: None, "argmax" (uint8 labels ``*S``) or a callable mapping each tile's
            ``K×*R`` float32 prediction to ``(...)×*R`` (e.g. one class, float16): only the
            reduced result is stored.
        out: optional preallocated CPU tensor to write into (e.g. a memmap): float32
            ``K×*S``, or the reduced shape and dtype with ``reduce``.

    Returns:
        ``out_channels×*S`` float32 on CPU, equal to one forward pass over the whole image
        mirror-padded by the margin (and up to a valid size), cropped to ``S``; with
        ``reduce``, that reduced.

    Example:
        >>> import unetkit
        >>> net = unetkit.create_model("unet", channels=(4, 8), padding="valid", norm="none")
        >>> overlap_tile(net, torch.rand(1, 70, 53), tile_out=24).shape
        torch.Size([2, 70, 53])
    """
    image = as_image(model, image, "overlap_tile")
    check_choice("pad_mode", pad_mode, PAD_MODES)
    if not getattr(model, "is_valid_padding", False):
        raise ConfigError(
            f"overlap_tile needs a valid-padding model; {type(model).__name__} "
            "keeps the size (same padding): use sliding_window instead"
        )
    size = tuple(image.shape[1:])
    dims = len(size)
    period = _shift_period(model, dims)
    want = [
        max(min(t, n), p)
        for t, n, p in zip(expand(tile_out, dims, "tile_out"), size, period, strict=True)
    ]
    tile_in = model.input_size_for(want)
    tile_o = model.output_size_for(tile_in)
    before = [(i - o) // 2 for i, o in zip(tile_in, tile_o, strict=True)]
    # Output tiles start at multiples of the shift period so the network sees the same
    # pooling phase as a whole-image pass; a tile longer than its step is partly discarded.
    step = [o // p * p for o, p in zip(tile_o, period, strict=True)]
    grid = TileGrid.stepped(size, tile_o, step)
    logger.debug(
        "overlap_tile: %d tiles, input %s -> output %s, step %s", len(grid), tile_in, tile_o, step
    )
    opts = TilePass(batch_size, pad_mode, activation, tta, runner, reduce, out, progress)
    return stream_tiles(model, image, grid, (before, tile_in), opts)


def _shift_period(model: nn.Module, dims: int) -> tuple[int, ...]:
    """Shift under which the model is translation-equivariant: the spacing of its valid
    input sizes (``2**depth`` for a valid U-Net; 1 for a pooling-free network)."""
    first = model.input_size_for((1,) * dims)
    out = model.output_size_for(first)
    second = model.input_size_for(tuple(o + 1 for o in out))
    return tuple(b - a for a, b in zip(first, second, strict=True))


def sliding_window(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    *,
    tile: int | Sequence[int],
    overlap: float = 0.25,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    batch_size: int = 4,
    pad_mode: str = "reflect",
    activation: Activation = "probabilities",
    tta: bool | str = False,
    runner: Runner | None = None,
    reduce: Reduce | None = None,
    out: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sliding-window prediction with a same-padding model, blended (nnU-Net style).

    Each window's prediction is multiplied by an importance map (a Gaussian with
    sigma = ``sigma_scale * tile``, or ones), added into a running sum, and the sum is
    divided by the summed weights. Blending is done after ``activation``: by default on
    probabilities, so every output is a convex combination of probabilities (a valid
    distribution, agreeing with TTA averaging); pass ``activation=None`` to blend logits
    (nnU-Net v2's choice) and get logits back.

    Args:
        model: a same-padding model (any module mapping ``N×C×*T`` to ``N×K×*T``).
        image: ``C×*S`` float image of any size (numpy accepted).
        tile: window size (int or per axis); axes shorter than it are padded.
        overlap: minimum overlap of neighbouring windows as a fraction of the tile, [0, 1).
        blend: gaussian | constant.
        sigma_scale: Gaussian sigma as a fraction of the tile (0.125 as in nnU-Net).
        batch_size: windows per forward pass (does not change the result).
        pad_mode: padding where a window leaves the image: reflect | replicate | constant.
        activation: "probabilities" (default), None/"logits", or a callable.
        tta: False, True/"flip" or "flip_rot90": per-window test-time augmentation.
        runner: the model prepared by ``runtime.prepared(model, precision)`` (a frozen bf16
            copy on CPUs, autocast elsewhere); None runs ``model`` as it is, in fp32 (exact).
        reduce: None, "argmax" (uint8 labels ``*S``) or a callable mapping blended
            ``K×*R`` float32 slabs to ``(...)×*R``. Bounded memory: windows are blended in a
            band one tile high along the first axis and each finished slab is reduced and
            stored, so no ``K×*S`` float32 buffer exists. Equal to reducing the plain result.
        out: optional preallocated CPU tensor: float32 ``K×*S`` to accumulate into, or the
            reduced shape and dtype with ``reduce``.

    Returns:
        ``K×*S`` float32 on CPU (or the reduced result).

    Example:
        >>> import unetkit
        >>> net = unetkit.create_model("unet", channels=(4, 8))
        >>> sliding_window(net, torch.rand(1, 100, 70), tile=64).shape
        torch.Size([2, 100, 70])
    """
    image = as_image(model, image, "sliding_window")
    check_choice("pad_mode", pad_mode, PAD_MODES)
    if getattr(model, "is_valid_padding", False):
        raise ConfigError(
            f"sliding_window needs a same-padding model; {type(model).__name__}"
            " uses valid padding: use overlap_tile (or predict_tiled)"
        )
    size = tuple(image.shape[1:])
    dims = len(size)
    tile = expand(tile, dims, "tile")
    grid = TileGrid.sliding(size, tile, overlap)
    profiles = axis_profiles(tile, blend, sigma_scale)
    logger.debug("sliding_window: %d windows of %s over %s", len(grid), tile, size)
    opts = TilePass(batch_size, pad_mode, activation, tta, runner, reduce, out, progress)
    weight = importance_map(tile, blend, sigma_scale) if blend == "gaussian" else None
    window = ((0,) * dims, tile)
    if reduce is not None:
        sums = [grid.axis_weights(a, p) for a, p in enumerate(profiles)]
        band = BandAccumulator(size, tile, sums, resolve_reduce(reduce), out)
        return stream_tiles(model, image, grid, window, opts, weight, band=band)
    result = stream_tiles(model, image, grid, window, opts, weight, accumulate=True)
    # Divide by the summed weights, one axis at a time: the weight is a product over axes.
    for axis, profile in enumerate(profiles):
        shape = [1] * (dims + 1)
        shape[axis + 1] = size[axis]
        result.div_(grid.axis_weights(axis, profile).float().view(shape))
    return result


def predict_tiled(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    options: TileOptions | None = None,
    *,
    runner: Runner | None = None,
    device: str | torch.device | None = None,
    activation: Activation = "probabilities",
    reduce: Reduce | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Predict a whole image of any size: overlap-tile for valid-padding models, Gaussian
    sliding window otherwise.

    Args:
        model: a ``SegmentationModel`` (its size planner lays out the tiles); run in eval
            mode under ``torch.inference_mode`` (its train/eval flag is restored afterwards).
        image: ``C×*S`` float image (numpy accepted); stays where it is, tiles are copied.
        options: how to tile (:class:`TileOptions`: tile, overlap, batch size, TTA, blend,
            padding); ``tile=None`` runs the whole image in one pass when it has at most
            ``WHOLE_IMAGE_VOXELS`` voxels, else uses tiles of about ``DEFAULT_TILE_VOXELS``
            input voxels. None: ``TileOptions()``.
        runner: the model prepared by ``runtime.prepared(model, precision)``: with bf16
            (on CPUs a frozen copy with prepacked weights) 3-5x faster on CPUs with native
            bf16 (AVX512-BF16/AMX); None runs ``model`` as it is, in fp32 (exact).
        device: run the model there (the model is moved with ``model.to(device)`` and stays);
            None uses the device the model is on. Not with ``runner``.
        activation: "probabilities" (default), None/"logits", or a callable.
        reduce: None, "argmax" (uint8 label map ``*S``) or a callable on ``K×*R``
            probabilities: store only that, in bounded memory (see ``sliding_window``).
        progress: ``progress(tiles_done, tiles_total)`` after every batch of tiles.

    Returns:
        ``out_channels×*S`` float32 tensor on CPU, or the ``reduce``-d result.

    Example:
        >>> import unetkit
        >>> net = unetkit.create_model("unet", channels=(4, 8), padding="valid")
        >>> predict_tiled(net, torch.rand(1, 300, 200), TileOptions(tile=96)).shape
        torch.Size([2, 300, 200])
    """
    image = as_image(model, image, "predict_tiled")
    options = options if options is not None else TileOptions()
    if device is not None:
        if runner is not None:
            raise ConfigError(
                "predict_tiled: pass device or runner, not both (prepare the model where it "
                "runs: model.to(device), then runtime.prepared(model, precision))"
            )
        model.to(device)
    size = tuple(image.shape[1:])
    valid = getattr(model, "is_valid_padding", False)
    tile = _tile_for(model, size, options, valid)
    common = dict(batch_size=options.batch_size, activation=activation, tta=options.tta)
    common.update(pad_mode=options.pad_mode, runner=runner, reduce=reduce, progress=progress)
    if valid:
        return overlap_tile(model, image, tile_out=tile, **common)
    blending = dict(overlap=options.overlap, blend=options.blend, sigma_scale=options.sigma_scale)
    return sliding_window(model, image, tile=tile, **blending, **common)


def _tile_for(
    model: nn.Module, size: tuple[int, ...], options: TileOptions, valid: bool
) -> tuple[int, ...]:
    """The tile predict_tiled runs: the options' (capped at the image: a tile beyond it only
    adds padding, and a 100000 tile would ask for 80 GB), the whole image when it is small,
    else about ``DEFAULT_TILE_VOXELS`` input voxels."""
    dims = len(size)
    asked = options.tile_size(dims)
    if asked is not None:
        return tuple(min(t, n) for t, n in zip(asked, size, strict=True))
    whole = model.input_size_for(size) if valid else size
    if math.prod(whole) <= WHOLE_IMAGE_VOXELS:
        return size
    edge = round(DEFAULT_TILE_VOXELS ** (1 / dims)) // 16 * 16
    margin = model.margin()[0] if valid else 0
    return tuple(min(max(edge - 2 * margin, 16), n) for n in size)
