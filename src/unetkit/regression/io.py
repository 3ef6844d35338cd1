"""Dense regression targets on disk: 16/8-bit PNG, TIFF, NumPy ``.npy`` and PFM files.

A target is read as float32 **C×H×W** (one channel for depth, three for a clean RGB image,
two for optical flow, ...). Integer files hold *raw* values: pass ``scale`` to convert them to
the target's unit, e.g.

- KITTI depth PNGs (uint16, metres × 256, 0 = no lidar return): ``scale=1/256``;
- NYU-style millimetre PNGs: ``scale=1/1000`` (metres);
- 8-bit clean images for restoration: ``scale=1/255``.

Missing pixels are not decided here: NaN/inf are kept as they are, and
:func:`validity_mask` turns "non-finite, or ≤ 0 for depth" into the ``valid`` mask that
losses and metrics honour.

PFM (Portable Float Map) is the float format of the Middlebury stereo and the synthetic
scene-flow data sets: an ASCII header ``Pf`` (grey) or ``PF`` (colour), then ``width height``,
then a scale whose *sign* gives the byte order (negative: little-endian, positive:
big-endian), then raw float32 samples with the rows stored **bottom to top**, channels
interleaved.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tifffile

from unetkit._atomic import atomic_path, atomic_write_bytes
from unetkit.data.io import read_image, write_image
from unetkit.errors import ConfigError, DataError

__all__ = [
    "TARGET_EXTENSIONS",
    "colorize",
    "read_pfm",
    "read_target",
    "to_channels_first",
    "validity_mask",
    "write_pfm",
    "write_target",
]

log = logging.getLogger(__name__)

TARGET_EXTENSIONS = (".png", ".tif", ".tiff", ".npy", ".pfm")
_WRITE_EXTENSIONS = (".tif", ".tiff", ".npy", ".pfm", ".png")


def read_pfm(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a PFM file.

    Args:
        path: a ``.pfm`` file (``Pf`` grey or ``PF`` colour).

    Returns:
        (array, scale): float32 H×W (grey) or H×W×3 (colour), rows top to bottom, in native
        byte order; ``scale`` is the header's absolute scale value (most writers put 1).

    Example:
        >>> disparity, _ = read_pfm("disp0.pfm")   # doctest: +SKIP
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read PFM file ({e})") from None
    tokens, offset = _header_tokens(data, 4)
    if len(tokens) < 4 or tokens[0] not in (b"PF", b"Pf"):
        raise DataError(
            f"{path}: not a PFM file (header starts {data[:16]!r}; expected 'PF' or 'Pf', "
            "width height, scale)"
        )
    try:
        width, height, scale = int(tokens[1]), int(tokens[2]), float(tokens[3])
    except ValueError:
        raise DataError(f"{path}: bad PFM header {b' '.join(tokens)!r}") from None
    if width < 1 or height < 1 or scale == 0 or not np.isfinite(scale):
        raise DataError(f"{path}: bad PFM header: width={width} height={height} scale={scale}")
    channels = 3 if tokens[0] == b"PF" else 1
    count = width * height * channels
    if len(data) - offset < 4 * count:
        raise DataError(
            f"{path}: PFM file is truncated: header says {width}×{height}×{channels} floats "
            f"({4 * count} bytes) but {len(data) - offset} bytes follow; re-export the file"
        )
    if len(data) - offset > 4 * count:
        log.warning(
            "%s: %d bytes after the PFM data, ignored", path, len(data) - offset - 4 * count
        )
    dtype = np.dtype("<f4" if scale < 0 else ">f4")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    shape = (height, width, channels) if channels == 3 else (height, width)
    array = flat.reshape(shape)[::-1]  # stored bottom row first
    return np.ascontiguousarray(array, dtype=np.float32), abs(scale)


def _header_tokens(data: bytes, n: int) -> tuple[list[bytes], int]:
    """The first ``n`` whitespace-separated tokens and the offset just after the single
    whitespace byte that ends the last one (where a PFM's samples begin)."""
    tokens, i = [], 0
    while len(tokens) < n and i < len(data):
        while i < len(data) and data[i : i + 1].isspace():
            i += 1
        start = i
        while i < len(data) and not data[i : i + 1].isspace() and i - start < 32:
            i += 1
        tokens.append(data[start:i])
    return tokens, i + 1


def write_pfm(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    little_endian: bool = True,
    scale: float = 1.0,
) -> Path:
    """Write a PFM file atomically (rows bottom to top, as the format stores them).

    Args:
        path: target file.
        array: H×W (written as ``Pf``) or H×W×3 (``PF``), any float or integer dtype
            (stored as float32; NaN and inf are kept).
        little_endian: byte order; stored as the sign of the scale (negative = little).
        scale: positive scale value for the header (readers mostly ignore it).

    Returns:
        the path written.

    Example:
        >>> write_pfm("depth.pfm", np.ones((4, 5), np.float32))   # doctest: +SKIP
    """
    arr = np.asarray(array)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or arr.size == 0:
        raise DataError(f"{path}: PFM holds H×W or H×W×3 arrays, got shape {arr.shape}")
    if not scale > 0:
        raise ConfigError(f"write_pfm scale={scale}: must be > 0 (the sign is the byte order)")
    kind = b"PF" if arr.ndim == 3 else b"Pf"
    header = b"%s\n%d %d\n%s\n" % (
        kind,
        arr.shape[1],
        arr.shape[0],
        repr(-scale if little_endian else scale).encode(),
    )
    body = np.ascontiguousarray(arr[::-1], dtype="<f4" if little_endian else ">f4").tobytes()
    atomic_write_bytes(path, header + body)
    return Path(path)


def to_channels_first(array: np.ndarray, *, path: str | os.PathLike | None = None) -> np.ndarray:
    """H×W → 1×H×W; a 3-D array is C×H×W if its first axis is not longer than its last,
    else H×W×C (moved to channels first). Used for TIFF and NPY files, whose layout is not
    fixed (unetkit writes C×H×W); PNG and PFM colour data are always H×W×C."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr if arr.shape[0] <= arr.shape[-1] else np.moveaxis(arr, -1, 0)
    name = str(path) if path is not None else "target"
    raise DataError(
        f"{name}: target of shape {arr.shape} is not H×W, C×H×W or H×W×C; "
        "save one 2D target (with channels) per file"
    )


def read_target(path: str | os.PathLike, *, scale: float = 1.0) -> np.ndarray:
    """Read a regression target file as float32 C×H×W.

    Args:
        path: ``.png`` (8/16-bit grey or RGB), ``.tif``/``.tiff`` (float or integer),
            ``.npy`` (``np.load`` with ``allow_pickle=False``) or ``.pfm``.
        scale: multiplies the stored values (raw integers for PNG; see the module
            docstring: KITTI depth PNGs need ``1/256``). Applied to every format.

    Returns:
        float32 C×H×W (a 2-D file gives 1×H×W). NaN/inf are kept (they mark missing
        pixels; see :func:`validity_mask`).

    Raises:
        DataError: missing, unreadable or truncated file, unsupported suffix or dtype.

    Example:
        >>> depth = read_target("kitti/0000000005.png", scale=1 / 256)   # doctest: +SKIP
        >>> depth.shape, depth.dtype                                    # doctest: +SKIP
        ((1, 375, 1242), dtype('float32'))
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in TARGET_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported target type {suffix!r}; use one of {', '.join(TARGET_EXTENSIONS)}"
        )
    if suffix == ".pfm":
        raw = read_pfm(path)[0]
    elif suffix == ".npy":
        raw = _read_npy(path)
    else:
        raw = read_image(path)
        if raw.ndim == 3 and suffix == ".png":
            raw = raw[..., :1] if raw.shape[-1] == 2 else raw[..., :3]  # drop alpha
    if raw.dtype == bool or not (
        np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)
    ):
        raise DataError(f"{path}: unsupported target dtype {raw.dtype}; use integers or floats")
    if raw.size == 0:
        raise DataError(f"{path}: target holds no pixels (shape {raw.shape})")
    if suffix in (".png", ".pfm"):  # channels last by format
        chw = raw[None] if raw.ndim == 2 else np.moveaxis(raw, -1, 0)
    else:
        chw = to_channels_first(raw, path=path)
    out = chw.astype(np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    return np.ascontiguousarray(out)


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError (pickled objects, truncation), EOFError, OSError
        raise DataError(
            f"{path}: cannot read .npy file ({type(e).__name__}: {e}); the file is truncated, "
            "holds Python objects (not allowed) or is not a NumPy array file"
        ) from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected one array in a .npy file")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def validity_mask(target: np.ndarray, *, positive: bool = True) -> np.ndarray:
    """Pixels with a usable target: finite in every channel, and > 0 if ``positive``.

    Depth (``positive=True``): 0 or below means "no measurement" (KITTI stores 0 where the
    lidar saw nothing; Middlebury stores inf), so such pixels are masked out of losses and
    metrics. Signed targets (restoration residuals, flow): ``positive=False``.

    Args:
        target: C×H×W.
        positive: treat values ≤ 0 as missing.

    Returns:
        bool H×W.

    Example:
        >>> validity_mask(np.array([[[0.0, 1.5, np.nan]]])).tolist()
        [[False, True, False]]
    """
    target = np.asarray(target)
    ok = np.isfinite(target)
    if positive:
        ok &= target > 0
    return ok.all(axis=0)


def write_target(path: str | os.PathLike, array: np.ndarray, *, scale: float | None = None) -> Path:
    """Write a target or a prediction atomically; the suffix picks the format.

    ``.tif``/``.tiff`` (float32, the default choice: any channel count, lossless), ``.npy``
    (float32), ``.pfm`` (1 or 3 channels) or ``.png`` (one channel as uint16
    ``round(value / scale)``: ``scale`` is required, e.g. 1/256 for KITTI-style depth, and
    values must fit 0..65535).

    Args:
        path: target file.
        array: C×H×W or H×W float array.
        scale: PNG only: the value of one stored unit.

    Returns:
        the path written.

    Example:
        >>> write_target("pred/0001_depth.tif", depth)                   # doctest: +SKIP
        >>> write_target("pred/0001_depth.png", depth, scale=1 / 256)    # doctest: +SKIP
    """
    path = Path(path)
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(f"{path}: cannot write a target of shape {arr.shape}; expected C×H×W")
    suffix = path.suffix.lower()
    if suffix not in _WRITE_EXTENSIONS:
        raise DataError(
            f"{path}: cannot write targets with suffix {suffix!r}; use .tif (float32), .npy, "
            ".pfm or .png (with scale)"
        )
    if suffix in (".tif", ".tiff"):
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, arr[0] if arr.shape[0] == 1 else arr, photometric="minisblack")
    elif suffix == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    elif suffix == ".pfm":
        if arr.shape[0] not in (1, 3):
            raise DataError(f"{path}: PFM holds 1 or 3 channels, got {arr.shape[0]}; use .tif")
        write_pfm(path, arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1))
    else:
        write_image(path, _to_uint16(arr, path, scale))
    return path


