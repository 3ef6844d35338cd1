"""Blocks of a huge image and the model's prediction of one block, bit for bit as a whole.

Pixels come from :mod:`.block_sources` (windows of OME-Zarr, TIFF or image files,
normalised with the whole image's statistics).

* :func:`block_grid` cuts an image into blocks; :func:`face_strips` keeps what a
  block's neighbour labelled too, for stitching.
* :func:`tile_plan` + :func:`region_probabilities`: the tile grid the single-process
  engine (``inference.tiling.predict_tiled``) lays over the *whole* image, evaluated only
  for the tiles that touch a region, blended in the same order with the same weights —
  so each block's probabilities equal the same pixels of the whole-image prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from unetkit import runtime
from unetkit.errors import ConfigError, DataError
from unetkit.inference import grid as tile_grid
from unetkit.inference import tiling
from unetkit.workflows.block_sources import Source, normalize
from unetkit.workflows.segment import InferenceOptions


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """How an image is cut: ``block_size``² pixels per task (also the output chunk),
    ``label_halo`` extra pixels per side for the watershed of boundary targets (objects
    up to about that size never split), ``level`` the OME-Zarr resolution level read."""

    block_size: int = 1024
    label_halo: int = 32
    level: int = 0


@dataclasses.dataclass(frozen=True)
class Block:
    """Rows ``[y0, y1)`` and columns ``[x0, x1)`` of an image; ``row``, ``col`` its index."""

    y0: int
    y1: int
    x0: int
    x1: int
    row: int = 0
    col: int = 0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def grown(self, halo: int, shape: Sequence[int]) -> Block:
        """This block plus ``halo`` pixels per side, clipped to the image."""
        return Block(
            max(self.y0 - halo, 0),
            min(self.y1 + halo, shape[0]),
            max(self.x0 - halo, 0),
            min(self.x1 + halo, shape[1]),
            self.row,
            self.col,
        )

    def within(self, outer: Block) -> tuple[slice, slice]:
        """This block's pixels as slices of ``outer``'s array."""
        return (
            slice(self.y0 - outer.y0, self.y1 - outer.y0),
            slice(self.x0 - outer.x0, self.x1 - outer.x0),
        )


def block_grid(shape: Sequence[int], size: int) -> list[Block]:
    """Blocks of ``size``² covering an image row by row (the last ones may be smaller)."""
    n_y, n_x = shape
    return [
        Block(y, min(y + size, n_y), x, min(x + size, n_x), r, c)
        for r, y in enumerate(range(0, n_y, size))
        for c, x in enumerate(range(0, n_x, size))
    ]


def face_strips(
    labels: np.ndarray, region: Block, block: Block, halo: int, shape: Sequence[int]
) -> dict[str, np.ndarray]:
    """``labels`` (of ``region``) in the strips ``halo`` pixels either side of each face of
    ``block`` (top, bottom, left, right), the block's width long: what its neighbour
    labelled too, for overlap matching."""
    out = {}
    for side, axis, face in (
        ("top", 0, block.y0),
        ("bottom", 0, block.y1),
        ("left", 1, block.x0),
        ("right", 1, block.x1),
    ):
        lo, hi = max(face - halo, 0), min(face + halo, shape[axis])
        if axis == 0:
            strip = Block(lo, hi, block.x0, block.x1)
        else:
            strip = Block(block.y0, block.y1, lo, hi)
        out[f"strip_{side}"] = labels[strip.within(region)]
    return out


# --- the tile grid of the whole image, evaluated over one region -------------------------
@dataclasses.dataclass(frozen=True)
class TilePlan:
    """The single-process engine's grid over the whole image: ``window`` = (offset, size)
    of each input tile relative to its output start; ``weight`` the Gaussian importance
    map (sliding window) or None (overlap-tile: each pixel written by one tile)."""

    grid: tile_grid.TileGrid
    window: tuple[tuple[int, ...], tuple[int, ...]]
    weight: torch.Tensor | None
    profiles: tuple[torch.Tensor, ...]

    @property
    def halo(self) -> int:
        """How far a tile that touches a block can reach beyond it (pixels)."""
        return max(self.window[1])


def default_tile_edge(block_size: int | None = None) -> int:
    """The tile edge block-wise predict uses when none is given: the engine's default for
    large images (512), but at most a quarter of the block edge (256 for 1024² blocks).

    The tiles that straddle a block's border are evaluated by both blocks (the price of
    blocks equal to the whole image); with tiles a quarter of the block edge that is about
    1.4× the whole image's tile work instead of 2× (16384², 1024² blocks)."""
    edge = round(tiling.DEFAULT_TILE_VOXELS**0.5) // 16 * 16
    if block_size is not None:
        edge = min(edge, max(64, block_size // 4 // 16 * 16))
    return edge


def tile_plan(
    model: torch.nn.Module,
    shape: tuple[int, int],
    options: InferenceOptions,
    block_size: int | None = None,
) -> TilePlan:
    """What ``predict_tiled(model, image, options.tiles)`` does for an image of ``shape``
    (a huge image never runs whole: ``tile=None`` means :func:`default_tile_edge` for
    blocks of ``block_size``, or the engine's default tile for large images for
    valid-padding models, whose tiles do not overlap)."""
    valid = bool(getattr(model, "is_valid_padding", False))
    tile = options.tiles.tile
    if tile is None:
        edge = default_tile_edge(None if valid else block_size)
        margin = model.margin()[0] if valid else 0
        tile = tuple(min(max(edge - 2 * margin, 16), n) for n in shape)
    tile = (int(tile),) * 2 if isinstance(tile, int | np.integer) else tuple(map(int, tile))
    if len(tile) != 2 or min(tile) < 1:
        raise ConfigError(f"tile={options.tiles.tile!r}: expected a positive int or two of them")
    if not valid:
        grid = tile_grid.TileGrid.sliding(shape, tile, options.tiles.overlap)
        profiles = tuple(tile_grid.gaussian_profile(t) for t in tile)
        return TilePlan(grid, ((0, 0), tile), tile_grid.importance_map(tile), profiles)
    period = tiling._shift_period(model, 2)  # the spacing of its valid input sizes
    want = [max(min(t, n), p) for t, n, p in zip(tile, shape, period, strict=True)]
    tile_in = model.input_size_for(want)
    tile_o = model.output_size_for(tile_in)
    before = tuple((i - o) // 2 for i, o in zip(tile_in, tile_o, strict=True))
    step = [o // p * p for o, p in zip(tile_o, period, strict=True)]
    grid = tile_grid.TileGrid.stepped(shape, tile_o, step)
    return TilePlan(grid, (before, tuple(tile_in)), None, ())


def _touching(plan: TilePlan, region: Block) -> list[tuple[int, tuple[int, int]]]:
    """(global index, start) of the grid's tiles whose written part meets the region."""
    grid, per_axis = plan.grid, []
    for axis, (lo, hi) in enumerate(((region.y0, region.y1), (region.x0, region.x1))):
        keep = grid.keep[axis]
        per_axis.append(
            [(i, s) for i, s in enumerate(grid.starts[axis]) if s < hi and s + keep > lo]
        )
    n_x = len(grid.starts[1])
    return [(iy * n_x + ix, (sy, sx)) for iy, sy in per_axis[0] for ix, sx in per_axis[1]]


def _batches(
    tiles: list[tuple[int, tuple[int, int]]], total: int, batch_size: int
) -> list[tuple[list[tuple[int, tuple[int, int]]], bool]]:
    """Tiles in global order, cut into forward passes: (tiles, run alone).

    oneDNN takes another convolution kernel for a batch of one, whose rounding differs
    (~1e-5) from batches of two or more (which agree with each other): a tile runs alone
    exactly when the whole-image engine ran it alone (a last batch of one), else in a batch
    of at least two (a lone leftover is run next to a copy of itself)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")

    def alone(g: int) -> bool:
        return min(batch_size, total - g // batch_size * batch_size) == 1

    out: list[tuple[list[tuple[int, tuple[int, int]]], bool]] = []
    shared = [t for t in tiles if not alone(t[0])]
    for i in range(0, len(shared), batch_size):
        out.append((shared[i : i + batch_size], False))
    out += [([t], True) for t in tiles if alone(t[0])]
    return out


def region_probabilities(
    model: torch.nn.Module,
    source: Source,
    plan: TilePlan,
    region: Block,
    options: InferenceOptions,
    stats: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """Class probabilities ``K×h×w`` of a region, equal to the same pixels of
    ``predict_tiled`` over the whole (normalised) image with the same tile options.

    Reads only the pixels the touching tiles need (mirrored at the image's edges, as
    ``tile_grid.extract_tile`` does), normalises them with the whole image's ``stats``.
    """
    tiles = _touching(plan, region)
    size = plan.grid.image_size
    (offset, extent) = plan.window
    reads = [
        [
            tile_grid.mirror_index(
                torch.arange(s[a] - offset[a], s[a] - offset[a] + extent[a]), size[a]
            )
            for a in (0, 1)
        ]
        for _, s in tiles
    ]
    lo = [min(int(r[a].min()) for r in reads) for a in (0, 1)]
    hi = [max(int(r[a].max()) for r in reads) + 1 for a in (0, 1)]
    raw = source.pixels(slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    image = torch.from_numpy(normalize(raw, stats))
    here = region
    out: torch.Tensor | None = None
    position = {g: k for k, (g, _) in enumerate(tiles)}
    with runtime.prepared(model, options.precision) as runner:
        predict = tiling.tile_predictor(runner, "probabilities", options.tiles.tta, 2)
        for batch, alone in _batches(tiles, len(plan.grid), options.tiles.batch_size):
            x = torch.stack(
                [
                    image.index_select(1, reads[position[g]][0] - lo[0]).index_select(
                        2, reads[position[g]][1] - lo[1]
                    )
                    for g, _ in batch
                ]
            )
            if len(batch) == 1 and not alone:
                x = torch.cat([x, x])
            y = predict(x)[: len(batch)]
            if plan.weight is not None:
                y = y.mul_(plan.weight.to(y.device))
            y = y.cpu()
            if out is None:
                with torch.inference_mode(False):
                    out = torch.zeros((y.shape[1], here.y1 - here.y0, here.x1 - here.x0))
            for i, (_, s) in enumerate(batch):
                _write(out, y[i], plan, s, here)
    if out is None:  # cannot happen: every region is covered by the grid
        raise DataError(f"{source.path}: no tile covers block {region}")
    if plan.weight is not None:
        for axis, profile in enumerate(plan.profiles):
            lo_a, hi_a = (here.y0, here.y1) if axis == 0 else (here.x0, here.x1)
            w = plan.grid.axis_weights(axis, profile).float()[lo_a:hi_a]
            out.div_(w.view((1, -1, 1) if axis == 0 else (1, 1, -1)))
    return out.numpy()


def _write(
    out: torch.Tensor, y: torch.Tensor, plan: TilePlan, start: tuple[int, int], here: Block
) -> None:
    """Add (blend) or copy (overlap-tile) the part of a tile's prediction inside ``here``."""
    dst, src = plan.grid.regions(start)
    a, b = [], []
    for d, s, lo, hi in zip(dst, src, (here.y0, here.x0), (here.y1, here.x1), strict=True):
        lo_c, hi_c = max(d.start, lo), min(d.stop, hi)
        if lo_c >= hi_c:
            return
        a.append(slice(lo_c - lo, hi_c - lo))
        b.append(slice(s.start + lo_c - d.start, s.start + hi_c - d.start))
    target, part = out[(slice(None), *a)], y[(slice(None), *b)]
    target.add_(part) if plan.weight is not None else target.copy_(part)
