"""benchmarks/isbi2012.py runs end to end (2 optimiser steps) on a small stand-in stack
and reports the challenge's errors beside the argmax ones (the real run is by hand)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import find_boundaries

from unetkit.segmentation.isbi import ISBI_THRESHOLDS


def _membrane_stack(root: Path, size: int = 64) -> Path:
    """30 slices in the layout of the ISBI data: Voronoi cells, 1-px membranes (mask 0),
    cell interior 255, a noisy darker membrane in the image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(30):
        seeds = rng.integers(0, size, (12, 2))
        cells = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
        membrane = find_boundaries(cells, mode="inner")
        image = np.where(membrane, 60, 180) + rng.normal(0, 20, membrane.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            root / "images" / f"slice{i:02d}.png"
        )
        Image.fromarray(np.where(membrane, 0, 255).astype(np.uint8)).save(
            root / "masks" / f"slice{i:02d}.png"
        )
    return root


def test_two_steps_report_challenge_and_argmax_errors(benchmark_script, tmp_path, capsys):
    isbi2012 = benchmark_script("isbi2012")
    data = _membrane_stack(tmp_path / "isbi")
    out = tmp_path / "runs"
    isbi2012.main(["--data", str(data), "--only", "modern", "--steps", "2", "--out", str(out)])
    assert (out / "modern" / "checkpoints" / "best.safetensors").is_file()
    lines = capsys.readouterr().out.splitlines()
    head = next(ln for ln in lines if ln.startswith("| configuration"))
    assert "challenge pixel error" in head and "argmax pixel error" in head
    row = next(ln for ln in lines if ln.startswith("| modern |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2"  # exactly the steps asked for
    challenge = [re.fullmatch(r"([\d.]+) \(t=([\d.]+)\)", c) for c in cells[4:6]]
    assert all(challenge), row
    for m in challenge:
        assert 0.0 <= float(m[1]) <= 1.0
        assert float(m[2]) in ISBI_THRESHOLDS
    for value in cells[6:9]:  # argmax pixel error, argmax Rand error, Dice
        assert 0.0 <= float(value) <= 1.0

    # --score-only rescoring of the same run: the same numbers, nothing written into it
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    isbi2012.main(["--data", str(data), "--score-only", "--out", str(out)])
    rescored = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| modern |")]
    assert [c.strip() for c in rescored[0].strip("|").split("|")][4:] == cells[4:]
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_missing_slices_are_one_line(benchmark_script, tmp_path):
    isbi2012 = benchmark_script("isbi2012")
    with pytest.raises(SystemExit, match="60 of 60 files missing"):
        isbi2012.main(["--data", str(tmp_path), "--steps", "2", "--out", str(tmp_path / "o")])
    data = _membrane_stack(tmp_path / "isbi", size=16)
    with pytest.raises(SystemExit, match="holds no paper/ or modern/ run"):
        isbi2012.main(["--data", str(data), "--score-only", "--out", str(tmp_path / "o")])
    (tmp_path / "o" / "modern").mkdir(parents=True)
    with pytest.raises(SystemExit, match="best.safetensors does not exist"):
        isbi2012.main(["--data", str(data), "--score-only", "--out", str(tmp_path / "o")])
