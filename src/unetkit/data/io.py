"""Image and mask files: read/write PNG and TIFF, convert to float, decode label masks.

Every failure on a file raises :class:`~unetkit.errors.DataError` naming the file, what was
found and how to fix it, so a user with a folder of microscopy images learns which file is
broken rather than reading a traceback from Pillow.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from unetkit._atomic import atomic_path
from unetkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_MODES",
    "check_mask_options",
    "decode_mask",
    "list_images",
    "read_image",
    "to_float_image",
    "write_image",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MASK_MODES = ("auto", "index", "binary", "instances")
_TIFF = (".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow modes whose pixel values numpy reads as they are (plus the 16-bit "I;16*" modes).
_NUMERIC_MODES = ("P", "1", "L", "LA", "RGB", "RGBA", "I", "F")


def read_image(path: str | os.PathLike, *, palette_to_rgb: bool = False) -> np.ndarray:
    """Read a PNG/JPEG (Pillow) or TIFF (tifffile) file into a numpy array.

    Args:
        path: the file. TIFF files may hold several pages; they are returned as a volume.
        palette_to_rgb: palette ("P" mode) PNGs are returned as their palette indices, which
            is what label masks stored with a colour palette mean; set True for images.

    Returns:
        H×W (grey), H×W×C (RGB/RGBA, channels last) or D×H×W[×C] (multi-page TIFF), with the
        file's dtype kept (uint8, uint16, float32, ...). 1-bit images become uint8 0/255.

    Example:
        >>> img = read_image("images/cell_000.png")   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported image type {suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}"
        )
    try:
        arr = _read_tiff(path) if suffix in _TIFF else _read_pillow(path, palette_to_rgb)
    except DataError:
        raise
    except Exception as e:  # Pillow/tifffile raise OSError, ValueError, struct.error, ...
        raise DataError(
            f"{path}: cannot read image ({type(e).__name__}: {e}); the file is truncated, "
            "corrupt or not a valid image: re-export or remove it"
        ) from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series
        # Pages written one by one form one series each: stack them if they are alike.
        alike = len({(s.shape, s.dtype) for s in series}) == 1
        if len(series) > 1 and alike:
            arr = np.stack([s.asarray() for s in series])
        else:
            arr = np.asarray(tif.asarray())
    if arr.size == 0:
        raise DataError(f"{path}: TIFF file holds no pixels (shape {arr.shape})")
    return arr


def _read_pillow(path: Path, palette_to_rgb: bool) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # decode now, so truncated data raises here and not later
        if path.suffix.lower() == ".png" and img.mode in ("RGB", "RGBA") and _png_is_16bit(path):
            log.warning("%s: 16-bit RGB PNG is read as 8-bit by Pillow; save as TIFF", path)
        if img.mode == "P" and palette_to_rgb:
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode not in _NUMERIC_MODES and not img.mode.startswith("I;16"):
            img = img.convert("RGB")  # CMYK, YCbCr, ...: convert to something with meaning
        arr = np.asarray(img)
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))