def _to_uint16(arr: np.ndarray, path: Path, scale: float | None) -> np.ndarray:
    if scale is None or not scale > 0:
        raise ConfigError(
            f"{path}: writing a target as 16-bit PNG needs scale > 0 (the value of one stored "
            f"unit, e.g. 1/256 for KITTI-style depth); got scale={scale}. Or write .tif"
        )
    if arr.shape[0] != 1:
        raise DataError(f"{path}: 16-bit PNG targets hold one channel, got {arr.shape[0]}")
    stored = np.round(np.nan_to_num(arr[0], nan=0.0, posinf=0.0, neginf=0.0) / scale)
    if stored.min() < 0 or stored.max() > 65535:
        raise DataError(
            f"{path}: values {float(arr.min()):g}..{float(arr.max()):g} with scale={scale:g} "
            "do not fit 16-bit PNG (0..65535 units); use a larger scale or write .tif"
        )
    return stored.astype(np.uint16)


def colorize(
    depth: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "magma_r",
) -> np.ndarray:
    """A depth map as an RGB uint8 picture for a quick look (near bright, far dark).

    Args:
        depth: H×W or 1×H×W.
        valid: bool H×W; invalid pixels are black. Default: finite pixels.
        vmin, vmax: value range; default the 2nd and 98th percentiles of the valid pixels.
        cmap: a Matplotlib colour map name.

    Returns:
        uint8 H×W×3 (write it with ``unetkit.data.io.write_image(path.png, ...)``).

    Example:
        >>> colorize(np.linspace(1, 10, 20).reshape(4, 5)).shape
        (4, 5, 3)
    """
    from matplotlib import colormaps

    d = np.asarray(depth, dtype=np.float64)
    d = d[0] if d.ndim == 3 else d
    ok = np.isfinite(d) if valid is None else np.asarray(valid, bool) & np.isfinite(d)
    values = d[ok]
    lo = vmin if vmin is not None else (np.percentile(values, 2) if values.size else 0.0)
    hi = vmax if vmax is not None else (np.percentile(values, 98) if values.size else 1.0)
    t = np.clip((np.where(ok, d, lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    rgb = colormaps[cmap](t)[..., :3]
    rgb[~ok] = 0.0
    return np.round(rgb * 255).astype(np.uint8)
