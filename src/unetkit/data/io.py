"""Image files: read/write PNG and TIFF, convert to float (masks: :mod:`unetkit.data.masks`).

TIFF files are read axis-aware (OME-TIFF, ImageJ hyperstacks: :mod:`unetkit.data.tiff`), with
any number of channels and their physical pixel size; :func:`load_image` returns both. Zeiss
CZI, Nikon ND2 and Leica LIF files are read the same way through bioio's plugins when the
``formats`` extra is installed (:mod:`unetkit.data.vendor`).

Every failure on a file raises :class:`~unetkit.errors.DataError` naming the file, what was
found and how to fix it, so a user with a folder of microscopy images learns which file is
broken rather than reading a traceback from Pillow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from unetkit._atomic import atomic_path
from unetkit.data.tiff import PixelSize, read_tiff
from unetkit.data.vendor import VENDOR_EXTENSIONS, read_vendor, vendor_pixel_size
from unetkit.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_CHANNELS",
    "LoadedImage",
    "list_images",
    "load_image",
    "parse_channels",
    "read_image",
    "read_pixel_size",
    "to_float_image",
    "write_image",
]

log = logging.getLogger(__name__)

# .czi/.nd2/.lif need the formats extra (bioio); without it they are refused with the pip line.
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", *VENDOR_EXTENSIONS)
# More channels than this in the last axis of an H×W×C array reads as a volume, not channels.
MAX_CHANNELS = 64
_TIFF = (".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow modes whose pixel values numpy reads as they are (plus the 16-bit "I;16*" modes).
_NUMERIC_MODES = ("P", "1", "L", "LA", "RGB", "RGBA", "I", "F")


def read_image(path: str | os.PathLike, *, palette_to_rgb: bool = False) -> np.ndarray:
    """Read a PNG/JPEG (Pillow), TIFF (tifffile) or CZI/ND2/LIF (bioio) file into numpy.

    Args:
        path: the file. TIFF files may hold several pages; they are returned as a volume.
        palette_to_rgb: palette ("P" mode) PNGs are returned as their palette indices, which
            is what label masks stored with a colour palette mean; set True for images.

    Returns:
        H×W (grey), H×W×C (colour or any number of channels, channels last) or D×H×W[×C]
        (multi-page TIFF, Z-stack), with the file's dtype kept (uint8, uint16, float32, ...).
        TIFF axes are read from the file (OME, ImageJ: see :mod:`unetkit.data.tiff`); alpha
        (PNG grey+alpha and RGBA, TIFF alpha samples) is dropped. 1-bit images become uint8
        0/255.

    Example:
        >>> img = read_image("images/cell_000.png")   # doctest: +SKIP
    """
    return _read_any(Path(path), palette_to_rgb=palette_to_rgb)[0]


@dataclasses.dataclass
class LoadedImage:
    """An image as :func:`load_image` returns it.

    image: float32 C×H×W (C×D×H×W for volumes), scaled by dtype as in training.
    pixel_size: the physical pixel size the file states (µm), or None.
    axes: the axes of the raw array before conversion, e.g. ``"YXC"``, ``"ZYXC"``.
    """

    image: np.ndarray
    pixel_size: PixelSize | None
    axes: str


def load_image(
    path: str | os.PathLike,
    *,
    spatial_dims: int = 2,
    channels: Sequence[int] | None = None,
    scene: int | None = None,
) -> LoadedImage:
    """Read an image file as float C×H×W (or C×D×H×W) with its pixel size: what predict
    and the folder data sets read.

    Args:
        path: PNG/JPEG/TIFF (OME-TIFF and ImageJ hyperstacks included), or CZI/ND2/LIF
            with the formats extra.
        spatial_dims: 2 for images, 3 for volumes (Z-stacks).
        channels: channel indices to keep, in this order (``--channels 1,0``); None keeps
            all. Planes of a multi-page TIFF without axis metadata are read as channels
            when ``channels`` is given for a 2-D model, else refused as ambiguous.
        scene: CZI/ND2/LIF only: the scene to read (from 0); None reads the first and
            warns when the file holds more.

    Example:
        >>> img = load_image("cells.ome.tif", channels=(1, 0))   # doctest: +SKIP
        >>> img.image.shape, img.pixel_size                      # doctest: +SKIP
        ((2, 512, 512), PixelSize(y=0.325, x=0.325, z=None))
    """
    path = Path(path)
    raw, axes, pixel_size = _read_any(path, palette_to_rgb=True, scene=scene)
    if axes.startswith("Q"):
        if spatial_dims == 3:
            axes = "Z" + axes[1:]
        elif channels is not None and not axes.endswith("C"):
            raw, axes = np.moveaxis(raw, 0, -1), axes[1:] + "C"
        else:
            raise DataError(
                f"{path}: TIFF holds {raw.shape[0]} planes of {raw.shape[1]}×{raw.shape[2]} "
                "without axis metadata (channels or a Z-stack?); pass --channels (e.g. "
                "0,1) to read them as channels, or save with axes (ImageJ hyperstack, OME)"
            )
    image = to_float_image(raw, path=path, spatial_dims=spatial_dims, channels=channels)
    return LoadedImage(image, pixel_size, axes)


def read_pixel_size(path: str | os.PathLike, *, scene: int | None = None) -> PixelSize | None:
    """The physical pixel size an image file states (OME, ImageJ, TIFF/PNG resolution,
    CZI/ND2/LIF metadata; ``scene`` as in :func:`load_image`)."""
    path = Path(path)
    if path.suffix.lower() in VENDOR_EXTENSIONS and path.is_file():
        return vendor_pixel_size(path, scene=scene)  # metadata only: no pixels decoded
    return _read_any(path, palette_to_rgb=False, scene=scene)[2]


def _read_any(
    path: Path, *, palette_to_rgb: bool, scene: int | None = None
) -> tuple[np.ndarray, str, PixelSize | None]:
    """(array, axes, pixel size) of an existing image file; every failure is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported image type {suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    if scene is not None and suffix not in VENDOR_EXTENSIONS:  # never ignore a flag silently
        raise DataError(f"{path}: --scene applies to CZI/ND2/LIF files only")
    try:
        if suffix in _TIFF:
            arr, axes, pixel_size = read_tiff(path)
        elif suffix in VENDOR_EXTENSIONS:
            arr, axes, pixel_size = read_vendor(path, scene=scene)
        else:
            arr, pixel_size = _read_pillow(path, palette_to_rgb)
            axes = "YXC"[: arr.ndim]
    except DataError:
        raise
    except Exception as e:  # Pillow/tifffile raise OSError, ValueError, struct.error, ...
        raise DataError(
            f"{path}: cannot read image ({type(e).__name__}: {e}); the file is truncated, "
            "corrupt or not a valid image: re-export or remove it"
        ) from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr, axes, pixel_size


def _read_pillow(path: Path, palette_to_rgb: bool) -> tuple[np.ndarray, PixelSize | None]:
    with Image.open(path) as img:
        img.load()  # decode now, so truncated data raises here and not later
        if path.suffix.lower() == ".png" and img.mode in ("RGB", "RGBA") and _png_is_16bit(path):
            log.warning("%s: 16-bit RGB PNG is read as 8-bit by Pillow; save as TIFF", path)
        if img.mode == "P" and palette_to_rgb:
            img = img.convert("RGB")
        elif img.mode not in _NUMERIC_MODES and not img.mode.startswith("I;16"):
            img = img.convert("RGB")  # CMYK, YCbCr, ...: convert to something with meaning
        dpi = img.info.get("dpi")
        arr = np.asarray(img)
    if img.mode in ("LA", "RGBA"):  # grey+alpha / RGBA: the alpha is not image content
        arr = arr[..., :-1] if img.mode == "RGBA" else arr[..., 0]
    pixel_size = None
    if dpi and float(dpi[0]) > 0 and float(dpi[1]) > 0:
        pixel_size = PixelSize(y=25400.0 / float(dpi[1]), x=25400.0 / float(dpi[0]))
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))
    return arr, pixel_size