def _png_is_16bit(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(26)
    return head[:8] == _PNG_SIGNATURE and len(head) > 24 and head[24] == 16


def write_image(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` to ``path`` atomically; the suffix picks the format.

    PNG holds uint8 grey/RGB/RGBA and uint16 grey; TIFF holds any dtype and multi-page
    volumes (D×H×W); JPEG holds uint8 grey/RGB (lossy, so never use it for masks). bool
    arrays are written as uint8 0/255.

    Args:
        path: target file (``.png``, ``.tif``, ``.tiff``, ``.jpg``, ``.jpeg``).
        array: H×W, H×W×3/4 or (TIFF only) any shape.

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
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, arr, photometric="rgb" if rgb else "minisblack")
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
    arr: np.ndarray, *, path: str | os.PathLike | None = None, spatial_dims: int = 2
) -> np.ndarray:
    """Convert a read image to float32, channels first, scaled by its dtype.

    Integer images are divided by their dtype's maximum (uint8 → /255, uint16 → /65535), so
    the result is in [0, 1]; float images are kept as they are. Grey becomes one channel,
    grey+alpha drops the alpha, RGB(A) becomes three channels.

    Args:
        arr: H×W, H×W×C (C ≤ 4), or for ``spatial_dims=3`` D×H×W or D×H×W×C.
        path: the source file, named in errors.
        spatial_dims: 2 for images, 3 for volumes.

    Returns:
        float32 C×H×W (or C×D×H×W).

    Raises:
        DataError: NaN/inf values, or a shape that is not an image of ``spatial_dims`` dims.

    Example:
        >>> to_float_image(np.full((4, 5), 255, np.uint8)).shape
        (1, 4, 5)
    """
    name = str(path) if path is not None else "image"
    arr = np.asarray(arr)
    if arr.ndim == spatial_dims:
        arr = arr[..., None]
    if arr.ndim != spatial_dims + 1 or arr.shape[-1] > 4:
        hint = " (a volume? use spatial_dims=3)" if spatial_dims == 2 and arr.ndim == 3 else ""
        raise DataError(
            f"{name}: image of shape {arr.shape} is not a {spatial_dims}D grey or RGB(A) "
            f"image{hint}"
        )
    channels = arr.shape[-1]
    arr = arr[..., :1] if channels == 2 else arr[..., :3]
    if arr.dtype == bool:
        out = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
    elif np.issubdtype(arr.dtype, np.floating):
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


def decode_mask(
    arr: np.ndarray,
    num_classes: int,
    *,
    path: str | os.PathLike | None = None,
    mode: str = "auto",
    spatial_dims: int = 2,
) -> np.ndarray:
    """Decode a mask file's array into int64 class indices or instance labels.

    Modes:
        ``"index"``: values are class indices 0..num_classes-1.
        ``"binary"``: values ⊆ {0, 255} or {0, 1}, decoded to 0/1.
        ``"instances"``: an instance label image (0 = background, 1..N = objects); the labels
        are returned, and the semantic mask is ``labels > 0``.
        ``"auto"``: binary when num_classes == 2 and values ⊆ {0, 255} or {0, 1}, else index;
        folder data sets read a 2-class mask with other values as instance labels
        (see :func:`looks_like_instances`).

    Args:
        arr: H×W (or D×H×W) integer array; a grey mask saved as RGB(A) is accepted.
        num_classes: number of classes (≥ 2), background included.
        path: the source file, named in errors.
        mode: one of the modes above.
        spatial_dims: 2 or 3.

    Returns:
        int64 array with the spatial shape of ``arr``.

    Raises:
        DataError: values that do not fit the mode, e.g. ``masks/img3.png: mask values
            [0, 1, 7] do not fit num_classes=2 (...)``.

    Example:
        >>> decode_mask(np.array([[0, 255]], np.uint8), 2).tolist()
        [[0, 1]]
    """
    check_mask_options(num_classes, mode)
    name = str(path) if path is not None else "mask"
    labels = _mask_to_integers(np.asarray(arr), name, spatial_dims)
    values = np.unique(labels)
    if mode == "instances":
        if values[0] < 0:
            raise DataError(f"{name}: instance labels must be ≥ 0, found {_fmt_values(values)}")
        return labels
    binary = _binary_scale(values)
    if mode == "binary" or (mode == "auto" and num_classes == 2 and binary):
        if not binary:
            raise DataError(
                f"{name}: mask values {_fmt_values(values)} are not binary (expected 0/1 or "
                "0/255); use mask_mode='index' (--mask-mode index) for class indices"
            )
        return (labels > 0).astype(np.int64)
    if values[0] < 0 or values[-1] >= num_classes:
        raise DataError(
            f"{name}: mask values {_fmt_values(values)} do not fit num_classes={num_classes} "
            f"(expected 0..{num_classes - 1}, or 0/255 for binary); set --num-classes or "
            "--mask-mode (num_classes= / mask_mode= in the API; 'instances' for label images)"
        )
    return labels


def looks_like_instances(arr: np.ndarray, num_classes: int) -> bool:
    """True for what folder data sets in ``mode="auto"`` read as an instance label image.

    A 2-class task whose single-channel integer mask is 16/32-bit with values beyond 0/1, or
    8-bit with at least three objects (values 0 plus three or more labels, not 0/255). A mask
    with one stray value (e.g. 0, 1, 7) stays a class mask, so the error names the value.
    """
    arr = np.asarray(arr)
    if num_classes != 2 or arr.dtype.kind not in "ui" or arr.ndim > 3:
        return False
    values = np.unique(arr)
    if values[0] < 0 or values[-1] <= 1 or _binary_scale(values):
        return False
    return arr.dtype.itemsize >= 2 or values.size >= 4


def check_mask_options(num_classes: int, mode: str) -> None:
    """Raise ConfigError unless ``mode`` is a mask mode and ``num_classes`` ≥ 2."""
    if mode not in MASK_MODES:
        raise ConfigError(
            f"mask_mode={mode!r}{did_you_mean(mode, MASK_MODES)}: "
            f"use one of {', '.join(MASK_MODES)}"
        )
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes}: need at least 2 (background + 1 class)")


def _mask_to_integers(arr: np.ndarray, name: str, spatial_dims: int) -> np.ndarray:
    if arr.ndim == spatial_dims + 1 and arr.shape[-1] in (3, 4):
        colour = arr[..., :3]
        if not (colour == colour[..., :1]).all():
            raise DataError(
                f"{name}: colour mask of shape {arr.shape}; masks must hold class indices or "
                "instance labels in one grey channel (colour palettes: save as palette PNG)"
            )
        arr = colour[..., 0]
    if arr.ndim != spatial_dims:
        raise DataError(f"{name}: mask of shape {arr.shape} is not a {spatial_dims}D label image")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not (arr == np.round(arr)).all():
            raise DataError(
                f"{name}: mask holds non-integer or NaN values; masks must be integer labels"
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name}: unsupported mask dtype {arr.dtype}")
    return arr.astype(np.int64)


def _binary_scale(values: np.ndarray) -> bool:
    present = set(values.tolist())
    return present <= {0, 1} or present <= {0, 255}


def _fmt_values(values: Sequence[int] | np.ndarray, limit: int = 8) -> str:
    vals = [int(v) for v in values]
    if len(vals) <= limit:
        return str(vals)
    head = ", ".join(str(v) for v in vals[: limit - 1])
    return f"[{head}, ..., {vals[-1]}] ({len(vals)} distinct values)"
