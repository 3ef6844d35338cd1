"""Running tiles through a model: the input check, the per-tile predictor (activation, TTA,
precision via a prepared runner) and the streaming loop that writes, adds or blends each
tile's prediction into the output. The engines (``tiling.overlap_tile``,
``tiling.sliding_window``) lay out the grid; this module runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError, DataError, InputSizeError
from unetkit.inference.grid import PAD_MODES, TileGrid, extract_tile
from unetkit.inference.streaming import BandAccumulator, Reduce, resolve_reduce, write_reduced
from unetkit.inference.tta import resolve_tta, tta_predict
from unetkit.runtime import Runner, prepared

__all__ = ["ACTIVATIONS", "Activation", "TilePass", "as_image", "stream_tiles", "tile_predictor"]

ACTIVATIONS = ("probabilities", "logits")

Activation = str | Callable[[torch.Tensor], torch.Tensor] | None


def as_image(model: nn.Module, image: torch.Tensor | np.ndarray, where: str) -> torch.Tensor:
    """Check a single ``C×*S`` float image against the model; numpy arrays are wrapped."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise DataError(
            f"{where}: image must be a torch.Tensor or numpy array, got {type(image).__name__}"
        )
    dims = getattr(model, "dims", image.dim() - 1)
    channels = getattr(model, "in_channels", None)
    expect = f"C×{'×'.join('DHW'[-dims:])} = ({channels or 'C'}, {', '.join(['…'] * dims)})"
    got = f"got shape {tuple(image.shape)}"
    if image.dim() != dims + 1:
        hint = {
            dims: "; add a channel axis: image[None]",
            dims + 2: "; pass one image per call: image[0]",
        }.get(image.dim(), "")
        raise InputSizeError(
            f"{where}: {type(model).__name__} (dims={dims}) takes one image {expect}, {got}{hint}"
        )
    if channels is not None and image.shape[0] != channels:
        raise InputSizeError(
            f"{where}: {type(model).__name__} expects {channels} input "
            f"channel(s), image {expect}, {got}"
        )
    if min(image.shape[1:]) < 1:
        raise InputSizeError(f"{where}: image has an empty axis (shape {tuple(image.shape)})")
    if not image.is_floating_point():
        raise DataError(
            f"{where}: image dtype is {image.dtype}; pass a normalised float "
            "image, e.g. image.float() / 255 or array.astype('float32')"
        )
    return image


