"""Caption-folder data set: CSV / JSON-lines captions, resizing against Pillow, channel
conversion, and errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unetkit.data.captions import CaptionFolderDataset, read_captions, resize_center_crop
from unetkit.errors import DataError


def _rgb(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _csv(folder: Path, rows: list[tuple[str, str]], name: str = "metadata.csv") -> Path:
    lines = ["file_name,text"] + [f'{f},"{t}"' for f, t in rows]
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def test_csv_captions_and_resize_matches_pillow(tmp_path: Path) -> None:
    a = _rgb(tmp_path / "a.png", 20, 40, 0)
    _rgb(tmp_path / "sub" / "b.png", 16, 16, 1)
    _csv(tmp_path, [("a.png", "a red, wide thing"), ("sub/b.png", "small"), ("a.png", "again")])
    ds = CaptionFolderDataset(tmp_path, size=8)
    assert len(ds) == 3  # one sample per caption row
    s = ds[0]
    assert s["caption"] == "a red, wide thing" and s["file_name"] == "a.png"
    assert s["image"].shape == (3, 8, 8) and s["image"].dtype == torch.float32
    # reference: Pillow resizes the shorter side 20 -> 8 (40 -> 16), then the centre crop
    ref = np.stack(
        [
            np.asarray(
                Image.fromarray(a[..., c].astype(np.float32) / 255, "F").resize(
                    (16, 8), Image.BILINEAR
                )
            )
            for c in range(3)
        ]
    )[:, :, 4:12]
    np.testing.assert_allclose(s["image"].numpy(), ref * 2 - 1, atol=1e-5)
    assert ds[2]["caption"] == "again" and torch.equal(ds[2]["image"], s["image"])
    squeezed = CaptionFolderDataset(tmp_path, size=8, center_crop=False)[0]["image"]
    ref = np.stack(
        [
            np.asarray(
                Image.fromarray(a[..., c].astype(np.float32) / 255, "F").resize(
                    (8, 8), Image.BILINEAR
                )
            )
            for c in range(3)
        ]
    )
    np.testing.assert_allclose(squeezed.numpy(), ref * 2 - 1, atol=1e-5)


def test_jsonl_channels_and_16_bit(tmp_path: Path) -> None:
    rgb = _rgb(tmp_path / "c.png", 12, 12, 2)
    grey16 = np.random.default_rng(3).integers(0, 65536, (12, 12), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    with open(tmp_path / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "c.png", "text": "colour"}) + "\n\n")
        f.write(json.dumps({"file_name": "g.png", "text": "grey"}) + "\n")
    grey = CaptionFolderDataset(tmp_path, size=12, channels=1)
    luma = (rgb.astype(np.float64) / 255) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(grey[0]["image"][0].numpy(), luma * 2 - 1, atol=1e-5)
    np.testing.assert_allclose(grey[1]["image"][0].numpy(), grey16 / 65535 * 2 - 1, atol=1e-5)
    colour = CaptionFolderDataset(tmp_path, tmp_path / "metadata.jsonl", size=12, channels=3)
    g = colour[1]["image"]
    assert g.shape == (3, 12, 12) and torch.equal(g[0], g[1]) and torch.equal(g[0], g[2])
    assert [r[1] for r in read_captions(tmp_path / "metadata.jsonl")] == ["colour", "grey"]


def test_resize_center_crop_keeps_constant_images() -> None:
    x = torch.full((2, 30, 50), 0.25)
    out = resize_center_crop(x, 7)
    assert out.shape == (2, 7, 7) and torch.allclose(out, torch.tensor(0.25))


def test_errors_name_the_file(tmp_path: Path) -> None:
    _rgb(tmp_path / "a.png", 8, 8, 0)
    with pytest.raises(DataError, match=f"{tmp_path}: no captions file"):
        CaptionFolderDataset(tmp_path)
    file = _csv(tmp_path, [("a.png", "x"), ("gone.png", "y")])
    with pytest.raises(DataError, match=r"metadata\.csv: 1 caption row.*gone\.png"):
        CaptionFolderDataset(tmp_path)
    _csv(tmp_path, [("a.png", "x")])
    for i in range(7):
        _rgb(tmp_path / f"z{i}.png", 8, 8, i)
    with pytest.raises(DataError, match=r"7 image\(s\) have no caption.*z0\.png.*and 2 more"):
        CaptionFolderDataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="several captions files"):
        CaptionFolderDataset(tmp_path)
    file.write_text("name,text\na.png,x\n")
    with pytest.raises(DataError, match="no 'file_name' column"):
        read_captions(file)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "a.png", "text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        read_captions(bad)
    with pytest.raises(DataError, match="captions file not found"):
        CaptionFolderDataset(tmp_path, tmp_path / "none.csv")
