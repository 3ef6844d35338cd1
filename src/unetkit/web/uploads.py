"""Checking what the browser sends: size, type by content (magic bytes), file names.

Uploaded bytes are stored under a random id with a fixed name (``image.png`` /
``image.tif``); the browser's file name is only kept, sanitised, as a label to show.
"""

from __future__ import annotations

import re
import secrets
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unetkit.data.io import read_image, write_image
from unetkit.errors import DataError

# the first bytes of each accepted format -> the extension it is stored under
MAGIC = {
    b"\x89PNG\r\n\x1a\n": ".png",
    b"II*\x00": ".tif",  # little-endian TIFF
    b"MM\x00*": ".tif",  # big-endian TIFF
    b"II+\x00": ".tif",  # BigTIFF
    b"MM\x00+": ".tif",
}
ACCEPTED = "PNG or TIFF"
MAX_NAME = 80


class UploadError(DataError):
    """An upload the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def sanitize_name(name: str | None) -> str:
    """A display name safe anywhere: the last path component, ASCII letters, digits, ``._-``.

    Example:
        >>> sanitize_name("../../etc/passwd")
        'passwd'
        >>> sanitize_name("C:\\\\Users\\\\me\\\\cells 01.tif")
        'cells_01.tif'
    """
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "upload"
    return base[-MAX_NAME:]


def image_type(data: bytes, name: str) -> str:
    """The stored extension for ``data`` judged by its first bytes; raises UploadError."""
    if not data:
        raise UploadError(f"{name}: the file is empty (0 bytes)")
    for magic, ext in MAGIC.items():
        if data.startswith(magic):
            return ext
    raise UploadError(f"{name}: not a {ACCEPTED} file (judged by its content)", status=415)


def check_size(size: int, limit: int, name: str) -> None:
    """Raise UploadError 413 if ``size`` bytes exceed ``limit``."""
    if size > limit:
        raise UploadError(
            f"{name}: {size / 2**20:.1f} MiB is over the upload limit of {limit / 2**20:.1f} "
            f"MiB (start the server with a larger --max-upload-mb)",
            status=413,
        )


@dataclass
class StoredImage:
    """An uploaded image on disk and its facts for the page."""

    id: str
    name: str
    folder: Path
    path: Path
    width: int
    height: int
    channels: int

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "channels": self.channels,
        }


def store_image(data: bytes, name: str | None, root: Path, *, max_pixels: int) -> StoredImage:
    """Check, decode and store an uploaded 2D image; writes a PNG preview for the page.

    Args:
        data: the uploaded bytes.
        name: the browser's file name (only shown, never used as a path).
        root: images folder; the image goes to ``root/<random id>/image.<ext>``.
        max_pixels: refuse larger images (H*W), before any work is done on them.

    Raises:
        UploadError: empty, not PNG/TIFF, undecodable, not 2D, or too many pixels.
    """
    shown = sanitize_name(name)
    ext = image_type(data, shown)
    image_id = secrets.token_urlsafe(12)
    folder = root / image_id
    folder.mkdir(parents=True)
    path = folder / f"image{ext}"
    path.write_bytes(data)
    try:
        return _decode(path, shown, ext, max_pixels, image_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _decode(path: Path, shown: str, ext: str, max_pixels: int, image_id: str) -> StoredImage:
    try:
        arr = read_image(path, palette_to_rgb=True)
    except Exception as e:  # a truncated or corrupt file: say so in one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UploadError(f"{shown}: cannot be read as {ext[1:].upper()} ({msg})") from e
    if arr.ndim == 3 and arr.shape[-1] > 4 and arr.shape[0] <= 4:  # C×H×W TIFF
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] > 4):
        raise UploadError(f"{shown}: a 2D grey or RGB(A) image is needed, got shape {arr.shape}")
    h, w = arr.shape[:2]
    if h * w > max_pixels:
        raise UploadError(f"{shown}: {w}x{h} pixels is over the limit of {max_pixels}", 413)
    write_image(path.parent / "preview.png", preview(arr))
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    return StoredImage(image_id, shown, path.parent, path, w, h, channels)


def preview(arr: np.ndarray) -> np.ndarray:
    """uint8 picture of any image (percentile-stretched for 16-bit or float data)."""
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):
        arr = arr[..., : 3 if arr.shape[-1] == 4 else 1]
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
