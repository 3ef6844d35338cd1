"""Elastic deformation as in the U-Net paper.

Ronneberger et al. (2015), section 3.1: "random displacement vectors on a coarse 3 by 3 grid
... sampled from a Gaussian distribution with 10 pixels standard deviation. Per-pixel
displacements are then computed using bicubic interpolation." The same displacement field
warps the image, the labels (nearest neighbour, so no new label values appear) and the weight
map, which keeps them aligned.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unetkit.errors import ConfigError

__all__ = ["displacement_field", "elastic_deform", "resample", "warp"]


@functools.lru_cache(maxsize=64)
def _spline_basis(n: int, grid: int) -> np.ndarray:
    """n×grid matrix B with B @ v = the cubic-spline interpolant of v at n pixels.

    Control point j sits at pixel j·(n−1)/(grid−1), so the corners of the grid are the
    corners of the image. Spline interpolation is linear in the values, so evaluating it on
    the unit vectors gives the matrix; the displacement field is then a few small matrix
    products instead of a full-resolution ``map_coordinates`` call.
    """
    positions = np.linspace(0.0, grid - 1.0, n)
    basis = np.stack(
        [
            ndimage.map_coordinates(unit, positions[None], order=3, mode="mirror")
            for unit in np.eye(grid)
        ],
        axis=1,
    )
    basis.flags.writeable = False  # cached and shared
    return basis


def displacement_field(
    shape: Sequence[int], *, rng: np.random.Generator, grid: int = 3, sigma: float = 10.0
) -> np.ndarray:
    """A smooth random displacement field (in pixels) over an image of ``shape``.

    Args:
        shape: spatial shape, (H, W) or (D, H, W).
        rng: random generator; the field is a function of its state only.
        grid: control points per axis (paper: 3).
        sigma: standard deviation of the control-point displacements in pixels (paper: 10).

    Returns:
        float64 array (len(shape), *shape); component i displaces along axis i. At the
        control points it equals the sampled Gaussian vectors; between them it is their
        bicubic (order-3 spline) interpolation.

    Example:
        >>> displacement_field((64, 48), rng=np.random.default_rng(0)).shape
        (2, 64, 48)
    """
    shape = tuple(int(s) for s in shape)
    if grid < 2:
        raise ConfigError(f"elastic grid={grid}: need at least 2 control points per axis")
    if sigma < 0:
        raise ConfigError(f"elastic sigma={sigma}: must be ≥ 0 (pixels)")
    dims = len(shape)
    field = rng.normal(0.0, sigma, size=(dims,) + (grid,) * dims)
    # Separable: interpolate along one axis at a time (grid → n points) with its basis matrix.
    for axis, n in enumerate(shape, start=1):
        field = np.moveaxis(
            np.tensordot(field, _spline_basis(n, grid), axes=([axis], [1])), -1, axis
        )
    return field


def warp(array: np.ndarray, field: np.ndarray, *, order: int, mode: str = "reflect") -> np.ndarray:
    """Warp ``array`` by ``field``: out[x] = array[x + field[:, x]].

    Args:
        array: (..., *spatial); leading axes (channels) are warped alike.
        field: (dims, *spatial) displacements in pixels.
        order: spline order: 0 (nearest, for labels), 1 or 3.
        mode: how samples beyond the edge are filled ("reflect" mirrors the image).

    Returns:
        an array of the same shape and dtype.
    """
    dims = field.shape[0]
    spatial = field.shape[1:]
    if array.shape[-dims:] != spatial:
        raise ConfigError(
            f"elastic: array of shape {array.shape} does not match field shape {spatial}"
        )
    coords = np.indices(spatial, dtype=np.float64) + field
    lead = array.shape[:-dims]
    flat = array.reshape((-1,) + spatial)
    out = np.empty_like(flat)
    integer = not np.issubdtype(array.dtype, np.floating)
    for i, channel in enumerate(flat):
        # Labels keep their dtype under nearest neighbour; anything interpolated is computed
        # in float64 (and rounded back for integer arrays) so splines do not truncate.
        if order == 0:
            source = channel.view(np.uint8) if channel.dtype == bool else channel
            out[i] = ndimage.map_coordinates(source, coords, order=0, mode=mode)
        else:
            warped = ndimage.map_coordinates(
                channel.astype(np.float64), coords, order=order, mode=mode
            )
            out[i] = np.rint(warped) if integer else warped
    return out.reshape(lead + spatial)


def elastic_deform(
    arrays: Sequence[np.ndarray],
    *,
    rng: np.random.Generator,
    grid: int = 3,
    sigma: float = 10.0,
    orders: Sequence[int] | None = None,
    spatial_dims: int = 2,
) -> list[np.ndarray]:
    """Deform several aligned arrays with one random elastic displacement field.

    Args:
        arrays: arrays sharing their last ``spatial_dims`` axes, e.g. image C×H×W, mask H×W,
            weight map H×W.
        rng: random generator.
        grid: coarse control grid per axis (paper: 3).
        sigma: displacement standard deviation in pixels (paper: 10).
        orders: interpolation order per array; default 0 (nearest) for integer and bool
            arrays, 3 (cubic) for float arrays.
        spatial_dims: 2 or 3.

    Returns:
        the warped arrays, in order, each with its input shape and dtype.

    Example:
        >>> img, lab = np.random.rand(1, 32, 32), np.zeros((32, 32), np.int64)
        >>> out = elastic_deform([img, lab], rng=np.random.default_rng(0))
        >>> [a.shape for a in out]
        [(1, 32, 32), (32, 32)]
    """
    if not arrays:
        return []
    spatial = arrays[0].shape[-spatial_dims:]
    if orders is None:
        orders = [3 if np.issubdtype(a.dtype, np.floating) else 0 for a in arrays]
    if len(orders) != len(arrays):
        raise ConfigError(f"elastic: got {len(arrays)} arrays but {len(orders)} orders")
    field = displacement_field(spatial, rng=rng, grid=grid, sigma=sigma)
    return [warp(a, field, order=o) for a, o in zip(arrays, orders, strict=True)]


_SPLINE_MARGIN = 8  # context a cubic spline prefilter needs (its pole 0.268^8 < 3e-5)


def resample(array: np.ndarray, coords: np.ndarray, *, order: int) -> np.ndarray:
    """Sample ``array`` at ``coords`` (mirrored beyond its edges), reading only the window
    the coordinates touch.

    A spline of order > 1 is prefiltered over the whole input; cutting the touched window
    first keeps a 128² crop of a 4096² image as cheap as one of a 256² image. The window
    never extends past the image, so mirroring at its edges is mirroring at the image's.

    Args:
        array: (..., *spatial); leading axes (channels) are sampled alike.
        coords: (dims, *out_spatial) positions in ``array``'s spatial pixel coordinates.
        order: spline order: 0 (nearest, labels keep their values), 1 or 3.

    Returns:
        (..., *out_spatial) array of ``array``'s dtype (integers rounded after
        interpolation).

    Example:
        >>> a = np.arange(16.0).reshape(4, 4)
        >>> resample(a, np.indices((2, 2)) + 1.0, order=1).tolist()
        [[5.0, 6.0], [9.0, 10.0]]
    """
    dims = coords.shape[0]
    spatial = array.shape[-dims:]
    lows, highs, shifted = [], [], []
    for axis, n in enumerate(spatial):
        c = coords[axis]
        low = max(0, int(np.floor(c.min())) - _SPLINE_MARGIN)
        high = min(n, int(np.ceil(c.max())) + _SPLINE_MARGIN + 1)
        if low >= high:  # every point beyond this edge: mirroring needs the whole axis
            low, high = 0, n
        lows.append(low)
        highs.append(high)
        shifted.append(c - low)
    window = array[(Ellipsis, *(slice(lo, hi) for lo, hi in zip(lows, highs, strict=True)))]
    local = np.stack(shifted)
    lead = array.shape[:-dims]
    flat = window.reshape((-1, *window.shape[-dims:]))
    out = np.empty((flat.shape[0], *coords.shape[1:]), array.dtype)
    integer = not np.issubdtype(array.dtype, np.floating)
    for i, channel in enumerate(flat):
        if order == 0:
            source = channel.view(np.uint8) if channel.dtype == bool else channel
            out[i] = ndimage.map_coordinates(source, local, order=0, mode="mirror")
        else:
            values = ndimage.map_coordinates(
                channel.astype(np.float64), local, order=order, mode="mirror"
            )
            out[i] = np.rint(values) if integer else values
    return out.reshape(lead + coords.shape[1:])
