"""Vendor microscopy files (Zeiss CZI, Nikon ND2, Leica LIF) read through bioio's plugins.

bioio (with ``bioio-czi``, ``bioio-nd2``, ``bioio-lif``) is the optional ``formats`` extra:
``pip install 'unetkit[formats]'``. Each file is read as bioio's 5-D ``TCZYX`` (plus ``S``
for RGB cameras) and turned into the layout the TIFF reader gives, ``[Z]YX[C]``, by the same
:func:`unetkit.data.tiff.canonical_axes`: singleton axes dropped, channels last, a single
time point. The physical pixel size is bioio's ``physical_pixel_sizes`` (µm). A file with
several scenes (multi-position acquisitions, LIF projects) is read at its first scene, with
a warning naming how many there are, unless ``scene`` picks another.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np

from unetkit.data.tiff import PixelSize, canonical_axes
from unetkit.errors import DataError

__all__ = ["INSTALL_HINT", "VENDOR_EXTENSIONS", "read_vendor", "vendor_pixel_size"]

log = logging.getLogger(__name__)

# Suffix -> (bioio plugin module, its PyPI name, the vendor's name for the format).
_PLUGINS = {
    ".czi": ("bioio_czi", "bioio-czi", "Zeiss CZI"),
    ".nd2": ("bioio_nd2", "bioio-nd2", "Nikon ND2"),
    ".lif": ("bioio_lif", "bioio-lif", "Leica LIF"),
}
VENDOR_EXTENSIONS = tuple(_PLUGINS)
INSTALL_HINT = "pip install 'unetkit[formats]'"


def _open(path: Path, scene: int | None):
    """A bioio reader of ``path`` set to ``scene`` (default the first, warning if several)."""
    module, package, kind = _PLUGINS[path.suffix.lower()]
    try:
        # why: optional dependency (the formats extra); unetkit works without it
        plugin = importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"{path}: reading {kind} files needs bioio and {package}: {INSTALL_HINT}"
        ) from None
    try:
        # The plugin's own Reader (bioio's BioImage API) rather than BioImage itself, which
        # logs every failed reader attempt and wraps the plugin's reason in its own message.
        image = plugin.Reader(path)
        scenes = image.scenes
    except Exception as e:  # plugins raise their own errors on a broken file; never a traceback
        raise DataError(
            f"{path}: cannot read {kind} file ({type(e).__name__}: {_first_line(e)}); the file "
            "is truncated, corrupt or not a valid file of this type: re-export or remove it"
        ) from None
    if scene is None:
        scene = 0
        if len(scenes) > 1:
            log.warning(
                "%s: holds %d scenes; reading the first (%s); pick another with scene=N",
                path,
                len(scenes),
                scenes[0],
            )
    if not 0 <= scene < len(scenes):
        raise DataError(
            f"{path}: scene {scene} does not exist; the file holds {len(scenes)} scene(s), "
            f"numbered 0..{len(scenes) - 1}"
        )
    image.set_scene(scene)
    return image


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else "no message"


def _pixel_size(image) -> PixelSize | None:
    """bioio's physical pixel size (µm) as a PixelSize; 0 or None means 'not stated'."""
    sizes = image.physical_pixel_sizes
    if sizes is None:
        return None

    def stated(value: float | None) -> float | None:
        return float(value) if value is not None and float(value) > 0 else None

    x, y, z = stated(sizes.X), stated(sizes.Y), stated(sizes.Z)
    if x is None:
        return None
    depth = dict(zip(image.dims.order, image.dims.shape, strict=True)).get("Z", 1)
    return PixelSize(y=y or x, x=x, z=z if depth > 1 else None)


def read_vendor(
    path: Path, *, scene: int | None = None
) -> tuple[np.ndarray, str, PixelSize | None]:
    """Read one scene of a CZI/ND2/LIF file as ``[Z]YX[C]`` with its pixel size.

    Args:
        path: an existing ``.czi``, ``.nd2`` or ``.lif`` file.
        scene: the scene to read (numbered from 0); None reads the first and warns when
            the file holds more.

    Returns:
        (array in the file's dtype, axes such as ``"YXC"`` or ``"ZYXC"``, pixel size or None).

    Raises:
        DataError: the formats extra is missing (naming the pip command), the file is
            corrupt, or it holds a time series (T > 1); always one line naming the file.

    Example:
        >>> arr, axes, px = read_vendor(Path("cells.czi"))   # doctest: +SKIP
        >>> axes, px.x                                       # doctest: +SKIP
        ('YXC', 0.325)
    """
    path = Path(path)
    image = _open(path, scene)
    kind = _PLUGINS[path.suffix.lower()][2]
    try:
        # "TCZYX", or "TCZYXS" for RGB cameras; a plugin may leave out axes the file lacks
        order = image.dims.order
        frames = dict(zip(order, image.dims.shape, strict=True)).get("T", 1)
        if frames > 1:
            raise DataError(
                f"{path}: {kind} scene holds a time series of {frames} frames (axes {order}); "
                "unetkit reads one time point: export the frames as separate files"
            )
        array = np.asarray(image.get_image_data(order))
        pixel_size = _pixel_size(image)
    except DataError:
        raise
    except Exception as e:  # a header that opens but pixel data that does not decode
        raise DataError(
            f"{path}: cannot read the pixels of this {kind} file ({type(e).__name__}: "
            f"{_first_line(e)}); the file is truncated or corrupt: re-export or remove it"
        ) from None
    if array.size == 0:
        raise DataError(f"{path}: {kind} file holds no pixels (shape {array.shape})")
    if path.suffix.lower() == ".czi" and order.endswith("S") and array.shape[-1] in (3, 4):
        # CZI stores colour as B, G, R(, A) (Bgr24/Bgr48/Bgra32) and bioio-czi hands the
        # samples on in that order; PNG/TIFF colour is R, G, B, so reorder (alpha dropped)
        array = array[..., [2, 1, 0]]
    array, axes = canonical_axes(array, order, path, kind=kind)
    return array, axes, pixel_size


def vendor_pixel_size(path: Path, *, scene: int | None = None) -> PixelSize | None:
    """The physical pixel size (µm) a CZI/ND2/LIF file states for ``scene``, or None."""
    path = Path(path)
    image = _open(path, scene)
    try:
        return _pixel_size(image)
    except Exception as e:  # metadata that does not parse: same one-line refusal as pixels
        raise DataError(
            f"{path}: cannot read the metadata of this file ({type(e).__name__}: "
            f"{_first_line(e)}); the file is truncated or corrupt: re-export or remove it"
        ) from None
