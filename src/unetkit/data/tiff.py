"""Axis-aware TIFF reading: OME-TIFF, ImageJ hyperstacks and plain TIFF, with pixel sizes.

tifffile names the axes of each series (``TCZYX``, ``ZCYX``, ``YXS``, ``QYX`` ...). This
module turns them into the one layout the rest of unetkit reads, ``[Z|Q]YX[C]``: channels
(``C``, or colour samples ``S``) last, a single time point, a depth axis ``Z`` first when
there is one. ``Q`` is tifffile's name for planes whose meaning no metadata states (a plain
multi-page TIFF): they may be channels or slices, so the caller decides (see
:func:`unetkit.data.io.to_float_image`). The physical pixel size is read from the OME
``PhysicalSize*`` attributes, ImageJ's unit and spacing, or the TIFF resolution tags.

Big files are read through a memory map where tifffile can map them (uncompressed,
contiguous), so picking two channels of a 10 GB stack touches only those planes.
"""

from __future__ import annotations

import dataclasses
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from unetkit.errors import DataError

__all__ = ["PixelSize", "canonical_axes", "read_tiff", "tiff_pixel_size"]

log = logging.getLogger(__name__)

# Length units as OME and ImageJ spell them, in micrometres.
_UNIT_UM = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "\\u00b5m": 1.0,
    "μm": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
    "in": 25400.0,
    "inch": 25400.0,
}
# TIFF ResolutionUnit tag: 2 = inch, 3 = centimetre (1 = none: no physical size).
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 1e4}
_CHANNEL_AXES = "CS"
_PLANE_AXES = "ZQI"  # I: tifffile's generic image sequence; Q: unknown planes


@dataclasses.dataclass(frozen=True)
class PixelSize:
    """Physical size of one pixel in micrometres: ``y``, ``x`` and (volumes) ``z``."""

    y: float
    x: float
    z: float | None = None

    @property
    def area_um2(self) -> float:
        """Area of one pixel in µm²."""
        return self.y * self.x


def _unit_um(unit: str | None, path: Path) -> float | None:
    if unit is None:
        return 1.0  # OME's default unit is the micrometre
    key = unit.strip().lower()
    if key in ("pixel", "pixels", ""):
        return None
    scale = _UNIT_UM.get(key)
    if scale is None:
        log.warning("%s: unknown length unit %r; pixel size ignored", path, unit)
    return scale


def _ome_pixel_size(xml: str, path: Path) -> PixelSize | None:
    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels")), None)
    if pixels is None:
        return None
    sizes = {}
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        scale = _unit_um(pixels.get(f"PhysicalSize{axis}Unit"), path)
        sizes[axis] = None if value is None or scale is None else float(value) * scale
    if sizes["X"] is None:
        return None
    return PixelSize(y=sizes["Y"] or sizes["X"], x=sizes["X"], z=sizes["Z"])


def _resolution_size(page: tifffile.TiffPage, scale: float) -> tuple[float, float] | None:
    """(y, x) pixel size from the X/YResolution tags (pixels per unit), times ``scale``."""
    tags = page.tags
    if "XResolution" not in tags:
        return None
    xres, yres = tags["XResolution"].value, tags.get("YResolution", tags["XResolution"]).value
    px_x, px_y = xres[0] / xres[1], yres[0] / yres[1]
    if px_x <= 0 or px_y <= 0:
        return None
    return scale / px_y, scale / px_x


def tiff_pixel_size(tif: tifffile.TiffFile, path: Path) -> PixelSize | None:
    """The physical pixel size an open TIFF states, or None (see the module docstring)."""
    if tif.is_ome and tif.ome_metadata:
        found = _ome_pixel_size(tif.ome_metadata, path)
        if found is not None:
            return found
    page = tif.pages.first
    if tif.is_imagej:
        meta = tif.imagej_metadata or {}
        scale = _unit_um(meta.get("unit", "pixel"), path)
        size = None if scale is None else _resolution_size(page, scale)
        if size is None:
            return None
        spacing = meta.get("spacing")
        return PixelSize(*size, z=None if spacing is None else float(spacing) * scale)
    unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    scale = _RESOLUTION_UNIT_UM.get(unit)
    size = None if scale is None else _resolution_size(page, scale)
    return None if size is None else PixelSize(*size)


