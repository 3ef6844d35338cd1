"""evaluate on binary (0/255) masks: AP and Rand error from connected components of the truth,
checked against an independent brute-force pair count and skimage's adapted Rand error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import adapted_rand_error

import unetkit
from unetkit.cli.main import main
from unetkit.data.io import write_image
from unetkit.data.masks import decode_mask
from unetkit.errors import DataError
from unetkit.segmentation.instances import rand_error
from unetkit.workflows.segment import evaluate_dataset, load_for_inference


def _membranes(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An ISBI-like pair: image and a 0/255 mask whose cells (255) lie between membranes (0)."""
    rng = np.random.default_rng(seed)
    mask = np.full((36, 40), 255, np.uint8)
    for r in (rng.integers(6, 14), rng.integers(20, 30)):
        mask[r, :] = 0
    for c in (rng.integers(6, 16), rng.integers(22, 34)):
        mask[:, c] = 0
    image = np.where(mask > 0, 180, 40).astype(np.uint8) + rng.integers(0, 30, mask.shape).astype(
        np.uint8
    )
    return image, mask


def _brute_force_rand_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """1 - F over all pairs of distinct truth-foreground pixels, counted pair by pair."""
    fg = truth.ravel() != 0
    t, p = truth.ravel()[fg], pred.ravel()[fg]
    same_t = t[:, None] == t[None, :]
    same_p = (p[:, None] == p[None, :]) & (p[:, None] != 0)
    upper = np.triu(np.ones_like(same_t), k=1)
    tp = float((same_t & same_p & upper).sum())
    pairs_t, pairs_p = float((same_t & upper).sum()), float((same_p & upper).sum())
    return 1.0 - 2.0 * tp / (pairs_t + pairs_p)


@pytest.fixture(scope="module")
def model_and_meta(tmp_path_factory):
    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(4, 8))
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore"}
    path = unetkit.save(net, tmp_path_factory.mktemp("ck") / "m.safetensors", extra=extra)
    return path, *load_for_inference(path)


def test_binary_masks_get_rand_error_and_ap_from_components(model_and_meta):
    _, model, meta = model_and_meta
    samples, seen = [], []
    for seed in range(3):
        image, mask = _membranes(seed)
        samples.append({"image": image[None] / 255.0, "mask": decode_mask(mask, 2), "name": seed})
    rows, means = evaluate_dataset(
        model, meta, iter(samples), on_prediction=lambda s, p: seen.append(p)
    )
    assert {"rand_error", "ap_50", "n_instances_true"} <= set(means)
    for row, sample, pred in zip(rows, samples, seen, strict=True):
        assert row["truth_objects"] == "components"
        cells = ndimage.label(sample["mask"])[0]
        assert row["n_instances_true"] == cells.max() == 9  # 2 + 2 membranes: 3×3 cells
        assert row["rand_error"] == pytest.approx(_brute_force_rand_error(pred.instances, cells))


def test_rand_error_agrees_with_skimage_adapted_rand_error():
    """skimage counts p_ij² (self-pairs included): it differs from the n-choose-2 form by
    O(1/n), so the two agree closely on a realistic segmentation."""
    rng = np.random.default_rng(1)
    truth = ndimage.label(_membranes(5)[1])[0]
    pred = truth.copy()
    pred[truth == 2] = 1  # a merge
    pred[(truth == 5) & (rng.random(truth.shape) < 0.5)] = 77  # a split
    ours = rand_error(pred, truth)
    theirs = adapted_rand_error(truth, pred, ignore_labels=(0,))[0]
    assert ours == pytest.approx(_brute_force_rand_error(pred, truth))
    assert ours == pytest.approx(theirs, abs=0.01)
    assert 0.05 < ours < 0.5


def test_binary_mask_as_instances_is_refused():
    _, mask = _membranes(0)
    with pytest.raises(DataError, match=r"m.png: mask is binary .* several separate regions"):
        decode_mask(mask, 2, mode="instances", path="m.png")


def test_evaluate_cli_says_how_it_read_binary_masks(tmp_path, model_and_meta, capsys):
    path, _, _ = model_and_meta
    for i in range(2):
        image, mask = _membranes(i)
        write_image(tmp_path / "data" / "images" / f"s{i}.png", image)
        write_image(tmp_path / "data" / "masks" / f"s{i}.png", mask)
    assert main(["evaluate", str(path), "--data", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "2 binary/class mask(s) whose objects are the connected components" in out
    assert "9.0 objects/image" in out
    for key in ("rand_error", "ap_50", "pixel_error", "dice_mean"):
        assert key in out
    assert "foreground-restricted Rand error" in out


def test_evaluate_names_the_image_with_the_wrong_channel_count(model_and_meta):
    _, model, meta = model_and_meta
    image, mask = _membranes(0)
    two = {"image": np.stack([image, image]) / 255.0, "mask": decode_mask(mask, 2), "name": "x7"}
    with pytest.raises(DataError, match=r"x7: image has 2 channel\(s\), the model takes 1"):
        evaluate_dataset(model, meta, iter([two]))
    from unetkit.workflows.segment import InferenceOptions

    rows, _ = evaluate_dataset(model, meta, iter([two]), InferenceOptions(channels=(1,)))
    assert rows[0]["truth_objects"] == "components"


def test_empty_mask_among_instance_masks_means_zero_cells(model_and_meta):
    _, model, meta = model_and_meta
    image, mask = _membranes(1)
    cells = ndimage.label(mask)[0]
    samples = [
        {"image": image[None] / 255.0, "mask": (cells > 0).astype(np.int64), "instances": cells},
        {"image": image[None] / 255.0, "mask": np.zeros_like(cells, np.int64), "name": "empty"},
    ]
    rows, means = evaluate_dataset(model, meta, iter(samples))
    assert [r["truth_objects"] for r in rows] == ["labels", "components"]
    assert rows[1]["n_instances_true"] == 0 and "ap_50" in means
