from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import unetkit
from unetkit.workflows.calibrate import best_seed_threshold, calibrate_seed_threshold


def _touching_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two touching squares; p(interior) is only 0.6 along their contact, 0.95 elsewhere."""
    truth = np.zeros((20, 30), np.int32)
    truth[5:15, 5:15], truth[5:15, 15:25] = 1, 2
    interior = np.where(truth > 0, 0.95, 0.0)
    interior[5:15, 13:17] = 0.6  # unsure where one cell ends: merges at low thresholds
    probs = np.stack([1 - (truth > 0), interior, (truth > 0) - interior]).astype(np.float32)
    return probs.clip(0, 1), truth


def test_best_threshold_separates_touching_cells() -> None:
    probs, truth = _touching_pair()
    threshold, ap = best_seed_threshold([probs], [truth], thresholds=(0.5, 0.7), min_size=1)
    assert threshold == 0.7 and ap == 1.0


def test_tied_thresholds_choose_the_strictest() -> None:
    probs, truth = _touching_pair()
    threshold, ap = best_seed_threshold([probs], [truth], thresholds=(0.5, 0.7, 0.8), min_size=1)
    assert threshold == 0.8 and ap == 1.0  # 0.7 and 0.8 both separate the pair


def test_calibration_is_stored_in_the_checkpoint(tmp_path: Path) -> None:
    net = unetkit.create_model("unet", channels=(4, 8), out_channels=3)
    path = unetkit.save(net, tmp_path / "b.safetensors", extra={"target": "boundary"})
    sample = {"image": torch.randn(1, 20, 30), "instances": torch.from_numpy(_touching_pair()[1])}
    threshold = calibrate_seed_threshold(path, [sample])
    meta = unetkit.read_metadata(path)
    assert meta["seed_threshold"] == threshold and meta["target"] == "boundary"
    assert calibrate_seed_threshold(path, [{"image": torch.randn(1, 20, 30)}]) is None