def _png_is_16bit(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == _PNG_SIGNATURE and len(head) > 24 and head[24] == 16


def write_image(
    path: str | os.PathLike, array: np.ndarray, *, pixel_size: PixelSize | None = None
) -> Path:
    """Write ``array`` to ``path`` atomically; the suffix picks the format.

    PNG holds uint8 grey/RGB/RGBA and uint16 grey; TIFF holds any dtype and multi-page
    volumes (D×H×W); JPEG holds uint8 grey/RGB (lossy, so never use it for masks). bool
    arrays are written as uint8 0/255.

    Args:
        path: target file (``.png``, ``.tif``, ``.tiff``, ``.jpg``, ``.jpeg``).
        array: H×W, H×W×3/4 or (TIFF only) any shape.
        pixel_size: TIFF only: stored as the resolution tags (pixels per centimetre), so
            Fiji and :func:`load_image` read the physical size back.

    Returns:
        the path written.

    Example:
        >>> write_image("masks/cell_000.png", labels.astype(np.uint16))   # doctest: +SKIP
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    suffix = path.suffix.lower()
    if suffix in _TIFF:
        rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype in (np.uint8, np.uint16)
        options = {}
        if pixel_size is not None:  # pixels per centimetre (ResolutionUnit 3)
            options = {"resolution": (1e4 / pixel_size.x, 1e4 / pixel_size.y), "resolutionunit": 3}
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, arr, photometric="rgb" if rgb else "minisblack", **options)
        return path
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise DataError(
            f"{path}: cannot write images with suffix {suffix!r}; "
            "use .png (8/16-bit 2D) or .tif (anything)"
        )
    if suffix == ".png":
        rgb_ok = arr.ndim == 3 and arr.shape[-1] in (3, 4)
        ok = (arr.dtype == np.uint8 and (arr.ndim == 2 or rgb_ok)) or (
            arr.dtype == np.uint16 and arr.ndim == 2
        )
        fmt, options = "PNG", {}
    else:
        ok = arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3))
        fmt, options = "JPEG", {"quality": 95}
    if not ok:
        raise DataError(
            f"{path}: {fmt} cannot hold an array of shape {arr.shape} and dtype {arr.dtype} "
            "(PNG: uint8 grey/RGB/RGBA or uint16 grey; JPEG: uint8 grey/RGB); "
            "write it as .tif instead"
        )
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format=fmt, **options)
    return path


def list_images(
    folder: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Image files in ``folder`` (not recursive), sorted by name; hidden files are skipped.

    Args:
        folder: the folder to list.
        extensions: name endings matched case-insensitively; default .png .tif .tiff .jpg
            .jpeg (volumes: ``unetkit.data.volumes.VOLUME_EXTENSIONS``, with ``.nii.gz``).

    Example:
        >>> list_images("data/images")[:2]   # doctest: +SKIP
        [PosixPath('data/images/a.png'), PosixPath('data/images/b.png')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected a folder of image files)")
    endings = tuple(e.lower() for e in extensions)  # whole endings, so ".nii.gz" matches
    named = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.name.lower().endswith(endings)
    ]
    files = [p for p in named if p.is_file()]
    skipped = sorted(p.name for p in named if not p.is_file())
    if skipped:  # a folder named x.png, a dangling link or a symlink loop: say so, never guess
        log.warning(
            "%s: skipped %d entr%s named like images that are not readable files: %s",
            folder,
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""),
        )
    return sorted(files, key=lambda p: p.name)


def to_float_image(
    arr: np.ndarray,
    *,
    path: str | os.PathLike | None = None,
    spatial_dims: int = 2,
    channels: Sequence[int] | None = None,
) -> np.ndarray:
    """Convert a read image to float32, channels first, scaled by its dtype.

    Integer images are divided by their dtype's maximum (uint8 → /255, uint16 → /65535), so
    the result is in [0, 1]; float images are kept as they are. Grey becomes one channel;
    every channel of a channels-last array is kept (2-channel stains stay 2 channels; alpha
    is dropped by the readers, not here).

    Args:
        arr: H×W or H×W×C (C ≤ ``MAX_CHANNELS``), or for ``spatial_dims=3`` D×H×W or D×H×W×C.
        path: the source file, named in errors.
        spatial_dims: 2 for images, 3 for volumes.
        channels: channel indices to keep, in this order (e.g. ``(1, 0)``); None keeps all.

    Returns:
        float32 C×H×W (or C×D×H×W).

    Raises:
        DataError: NaN/inf values, a channel index the image lacks, or a shape that is not
            an image of ``spatial_dims`` dims.

    Example:
        >>> to_float_image(np.full((4, 5), 255, np.uint8)).shape
        (1, 4, 5)
    """
    name = str(path) if path is not None else "image"
    arr = np.asarray(arr)
    if arr.ndim == spatial_dims:
        arr = arr[..., None]
    # More channels than pixels along a side: channels-first planes or a stack, not channels
    odd = arr.ndim == spatial_dims + 1 and arr.shape[-1] > 4 and arr.shape[-1] > min(arr.shape[:-1])
    if arr.ndim != spatial_dims + 1 or arr.shape[-1] > MAX_CHANNELS or odd:
        hint = ""
        if spatial_dims == 2 and arr.ndim in (3, 4):
            hint = " (a volume? use spatial_dims=3, --spatial-dims 3"
            hint += "; planes first? save with axis metadata)" if odd else ")"
        raise DataError(
            f"{name}: image of shape {arr.shape} is not a {spatial_dims}D image with channels "
            f"last (at most {MAX_CHANNELS}){hint}"
        )
    if channels is not None:
        arr = arr[..., _channel_indices(channels, arr.shape[-1], name)]
    if arr.dtype == bool:
        out = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
    elif np.issubdtype(arr.dtype, np.floating):
        big = np.finfo(np.float32).max
        if arr.dtype.itemsize > 4 and np.isfinite(arr).all() and np.abs(arr).max() > big:
            raise DataError(
                f"{name}: image values up to {np.abs(arr).max():.3g} exceed float32 "
                f"(±{big:.3g}); rescale the image (e.g. divide by its maximum)"
            )
        out = arr.astype(np.float32)
        bad = ~np.isfinite(out)
        if bad.any():
            raise DataError(
                f"{name}: image contains {int(bad.sum())} NaN/inf values "
                f"(of {bad.size}); fix or remove the file"
            )
    else:
        raise DataError(f"{name}: unsupported image dtype {arr.dtype}")
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def _channel_indices(channels: Sequence[int], available: int, name: str) -> list[int]:
    picked = [int(c) for c in channels]
    bad = [c for c in picked if not 0 <= c < available]
    if not picked or bad:
        raise DataError(
            f"{name}: --channels {','.join(map(str, picked))}: the image has {available} "
            f"channel(s), numbered 0..{available - 1}"
        )
    return picked


def parse_channels(text: str | None) -> tuple[int, ...] | None:
    """``"1,0"`` → ``(1, 0)`` (the ``--channels`` flag); None or "" → None (all channels).

    Raises:
        ConfigError: not a comma-separated list of distinct integers ≥ 0.

    Example:
        >>> parse_channels("1,0")
        (1, 0)
    """
    if text is None or not str(text).strip():
        return None
    try:
        picked = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        picked = ()
    if not picked or min(picked) < 0 or len(set(picked)) != len(picked):
        raise ConfigError(
            f"--channels {text!r}: expected distinct channel numbers from 0, comma-separated "
            "(e.g. 1,0 for cytoplasm then nucleus)"
        )
    return picked
