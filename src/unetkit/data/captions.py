"""A folder of images with captions, for text-to-image diffusion training.

Captions follow the Hugging Face ``imagefolder`` convention: a ``metadata.csv`` (columns
``file_name,text``) or ``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` object per
line) inside the folder. ``file_name`` is relative to the image folder and may name a
sub-folder (``train/0001.png``). Every row is one sample, so an image with five captions
appears five times (as in COCO captions).

Example:
    >>> ds = CaptionFolderDataset("photos", size=64)   # doctest: +SKIP
    >>> ds[0]["image"].shape, ds[0]["caption"]          # doctest: +SKIP
    (torch.Size([3, 64, 64]), 'a red bicycle against a wall')
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from unetkit.data.io import IMAGE_EXTENSIONS, list_images, read_image, to_float_image
from unetkit.errors import ConfigError, DataError

__all__ = ["CAPTION_FILES", "CaptionFolderDataset", "read_captions", "resize_center_crop"]

log = logging.getLogger(__name__)

CAPTION_FILES = ("metadata.csv", "metadata.jsonl", "captions.csv", "captions.jsonl")
_TEXT_COLUMNS = ("text", "caption")  # the first one present is the caption
_MAX_LISTED = 5
# ITU-R BT.601 luma, the weights Pillow's "L" conversion uses
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _text_key(keys: list[str], file: Path) -> str:
    if "file_name" not in keys:
        raise DataError(
            f"{file}: no 'file_name' column/key (found {keys}); captions files need "
            f"file_name and text, e.g. 'file_name,text' as the CSV header"
        )
    for k in _TEXT_COLUMNS:
        if k in keys:
            return k
    others = [k for k in keys if k != "file_name"]
    if len(others) == 1:  # imagefolder allows any name for the one text column
        return others[0]
    raise DataError(f"{file}: no 'text' column/key (found {keys}); name the caption column 'text'")


def _read_csv(file: Path) -> list[tuple[str, str, int]]:
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        key = _text_key(list(reader.fieldnames or []), file)
        rows = []
        for row in reader:
            if row.get("file_name") is None or row.get(key) is None:
                raise DataError(f"{file}, line {reader.line_num}: expected file_name and {key}")
            rows.append((row["file_name"], row[key], reader.line_num))
    return rows


def _read_jsonl(file: Path) -> list[tuple[str, str, int]]:
    rows = []
    key = None
    for n, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{file}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{file}, line {n}: expected a JSON object, found {type(obj).__name__}")
        key = key or _text_key(list(obj), file)
        if not isinstance(obj.get("file_name"), str) or not isinstance(obj.get(key), str):
            raise DataError(f"{file}, line {n}: expected string 'file_name' and {key!r}")
        rows.append((obj["file_name"], obj[key], n))
    return rows


def read_captions(file: str | os.PathLike) -> list[tuple[str, str]]:
    """(file_name, caption) rows of a ``.csv`` (header ``file_name,text``) or ``.jsonl`` file."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"{file}: captions file not found")
    suffix = file.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"{file}: unknown captions format {suffix!r}; use .csv or .jsonl")
    try:
        rows = _read_csv(file) if suffix == ".csv" else _read_jsonl(file)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{file}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    except csv.Error as e:  # NUL bytes, broken quoting
        raise DataError(f"{file}: not a readable CSV file ({e})") from None
    if not rows:
        raise DataError(f"{file}: no captions in the file")
    return [(name, text) for name, text, _ in rows]


