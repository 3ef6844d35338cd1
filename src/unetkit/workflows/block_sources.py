"""Where block-wise predict reads pixels, and how it normalises them as a whole image.

* :func:`open_source` reads windows of an OME-Zarr image, of a TIFF through tifffile's Zarr
  store (its tiles/strips, never the whole file) or of a small image file, with the
  channels ``predict`` would pick and the pixel size the file states.
* :func:`normalization_stats` gives the per-channel statistics ``Normalize`` would take
  from the whole image (exactly, up to 2**24 pixels; above, float64 sums over blocks and a
  strided sample for percentiles), so blocks are normalised as the whole image would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetkit.data.io import load_image, to_float_image
from unetkit.data.tiff import PixelSize, tiff_pixel_size
from unetkit.data.transforms import DEFAULT_PERCENTILES
from unetkit.errors import ConfigError, DataError
from unetkit.formats import ome_zarr

__all__ = ["EXACT_STATS_PIXELS", "Source", "normalization_stats", "normalize", "open_source"]

EXACT_STATS_PIXELS = 2**24  # up to this many pixels the statistics come from the whole image
_SAMPLE_PIXELS = 2**22  # percentile sample size for larger images


# --- sources -----------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    """A readable image: ``window(ys, xs)`` gives ``Y×X×C`` pixels as stored,
    :meth:`pixels` the float ``C×Y×X`` the model sees (``channels`` picked, in order).
    ``pixel_size``: µm per pixel when the file states it in a length unit, else None."""

    path: str
    shape: tuple[int, int]
    scale: tuple[float, float]
    units: dict[str, str]
    read: Any
    translation: tuple[float, float] = (0.0, 0.0)
    channels: tuple[int, ...] | None = None
    pixel_size: PixelSize | None = None

    def window(self, ys: slice, xs: slice) -> np.ndarray:
        return self.read(ys, xs)

    def pixels(self, ys: slice, xs: slice) -> np.ndarray:
        """Float ``C×Y×X`` of a window, scaled by dtype, as ``predict`` reads a file."""
        return to_float_image(self.window(ys, xs), path=self.path, channels=self.channels)


def open_source(
    path: str | os.PathLike, level: int = 0, channels: Sequence[int] | None = None
) -> Source:
    """Open an image for block reads (cached: each worker opens a file once per version).

    Args:
        path: an OME-Zarr image group, a TIFF (read through tifffile's Zarr store, tile by
            tile) or another image file (read whole: it must be small).
        level: the OME-Zarr resolution level (0 = full resolution).
        channels: the channels :meth:`Source.pixels` keeps, in order (None: all).
    """
    p = Path(path)
    meta = p / "zarr.json" if (p / "zarr.json").is_file() else p
    stamp = meta.stat().st_mtime_ns if meta.exists() else 0
    picked = None if channels is None else tuple(int(c) for c in channels)
    return dataclasses.replace(_open_source(str(p), level, stamp), channels=picked)


@functools.lru_cache(maxsize=8)
def _open_source(path: str, level: int, stamp: int) -> Source:
    """:func:`open_source`, cached by ``stamp`` (the file's modification time)."""
    p = Path(path)
    if ome_zarr.is_zarr(p):
        img = ome_zarr.open_ngff(p)
        size = img.pixel_size_um(level)
        return Source(
            str(p),
            img.level_shape(level),
            img.scale(level),
            img.units(),
            functools.partial(img.window, level=level),
            img.translation(level),
            pixel_size=None if size is None else PixelSize(*size),
        )
    if level:
        raise ConfigError(f"{p}: --level {level} needs an OME-Zarr input with that level")
    if p.suffix.lower() in (".tif", ".tiff"):
        with _tiff_errors(p):
            return _tiff_source(p)
    loaded = load_image(p)  # small image files: read whole, as predict reads them
    arr = np.moveaxis(loaded.image, 0, -1)
    return Source(
        str(p),
        arr.shape[:2],
        (1.0, 1.0),
        {},
        lambda ys, xs: arr[ys, xs],
        pixel_size=loaded.pixel_size,
    )


@contextlib.contextmanager
def _tiff_errors(p: Path) -> Iterator[None]:
    """A bad TIFF (truncated, 0 bytes, a header claiming impossible sizes) as one DataError
    naming it: tifffile and zarr raise TiffFileError, ValueError, ... when opened or read."""
    try:
        yield
    except (DataError, ConfigError):
        raise
    except Exception as e:
        raise DataError(
            f"{p}: cannot read image ({type(e).__name__}: {e}); the file is truncated, "
            "corrupt or not a valid TIFF: re-export or remove it"
        ) from None


def _tiff_source(p: Path) -> Source:
    import tifffile
    import zarr

    with tifffile.TiffFile(p) as tif:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        pixel_size = tiff_pixel_size(tif, p)
    names = [a for a in axes if a not in "YXS"]
    if any(shape[axes.index(a)] != 1 for a in names if a != "C"):
        raise DataError(f"{p}: TIFF axes {axes} {shape}: block-wise predict reads 2D images")
    store = tifffile.imread(p, aszarr=True)
    arr = zarr.open_array(store, mode="r")
    channel = "C" if "C" in axes else ("S" if "S" in axes else None)

    def read(ys: slice, xs: slice) -> np.ndarray:
        index = tuple({"Y": ys, "X": xs}.get(a, slice(None) if a == channel else 0) for a in axes)
        kept = [a for a in axes if a in "YX" or a == channel]
        with _tiff_errors(p):
            pixels = np.asarray(arr[index])
        block = np.transpose(
            pixels,
            [kept.index(a) for a in "YX"] + ([kept.index(channel)] if channel else []),
        )
        return block if block.ndim == 3 else block[..., None]

    yx = (shape[axes.index("Y")], shape[axes.index("X")])
    return Source(str(p), yx, (1.0, 1.0), {}, read, pixel_size=pixel_size)


def _corners(shape: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Top-left corners of the windows of ``size``² covering an image, row by row."""
    return [(y, x) for y in range(0, shape[0], size) for x in range(0, shape[1], size)]


# --- normalisation -----------------------------------------------------------------------
def normalization_stats(
    source: Source,
    mode: str,
    block_size: int,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(centre, scale) per channel as ``data.transforms.Normalize(mode, percentiles=...)``
    computes them on the whole float image; None for ``mode="none"``."""
    if mode == "none":
        return None
    n_y, n_x = source.shape
    if n_y * n_x <= EXACT_STATS_PIXELS:
        image = source.pixels(slice(None), slice(None))
        flat = image.reshape(image.shape[0], -1)
        if mode == "zscore":
            return flat.mean(axis=1), flat.std(axis=1)
        low, high = np.percentile(flat, list(percentiles), axis=1)
        return low, high - low
    stride = max(1, math.ceil(math.sqrt(n_y * n_x / _SAMPLE_PIXELS)))
    total, squares, count, samples = 0.0, 0.0, 0, []
    for y0, x0 in _corners(source.shape, block_size):
        x = source.pixels(slice(y0, y0 + block_size), slice(x0, x0 + block_size))
        flat = x.reshape(x.shape[0], -1).astype(np.float64)
        total = total + flat.sum(1)
        squares = squares + (flat**2).sum(1)
        count += flat.shape[1]
        if mode != "zscore":  # a copy: a strided view would keep the whole block alive
            samples.append(x[:, (-y0) % stride :: stride, (-x0) % stride :: stride].copy())
    if mode == "zscore":
        mean = total / count
        return mean.astype(np.float32), np.sqrt(np.maximum(squares / count - mean**2, 0)).astype(
            np.float32
        )
    sample = np.concatenate([s.reshape(s.shape[0], -1) for s in samples], axis=1)
    low, high = np.percentile(sample, list(percentiles), axis=1)
    return low, high - low


def normalize(image: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """``Normalize``'s arithmetic with given statistics (same dtypes, same rounding)."""
    if stats is None:
        return image.astype(np.float32)
    centre, scale = stats
    shape = (-1,) + (1,) * (image.ndim - 1)
    scale = np.maximum(scale, 1e-6).reshape(shape)
    return ((image.astype(np.float32) - centre.reshape(shape)) / scale).astype(np.float32)