def expand(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    values = (int(value),) * dims if isinstance(value, int | np.integer) else tuple(value)
    if len(values) != dims or any(v < 1 for v in values):
        raise ConfigError(f"{name}={value!r} must be a positive int or {dims} positive ints")
    return tuple(int(v) for v in values)


def tile_predictor(
    runner: Runner, activation: Activation, tta: bool | str | None, dims: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Batch of tiles (CPU) -> float32 prediction on the runner's device: activation, then
    the TTA mean. Activations run in float32 also under bf16 (the logits are upcast first).

    Args:
        runner: from ``runtime.prepared(model, precision)``.
        activation: None/"logits", "probabilities" or a callable on ``N×K×*T`` tensors.
        tta: False, True/"flip" or "flip_rot90".
        dims: spatial dimensions of the tiles.
    """
    if activation is None or activation == "logits":
        act: Callable[[torch.Tensor], torch.Tensor] = lambda y: y  # noqa: E731
    elif callable(activation):
        act = activation
    else:
        check_choice("activation", activation, ACTIVATIONS)
        act = getattr(runner.module, "probabilities", None) or _probabilities
    transforms = resolve_tta(tta, dims)
    fmt = runner.memory_format or torch.preserve_format
    return lambda x: tta_predict(
        lambda t: act(runner(t).float()),
        x.to(runner.runs_on, runner.input_dtype, memory_format=fmt),
        transforms,
    )


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


@dataclasses.dataclass(frozen=True)
class TilePass:
    """How one engine call runs its tiles (the engines' keyword arguments, typed once).

    Attributes:
        batch_size: tiles per forward pass (>= 1; does not change the result).
        pad_mode: context beyond the border: one of ``PAD_MODES``.
        activation: None/"logits", "probabilities" or a callable, applied per tile.
        tta: False, True/"flip" or "flip_rot90".
        runner: the prepared model (``runtime.prepared``); None: the model as it is, fp32.
        reduce: None, "argmax" or a callable (see the engines).
        out: optional preallocated output tensor.
        progress: called as ``progress(tiles_done, tiles_total)`` after every batch of
            tiles (a front-end's progress bar; raising from it stops the pass).
    """

    batch_size: int = 4
    pad_mode: str = "reflect"
    activation: Activation = "probabilities"
    tta: bool | str = False
    runner: Runner | None = None
    reduce: Reduce | None = None
    out: torch.Tensor | None = None
    progress: Callable[[int, int], None] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        check_choice("pad_mode", self.pad_mode, PAD_MODES)


def stream_tiles(
    model: nn.Module,
    image: torch.Tensor,
    grid: TileGrid,
    window: tuple[Sequence[int], Sequence[int]],
    opts: TilePass,
    weight: torch.Tensor | None = None,
    accumulate: bool = False,
    band: BandAccumulator | None = None,
) -> torch.Tensor:
    """Run the grid's tiles ``batch_size`` at a time; write (or, with ``accumulate``, add
    ``weight``-ed) the kept part of each prediction into one output tensor, or hand the
    weighted predictions to ``band`` (bounded-memory blending).

    ``window`` = (offset, size) of each input tile relative to the tile's output start;
    ``opts`` says how tiles run; without ``band``, a ``reduce`` applies to each written
    tile part.
    Without a runner the model runs as it is, in fp32 (``runtime.prepared(model, "fp32")``).
    """
    reduce = None if opts.reduce is None or band else resolve_reduce(opts.reduce)
    positions = iter(grid)
    result = opts.out if reduce is not None else None
    with contextlib.ExitStack() as stack:
        runner = opts.runner or stack.enter_context(prepared(model, "fp32"))
        predict = tile_predictor(runner, opts.activation, opts.tta, len(grid.tile))
        done = 0
        while chunk := list(itertools.islice(positions, opts.batch_size)):
            starts = ([s - o for s, o in zip(p, window[0], strict=True)] for p in chunk)
            tiles = [extract_tile(image, s, window[1], opts.pad_mode) for s in starts]
            y = predict(torch.stack(tiles))  # N×K×*tile, float32, on the model's device
            if tuple(y.shape[2:]) != grid.tile:
                raise InputSizeError(
                    f"the model maps a {tuple(window[1])} tile to "
                    f"{tuple(y.shape[2:])}, expected {grid.tile}"
                )
            if weight is not None:
                y = y.mul_(weight.to(y.device))
            y = y.cpu()
            for i, s in enumerate(chunk):
                if band is not None:
                    band.add(y[i], s)
                    continue
                dst, src = grid.regions(s)
                part = y[(i, slice(None), *src)]
                if reduce is not None:
                    result = write_reduced(result, reduce, part, dst, grid.image_size)
                    continue
                if result is None:
                    result = _output(opts.out, (y.shape[1], *grid.image_size), accumulate)
                target = result[(slice(None), *dst)]
                target.add_(part) if accumulate else target.copy_(part)
            done += len(chunk)
            if opts.progress is not None:
                opts.progress(done, len(grid))
        if band is not None:
            result = band.finish()  # inside inference mode: the band is an inference tensor
    return result


def _output(out: torch.Tensor | None, shape: tuple[int, ...], fill: bool) -> torch.Tensor:
    if out is None:
        with torch.inference_mode(False):  # a normal tensor: the caller may edit it later
            return torch.zeros(shape) if fill else torch.empty(shape)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or out.device.type != "cpu":
        raise InputSizeError(
            f"out must be a float32 CPU tensor of shape {shape}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out.zero_() if fill else out