def _inside(folder: Path, name: str) -> bool:
    """Whether ``name`` is a relative path that stays in ``folder`` (symlinks resolved)."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not name.strip():
        return False
    try:
        (folder / path).resolve().relative_to(folder.resolve())
    except (ValueError, OSError, RuntimeError):  # outside, or a symlink loop
        return False
    return True


def find_captions_file(folder: Path) -> Path:
    found = [folder / n for n in CAPTION_FILES if (folder / n).is_file()]
    if not found:
        raise DataError(
            f"{folder}: no captions file; add metadata.csv (columns file_name,text) or "
            f"metadata.jsonl beside the images, or pass captions=FILE"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(f"{folder}: several captions files ({names}); pass captions=FILE")
    return found[0]


def resize_center_crop(image: torch.Tensor, size: int, *, center_crop: bool = True) -> torch.Tensor:
    """Resize (C, H, W) so the shorter side is ``size`` and crop the centre to size×size;
    ``center_crop=False`` squeezes the whole image to size×size instead. Bilinear with
    antialiasing, so down-scaling does not alias."""
    h, w = image.shape[-2:]
    if center_crop:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
    else:
        new = (size, size)
    x = image[None]
    if new != (h, w):
        x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return x[0, :, top : top + size, left : left + size]


class CaptionFolderDataset(Dataset):
    """Images of a folder with their captions, resized and centre-cropped to size×size.

    Samples are dicts: ``"image"`` float32 (channels, size, size) in [-1, 1], ``"caption"``
    str, ``"file_name"`` str (as in the captions file).

    Args:
        folder: the image folder (PNG, JPEG, TIFF). Integer images are scaled by their
            dtype (uint8 /255, uint16 /65535); float images are used as they are when in
            [0, 1], else stretched from their min..max to [0, 1].
        captions: the captions file (CSV or JSON lines); None = the one of
            ``metadata.csv``/``metadata.jsonl``/``captions.csv``/``captions.jsonl`` in
            ``folder``. ``file_name`` entries are relative to ``folder``.
        size: output size (any; the shorter side is scaled to it).
        center_crop: crop the centre square (True) or squeeze the image to a square (False).
        channels: 3 (grey images repeated) or 1 (RGB turned to luma, BT.601).

    Raises:
        DataError: no captions file, rows naming files that do not exist, or images in the
            folder that have no caption (a few are listed).

    Example:
        >>> ds = CaptionFolderDataset("photos", "photos/metadata.jsonl", size=32)   # doctest: +SKIP
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        captions: str | os.PathLike | None = None,
        *,
        size: int = 64,
        center_crop: bool = True,
        channels: int = 3,
    ) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: image folder not found")
        if channels not in (1, 3):
            raise ConfigError(f"channels={channels}: use 1 (grey) or 3 (RGB)")
        if int(size) < 1:
            raise ConfigError(f"size={size}: must be a positive number of pixels")
        file = Path(captions) if captions is not None else find_captions_file(folder)
        rows = read_captions(file)
        outside = sorted({n for n, _ in rows if not _inside(folder, n)})
        if outside:  # never read files the data folder does not hold (../secret.png, /etc/x)
            raise DataError(
                f"{file}: {len(outside)} file_name entries point outside {folder}: "
                f"{_listing(outside)}; file_name must be a path inside the folder"
            )
        missing = sorted({n for n, _ in rows if not (folder / n).is_file()})
        if missing:
            raise DataError(
                f"{file}: {len(missing)} caption row(s) name files not in {folder}: "
                f"{_listing(missing)}; fix the file_name entries or add the images"
            )
        bad = sorted({n for n, _ in rows if Path(n).suffix.lower() not in IMAGE_EXTENSIONS})
        if bad:
            raise DataError(
                f"{file}: not image files: {_listing(bad)}; use {', '.join(IMAGE_EXTENSIONS)}"
            )
        named = {(folder / n).resolve() for n, _ in rows}
        uncaptioned = [p.name for p in list_images(folder) if p.resolve() not in named]
        if uncaptioned:
            raise DataError(
                f"{folder}: {len(uncaptioned)} image(s) have no caption in {file.name}: "
                f"{_listing(uncaptioned)}; add rows for them or move them out of the folder"
            )
        self.folder = folder
        self.captions_file = file
        self.rows = rows
        self.size = int(size)
        self.center_crop = center_crop
        self.channels = channels
        log.info("%s: %d captioned images (captions from %s)", folder, len(rows), file.name)

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, i: int) -> torch.Tensor:
        """Image ``i`` as float32 (channels, size, size) in [-1, 1]."""
        path = self.folder / self.rows[i][0]
        arr = read_image(path, palette_to_rgb=True)
        x = torch.from_numpy(to_float_image(arr, path=path))
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:  # float data in its own units: stretch its range to [0, 1]
            x = (x - lo) / max(hi - lo, 1e-12)
        if self.channels == 1 and x.shape[0] == 3:
            x = torch.einsum("chw,c->hw", x, _LUMA)[None]
        elif self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        x = resize_center_crop(x, self.size, center_crop=self.center_crop)
        return (x * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, text = self.rows[i]
        return {"image": self.load_image(i), "caption": text, "file_name": name}

    def __repr__(self) -> str:
        return (
            f"CaptionFolderDataset({str(self.folder)!r}, {len(self)} samples, size={self.size}, "
            f"channels={self.channels})"
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")