def canonical_axes(
    array: np.ndarray, axes: str, path: Path, *, kind: str = "TIFF"
) -> tuple[np.ndarray, str]:
    """Reorder ``array`` (tifffile axes ``axes``) to ``[Z|Q]YX[C]``; return it and its axes.

    Singleton axes are dropped; more than one time point, two channel axes or two plane
    axes are refused with a message naming the file and its axes. ``kind`` names the file
    type in those messages (the vendor readers reuse this with bioio's ``TCZYX[S]`` axes).
    """
    keep = [i for i, a in enumerate(axes) if array.shape[i] > 1 or a in "YX"]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: {kind} series has axes {axes!r}; expected Y and X axes")
    if "T" in axes:
        raise DataError(
            f"{path}: {kind} holds a time series of {array.shape[axes.index('T')]} frames "
            f"(axes {axes}); unetkit reads one time point: save the frames as separate files"
        )
    channels = [a for a in axes if a in _CHANNEL_AXES]
    planes = [a for a in axes if a in _PLANE_AXES]
    other = [a for a in axes if a not in _CHANNEL_AXES + _PLANE_AXES + "YX"]
    if len(channels) > 1 or len(planes) > 1 or other:
        raise DataError(
            f"{path}: {kind} axes {axes} (shape {array.shape}) cannot be read as [Z]YX[C]: "
            "save one image or volume per file with at most one channel axis"
        )
    order = planes + ["Y", "X"] + channels
    array = np.moveaxis(array, [axes.index(a) for a in order], range(len(order)))
    out = "".join(order).replace("S", "C").replace("I", "Q")
    return array, out


def _alpha_sample(tif: tifffile.TiffFile, axes: str) -> bool:
    """True when the last colour sample of an RGB page is alpha (ExtraSamples 1 or 2)."""
    page = tif.pages.first
    extra = getattr(page, "extrasamples", ())
    return (
        "S" in axes
        and page.photometric == tifffile.PHOTOMETRIC.RGB
        and any(int(e) in (1, 2) for e in extra)
    )


def _series_array(tif: tifffile.TiffFile, path: Path) -> tuple[np.ndarray, str]:
    series = tif.series
    # Pages written one by one form one series each: stack them if they are alike.
    if len(series) > 1 and len({(s.shape, s.dtype) for s in series}) == 1:
        return np.stack([s.asarray() for s in series]), "Q" + series[0].axes
    first = series[0]
    if len(series) > 1:  # e.g. multi-position OME-TIFF, or a thumbnail beside the image
        log.warning(
            "%s: holds %d image series of different shapes; reading the first %s",
            path,
            len(series),
            first.shape,
        )
    if first.dataoffset is not None:  # uncompressed and contiguous: map, don't read
        try:
            return tifffile.memmap(path, series=0, mode="r"), first.axes
        except (ValueError, OSError):
            pass
    return first.asarray(), first.axes


def read_tiff(path: Path) -> tuple[np.ndarray, str, PixelSize | None]:
    """Read the first series of a TIFF file as ``[Z|Q]YX[C]`` (see :func:`canonical_axes`).

    Returns:
        (array, axes, pixel size or None). Alpha samples of RGBA pages are dropped.

    Example:
        >>> arr, axes, px = read_tiff(Path("hyperstack.tif"))   # doctest: +SKIP
        >>> axes, px.x                                           # doctest: +SKIP
        ('YXC', 0.325)
    """
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise DataError(f"{path}: TIFF file holds no image series")
        array, axes = _series_array(tif, path)
        pixel_size = tiff_pixel_size(tif, path)
        alpha = _alpha_sample(tif, axes)
        if array.size == 0:
            raise DataError(f"{path}: TIFF file holds no pixels (shape {array.shape})")
        array, axes = canonical_axes(array, axes, path)
        if alpha and axes.endswith("C") and array.shape[-1] in (2, 4):
            array = array[..., :-1]
    return array, axes, pixel_size
