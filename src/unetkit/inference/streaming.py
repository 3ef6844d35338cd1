"""Bounded-memory blending for the sliding-window engine: finish the output slab by slab.

Windows are visited in row-major order of their grid, so once every window starting at row
``s`` (along the first spatial axis) has been added, no later window touches the rows
before ``s``: they are final. ``BandAccumulator`` keeps only the band of rows a window can
still reach (one tile high), divides the finished rows by the blending weights (a product
of per-axis sums, no full-size weight buffer), passes them to a ``reduce`` function
(argmax labels, one class, float16 probabilities, ...) and writes the reduced slab into
the output. Peak memory: the band (``K × tile_0 × S_1 × ...`` float32) plus the reduced
output, instead of a ``K × S`` float32 sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from unetkit.config import check_choice
from unetkit.errors import ConfigError, InputSizeError

REDUCTIONS = ("argmax",)
Reduce = str | Callable[[torch.Tensor], torch.Tensor]


def resolve_reduce(reduce: Reduce) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function for ``reduce``: "argmax" (``K×*R`` -> ``*R`` labels, uint8 when
    K <= 256, else int64) or a callable mapping ``K×*R`` float32 to ``(...)×*R``."""
    if callable(reduce):
        return reduce
    check_choice("reduce", reduce, REDUCTIONS)
    return _argmax


def _argmax(p: torch.Tensor) -> torch.Tensor:
    labels = p.argmax(0)
    return labels.to(torch.uint8) if p.shape[0] <= 256 else labels


def reduced_output(
    out: torch.Tensor | None, part: torch.Tensor, image_size: Sequence[int]
) -> torch.Tensor:
    """The output tensor for reduced parts like ``part`` (``(...)×*R``) over the image:
    ``out`` checked, or a new zero tensor of ``part``'s leading shape and dtype."""
    dims = len(image_size)
    shape = (*part.shape[: part.dim() - dims], *image_size)
    if out is None:
        with torch.inference_mode(False):  # a normal tensor: the caller may edit it later
            return torch.zeros(shape, dtype=part.dtype)
    if tuple(out.shape) != shape or out.dtype != part.dtype or out.device.type != "cpu":
        raise InputSizeError(
            f"out must be a {part.dtype} CPU tensor of shape {shape} (what reduce returns), "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out


def write_reduced(
    out: torch.Tensor | None,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    block: torch.Tensor,
    dst: Sequence[slice],
    image_size: Sequence[int],
) -> torch.Tensor:
    """Reduce a finished ``K×*R`` block and write it at ``dst`` (spatial slices) into the
    output (created on first use); returns the output."""
    part = reduce(block)
    dims = len(image_size)
    if tuple(part.shape[part.dim() - dims :]) != tuple(block.shape[1:]):
        raise ConfigError(
            f"reduce must keep the spatial shape: it mapped {tuple(block.shape)} "
            f"to {tuple(part.shape)}"
        )
    out = reduced_output(out, part, image_size)
    out[(Ellipsis, *dst)] = part
    return out


class BandAccumulator:
    """Weighted sum of window predictions over a band of rows; finished rows are reduced.

    Args:
        image_size: spatial size ``S`` of the image.
        tile: window size.
        axis_weights: per spatial axis, the summed window weight of each pixel (float64,
            length ``S_i``); the blend divides by their product.
        reduce: function applied to every finished ``K×*R`` float32 slab.
        out: optional preallocated output for the reduced result.

    Example:
        >>> acc = BandAccumulator((4, 3), (2, 3), [torch.ones(4), torch.ones(3)], _argmax)
        >>> acc.add(torch.rand(2, 2, 3), (0, 0)); acc.add(torch.rand(2, 2, 3), (2, 0))
        >>> acc.finish().shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        image_size: Sequence[int],
        tile: Sequence[int],
        axis_weights: Sequence[torch.Tensor],
        reduce: Callable[[torch.Tensor], torch.Tensor],
        out: torch.Tensor | None = None,
    ) -> None:
        self.size, self.tile = tuple(image_size), tuple(tile)
        self.weights = [w.float() for w in axis_weights]
        self.reduce, self.out = reduce, out
        self.lo = 0  # first row (axis 0) not yet written to the output
        self.band: torch.Tensor | None = None  # K × rows [lo, lo + tile_0) × S_1 × ...

    def add(self, y: torch.Tensor, start: Sequence[int]) -> None:
        """Add one weighted window prediction ``y`` (``K×*tile``) placed at ``start``;
        windows must come in non-decreasing order of ``start[0]``."""
        if start[0] > self.lo:
            self._flush(min(start[0], self.size[0]))
        if self.band is None:
            self.band = torch.zeros((y.shape[0], self.tile[0], *self.size[1:]))
        dst, src = [], []
        for axis, (s, t, n) in enumerate(zip(start, self.tile, self.size, strict=True)):
            lo, hi = max(s, 0), min(s + t, n)
            base = self.lo if axis == 0 else 0
            dst.append(slice(lo - base, hi - base))
            src.append(slice(lo - s, hi - s))
        self.band[(slice(None), *dst)] += y[(slice(None), *src)]

    def finish(self) -> torch.Tensor:
        """Write the remaining rows; returns the reduced output (``(...)×*S``)."""
        self._flush(self.size[0])
        if self.out is None:
            raise ConfigError("BandAccumulator.finish: no window was added")
        return self.out

    def _flush(self, upto: int) -> None:
        """Divide rows [lo, upto) by their weights, reduce, write; slide the band."""
        rows = upto - self.lo
        if rows <= 0 or self.band is None:
            self.lo = max(self.lo, upto)
            return
        dims = len(self.size)
        block = self.band[:, :rows].clone()
        for axis, w in enumerate(self.weights):
            w = w[self.lo : upto] if axis == 0 else w
            shape = [1] * (dims + 1)
            shape[axis + 1] = w.numel()
            block.div_(w.view(shape))
        dst = (slice(self.lo, upto), *(slice(None),) * (dims - 1))
        self.out = write_reduced(self.out, self.reduce, block, dst, self.size)
        keep = self.band.shape[1] - rows
        if keep > 0:
            self.band[:, :keep] = self.band[:, rows:].clone()
        self.band[:, max(keep, 0) :] = 0
        self.lo = upto
