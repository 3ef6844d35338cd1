"""3D volumes: read and write multi-page TIFF and NIfTI (``.nii`` / ``.nii.gz``) with spacing.

Axis order. unetkit arrays are D×H×W (×C) = z, y, x (the order of a TIFF page stack and of
numpy images: the last axis runs fastest along a row). NIfTI stores voxels as x, y, z (×t/c),
so :func:`read_volume` reverses the three spatial axes of a NIfTI file and :func:`write_volume`
reverses them back; spacing tuples follow the array, (z, y, x). The rotation/flip part of a
NIfTI affine is not applied: the array is the file's voxel grid in reversed order (reorient
with ``nibabel.as_closest_canonical`` first if you need RAS+). Written NIfTI files get the
affine ``diag(sx, sy, sz, 1)``.

NIfTI needs the optional ``nibabel`` package (``pip install unetkit[3d]``); TIFF needs nothing
beyond the core dependencies. Spacing in TIFF files is stored as JSON in the image
description (tifffile's "shaped" metadata) and, when reading, also taken from ImageJ metadata
(``spacing`` for z) and the X/YResolution tags. Z-stacks in Zeiss CZI, Nikon ND2 and Leica
LIF files are read through bioio (the ``formats`` extra, :mod:`unetkit.data.vendor`), with
their physical voxel size in µm as spacing.

Example:
    >>> ct = np.zeros((12, 20, 18), np.int16)
    >>> write_volume("ct.nii.gz", ct, spacing=(2.5, 0.7, 0.7))   # doctest: +SKIP
    >>> volume, spacing = read_volume("ct.nii.gz")   # doctest: +SKIP
    >>> volume.shape, spacing                         # doctest: +SKIP
    ((12, 20, 18), (2.5, 0.7, 0.7))
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import tifffile

from unetkit._atomic import atomic_path
from unetkit.data.io import read_image
from unetkit.data.vendor import VENDOR_EXTENSIONS, read_vendor
from unetkit.errors import ConfigError, DataError

__all__ = [
    "NIFTI_EXTENSIONS",
    "VOLUME_EXTENSIONS",
    "read_volume",
    "volume_stem",
    "write_volume",
]

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
VOLUME_EXTENSIONS = (".tif", ".tiff", *NIFTI_EXTENSIONS, *VENDOR_EXTENSIONS)
Spacing = tuple[float, float, float]


def volume_stem(path: str | os.PathLike) -> str:
    """The file name without its volume extension: ``"a.nii.gz" -> "a"``, ``"a.tif" -> "a"``."""
    name = Path(path).name
    lower = name.lower()
    for ext in sorted(VOLUME_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def _kind(path: Path) -> str:
    lower = path.name.lower()
    if lower.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if lower.endswith((".tif", ".tiff")):
        return "tiff"
    if lower.endswith(VENDOR_EXTENSIONS):
        return "vendor"
    raise DataError(
        f"{path}: unsupported volume type; use one of {', '.join(VOLUME_EXTENSIONS)} "
        "(multi-page TIFF, NIfTI or CZI/ND2/LIF)"
    )


def _nibabel(path: Path) -> ModuleType:
    try:
        import nibabel
    except ImportError:
        raise DataError(
            f"{path}: reading or writing NIfTI files needs the optional package nibabel; "
            "install it with `pip install unetkit[3d]` (or `pip install nibabel`), "
            "or convert the volume to a multi-page .tif"
        ) from None
    return nibabel


def read_volume(path: str | os.PathLike, *, scene: int | None = None) -> tuple[np.ndarray, Spacing]:
    """Read a 3D volume and its voxel spacing.

    Args:
        path: a multi-page TIFF (``.tif``/``.tiff``, read with
            :func:`unetkit.data.io.read_image`, which stacks the pages) or a NIfTI file
            (``.nii``/``.nii.gz``, needs nibabel), or a CZI/ND2/LIF Z-stack (the
            formats extra; spacing from its physical voxel size in µm).
        scene: CZI/ND2/LIF only: the scene to read (None: the first).

    Returns:
        (array, spacing): the array is D×H×W or D×H×W×C (z, y, x[, channel]) in the file's
        dtype; a single 2D image becomes 1×H×W[×C]. ``spacing`` is (z, y, x) in the file's
        units, 1.0 where the file does not say.

    Raises:
        DataError: missing, unreadable or non-3D file, or nibabel not installed.

    Example:
        >>> volume, (dz, dy, dx) = read_volume("scan.nii.gz")   # doctest: +SKIP
    """
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if kind == "vendor":
        return _read_vendor_volume(path, scene)
    if scene is not None:
        raise DataError(f"{path}: --scene applies to CZI/ND2/LIF files only")
    return _read_nifti(path) if kind == "nifti" else _read_tiff_volume(path)


def _read_vendor_volume(path: Path, scene: int | None) -> tuple[np.ndarray, Spacing]:
    arr, axes, pixel_size = read_vendor(
        path, scene=scene
    )  # DataError naming the file if unreadable
    if not axes.startswith("Z"):  # a single plane: one slice, as for a 2D TIFF
        arr = arr[None]
    if pixel_size is None:
        return arr, (1.0, 1.0, 1.0)
    return arr, (pixel_size.z or 1.0, pixel_size.y, pixel_size.x)


def _read_tiff_volume(path: Path) -> tuple[np.ndarray, Spacing]:
    arr = read_image(path)  # DataError naming the file if unreadable
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series
            # one page of colour samples (Y, X, S) is a 2D image, not D×H×W
            single_rgb = arr.ndim == 3 and len(series) == 1 and series[0].axes.endswith("S")
            spacing = _tiff_spacing(tif)
    except Exception as e:  # read_image succeeded, so only metadata can be broken here
        raise DataError(f"{path}: cannot read TIFF metadata ({type(e).__name__}: {e})") from None
    if arr.ndim == 2 or single_rgb:
        arr = arr[None]
    if arr.ndim not in (3, 4):
        raise DataError(
            f"{path}: TIFF holds an array of shape {arr.shape}; expected a volume "
            "D×H×W or D×H×W×C (one page per slice)"
        )
    return arr, spacing


def _tiff_spacing(tif: tifffile.TiffFile) -> Spacing:
    shaped = tif.shaped_metadata
    if shaped and "spacing" in shaped[0] and len(shaped[0]["spacing"]) == 3:
        z, y, x = (float(s) for s in shaped[0]["spacing"])
        return z, y, x
    z = float((tif.imagej_metadata or {}).get("spacing", 1.0))
    page = tif.pages.first
    y, x = (_resolution_spacing(page, tag) for tag in ("YResolution", "XResolution"))
    return z, y, x


def _resolution_spacing(page: tifffile.TiffPage, tag: str) -> float:
    """Pixel size from a TIFF resolution tag (pixels per unit, a rational); 1.0 if absent."""
    value = page.tags.get(tag)
    if value is None:
        return 1.0
    num, den = value.value
    return float(den) / float(num) if num else 1.0


def _read_nifti(path: Path) -> tuple[np.ndarray, Spacing]:
    nib = _nibabel(path)
    try:
        img = nib.load(path, mmap=False)
        data = np.asarray(img.dataobj)  # the stored dtype (scaled to float if slope is set)
        # header zooms are float32: keep the shortest decimal that gives them (0.7, not
        # 0.699999988), which is what the writer meant
        zooms = tuple(float(str(np.float32(z))) for z in img.header.get_zooms())
    except Exception as e:  # nibabel raises ImageFileError, EOFError, ValueError, ...
        raise DataError(
            f"{path}: cannot read NIfTI file ({type(e).__name__}: {e}); the file is "
            "truncated or not NIfTI-1/2"
        ) from None
    while data.ndim > 4 and data.shape[3] == 1:  # x, y, z, t=1, c: drop the time axis
        data = data[:, :, :, 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim not in (3, 4):
        raise DataError(
            f"{path}: NIfTI image of shape {data.shape} is not a 3D volume (x, y, z[, c])"
        )
    zooms = (zooms + (1.0, 1.0, 1.0))[:3]
    # x, y, z[, c] -> z, y, x[, c]
    data = np.ascontiguousarray(np.moveaxis(data, (0, 1, 2), (2, 1, 0)))
    return data, (zooms[2], zooms[1], zooms[0])


def write_volume(
    path: str | os.PathLike, array: np.ndarray, spacing: Sequence[float] | None = None
) -> Path:
    """Write a D×H×W[×C] volume atomically as multi-page TIFF or NIfTI (by suffix).

    Args:
        path: ``.tif``/``.tiff`` (one page per z slice; C = 3/4 uint8/uint16 are RGB(A)
            pages) or ``.nii``/``.nii.gz`` (x, y, z[, c] on disk, see the module docstring).
        array: D×H×W or D×H×W×C; bool is written as uint8 0/1, int64 as int32 when the
            values fit (most tools cannot read 64-bit NIfTI integers).
        spacing: (z, y, x) voxel size; default 1.0 each. NIfTI keeps it in the header and
            the affine ``diag(sx, sy, sz, 1)``; TIFF in its JSON description.

    Returns:
        the path written.

    Example:
        >>> write_volume("mask.nii.gz", labels, spacing=(3, 1, 1))   # doctest: +SKIP
    """
    path = Path(path)
    kind = _kind(path)
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise DataError(
            f"{path}: cannot write an array of shape {arr.shape} as a volume; "
            "expected D×H×W or D×H×W×C"
        )
    spacing_zyx = _check_spacing(spacing)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.int64 and (arr.size == 0 or _fits_int32(arr)):
        arr = arr.astype(np.int32)
    if kind == "nifti":
        _write_nifti(path, arr, spacing_zyx)
        return path
    rgb = arr.ndim == 4 and arr.shape[-1] in (3, 4) and arr.dtype in (np.uint8, np.uint16)
    options = dict(photometric="rgb") if rgb else dict(photometric="minisblack")
    if arr.ndim == 4 and not rgb:
        options["planarconfig"] = "contig"  # C samples per pixel, one page per slice
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, metadata={"spacing": list(spacing_zyx)}, **options)
    return path


def _check_spacing(spacing: Sequence[float] | None) -> Spacing:
    if spacing is None:
        return 1.0, 1.0, 1.0
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"spacing={tuple(spacing)!r}: give three positive voxel sizes (z, y, x)")
    return values  # type: ignore[return-value]


def _fits_int32(arr: np.ndarray) -> bool:
    info = np.iinfo(np.int32)
    return info.min <= int(arr.min()) and int(arr.max()) <= info.max


def _write_nifti(path: Path, arr: np.ndarray, spacing: Spacing) -> None:
    nib = _nibabel(path)
    sz, sy, sx = spacing
    data = np.moveaxis(arr, (0, 1, 2), (2, 1, 0))  # z, y, x[, c] -> x, y, z[, c]
    # an explicit dtype lets nibabel store int64 that does not fit int32
    img = nib.Nifti1Image(data, np.diag([sx, sy, sz, 1.0]), dtype=data.dtype)
    img.header.set_xyzt_units("mm")
    payload = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)  # mtime 0: same bytes for the same volume
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
