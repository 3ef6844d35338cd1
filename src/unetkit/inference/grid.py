"""Where tiles go and how they are weighted: the tile grid, tile extraction with mirror
padding, and the blending weights (used by ``inference.tiling``'s engines and the block-wise
engine of ``workflows.blocks``).

* ``TileGrid``: tile starts per axis (a Cartesian grid), sliding (overlapping windows) or
  stepped (overlap-tile), and which part of each tile is written.
* ``mirror_index`` / ``extract_tile``: a tile of an image, mirrored (the paper's choice),
  replicated or zero-padded where it leaves the image, without a padded copy.
* ``gaussian_profile`` / ``importance_map``: nnU-Net's Gaussian weighting (Isensee et al.
  2021), separable per axis.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence

import torch

from unetkit.config import check_choice
from unetkit.errors import ConfigError

PAD_MODES = ("reflect", "replicate", "constant")
BLEND_MODES = ("gaussian", "constant")
_WEIGHT_FLOOR = 1e-6  # per-axis floor of the Gaussian: border pixels keep a usable weight


# --- tile planning -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Tile positions covering an image: per axis, the tile starts (a Cartesian grid).

    A start may be negative and a tile may run past the end (its input is padded); each
    tile writes the part ``[start, start + keep)`` of its prediction that lies in the image.

    Example:
        >>> g = TileGrid.sliding((100, 60), (64, 64), overlap=0.5)
        >>> g.starts, len(g)
        (((0, 18, 36), (-2,)), 3)
    """

    image_size: tuple[int, ...]
    tile: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]
    keep: tuple[int, ...]

    @classmethod
    def sliding(
        cls, image_size: Sequence[int], tile: Sequence[int], overlap: float = 0.25
    ) -> TileGrid:
        """Evenly spaced windows overlapping by at least ``overlap`` (a fraction of the
        tile), first at 0, last snapped to the end; a short axis gets one centred tile."""
        if not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap={overlap} must be in [0, 1), e.g. 0.25 or 0.5")
        starts = []
        for n, t in zip(image_size, tile, strict=True):
            if n <= t:
                starts.append((-((t - n) // 2),))
                continue
            target = max(1.0, t * (1.0 - overlap))
            count = math.ceil((n - t) / target) + 1
            step = (n - t) / (count - 1)
            starts.append(tuple(int(round(i * step)) for i in range(count)))
        return cls(tuple(image_size), tuple(tile), tuple(starts), tuple(tile))

    @classmethod
    def stepped(
        cls, image_size: Sequence[int], tile: Sequence[int], step: Sequence[int]
    ) -> TileGrid:
        """Tiles at 0, step, 2·step, ... each keeping ``step <= tile`` pixels (no output
        overlap); the last one runs past the end of the image."""
        starts = []
        for n, t, s in zip(image_size, tile, step, strict=True):
            if not 0 < s <= t:
                raise ConfigError(f"step {s} must be in [1, tile={t}]")
            starts.append(tuple(range(0, n, s)))
        return cls(tuple(image_size), tuple(tile), tuple(starts), tuple(step))

    def __len__(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(itertools.product(*self.starts))

    def regions(self, start: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(output slices, tile slices) of the part of a tile at ``start`` that is written."""
        out, tile = [], []
        for s, k, n in zip(start, self.keep, self.image_size, strict=True):
            lo, hi = max(s, 0), min(s + k, n)
            out.append(slice(lo, hi))
            tile.append(slice(lo - s, hi - s))
        return tuple(out), tuple(tile)

    def axis_weights(self, axis: int, profile: torch.Tensor) -> torch.Tensor:
        """Sum over this axis' tiles of a 1D weight ``profile`` (length tile), per pixel."""
        n, k = self.image_size[axis], self.keep[axis]
        total = torch.zeros(n, dtype=torch.float64)
        for s in self.starts[axis]:
            lo, hi = max(s, 0), min(s + k, n)
            total[lo:hi] += profile[lo - s : hi - s]
        return total


# --- tile extraction with mirror padding -------------------------------------------------
def mirror_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices onto ``[0, n)`` by mirroring at the edges without repeating the edge pixel.

    Repeats for any distance (``-1 -> 1``, ``n -> n-2``), like ``numpy.pad(mode="reflect")``,
    so context wider than the image is still defined (the paper's mirror extrapolation).
    """
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    r = index.remainder(period)
    return torch.where(r < n, r, period - r)


def extract_tile(
    image: torch.Tensor, start: Sequence[int], size: Sequence[int], pad_mode: str = "reflect"
) -> torch.Tensor:
    """The window ``[start, start + size)`` (``C×*size``) of a ``C×*S`` image, padded where
    it leaves the image: reflect (mirror, the paper's choice) | replicate | constant (zeros).
    A view of ``image`` when the window lies inside it."""
    x = image
    outside = []
    for axis, (s, t, n) in enumerate(zip(start, size, image.shape[1:], strict=True)):
        if s >= 0 and s + t <= n:
            x = x.narrow(axis + 1, s, t)  # cheap view first, so gathers touch less data
        else:
            outside.append((axis, s, t, n))
    for axis, s, t, n in outside:
        index = torch.arange(s, s + t, device=x.device)
        if pad_mode == "reflect":
            x = x.index_select(axis + 1, mirror_index(index, n))
        else:
            x = x.index_select(axis + 1, index.clamp(0, n - 1))
            if pad_mode == "constant":
                where = [slice(None)] * x.dim()
                where[axis + 1] = (index < 0) | (index >= n)
                x[tuple(where)] = 0
    return x


# --- blending ----------------------------------------------------------------------------
def gaussian_profile(length: int, sigma_scale: float = 0.125) -> torch.Tensor:
    """1D Gaussian over ``length`` pixels, sigma = ``sigma_scale * length``, peak 1, float64.

    Symmetric by construction and floored at a small positive value so that a border pixel
    covered by only one tile still gets a weight (the nnU-Net rule, Isensee et al. 2021).
    """
    if not sigma_scale > 0:
        raise ConfigError(f"sigma_scale={sigma_scale} must be > 0 (nnU-Net uses 0.125)")
    sigma = max(sigma_scale * length, 1e-3)
    x = torch.arange(length, dtype=torch.float64) - (length - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.max()).clamp_min(_WEIGHT_FLOOR)


def importance_map(
    tile: Sequence[int], blend: str = "gaussian", sigma_scale: float = 0.125
) -> torch.Tensor:
    """Per-pixel weight of a tile's prediction (``*tile``, float32): outer product of 1D
    Gaussians (``blend="gaussian"``) or ones (``"constant"``)."""
    w = torch.ones((), dtype=torch.float64)
    for p in axis_profiles(tile, blend, sigma_scale):
        w = w.unsqueeze(-1) * p
    return w.float()


def axis_profiles(tile: Sequence[int], blend: str, sigma_scale: float) -> list[torch.Tensor]:
    """The per-axis 1D weight profiles of a tile (their outer product is its weight)."""
    check_choice("blend", blend, BLEND_MODES)
    if blend == "constant":
        return [torch.ones(t, dtype=torch.float64) for t in tile]
    return [gaussian_profile(t, sigma_scale) for t in tile]
