"""The segmentation recipe's budget, split, refusals and what a run records and says."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from unetkit.data.io import write_image
from unetkit.errors import DataError
from unetkit.training.optim import build_scheduler
from unetkit.workflows import segment_train as R
from unetkit.workflows.segment_data import build_datasets

TINY = dict(model_options={"channels": (4, 8)}, batch_size=2, crop=16)


def _folder(root, n: int, shape=(24, 40), empty: bool = False):
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 255, shape).astype(np.uint8)
        labels = np.zeros(shape, np.uint16)
        if not empty:
            labels[2:10, 3:12], labels[12:20, 20:30], labels[12:20, 30:36] = 1, 2, 3
        write_image(root / "images" / f"im{i:03d}.png", image)
        write_image(root / "masks" / f"im{i:03d}.png", labels)
    return str(root)


def test_an_epoch_has_the_same_steps_for_1_and_for_100_images(tmp_path) -> None:
    steps = []
    for n in (1, 100):
        recipe = R.make_recipe(
            data=_folder(tmp_path / f"d{n}", n, shape=(20, 20)),
            epochs=1,
            steps_per_epoch=3,
            target="semantic",  # no seed calibration: the test is about the budget
            **TINY,
        )
        data = build_datasets(recipe, 16)
        assert len(data.train) == 3 * 2
        result = R.train(recipe, tmp_path / f"run{n}", progress=False)
        steps.append(result.step)
    assert steps == [3, 3]


def test_one_image_trains_without_val_data_and_says_how(tmp_path, caplog) -> None:
    recipe = R.make_recipe(data=_folder(tmp_path / "d", 1), epochs=2, steps_per_epoch=2, **TINY)
    with caplog.at_level(logging.INFO, logger="unetkit"):
        result = R.train(recipe, tmp_path / "run", progress=False)
    text = caplog.text
    assert "1 mask(s): instance labels; 3.0 objects/image" in text
    assert "1 image split spatially: the last 20% of its W axis" in text
    assert "= 4 optimiser steps" in text and "ran 4 optimiser steps" in text
    assert result.step == 4
    config = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert "output" not in config and "target_scale" not in config  # regression-only fields
    assert config["steps_per_epoch"] == 2 and config["target"] == "boundary"


def test_spatial_split_regions_do_not_overlap(tmp_path) -> None:
    recipe = R.make_recipe(data=_folder(tmp_path / "d", 2), **TINY)
    data = build_datasets(recipe, 16)
    base, val = data.train.base, data.val
    for (i, train_region), (j, val_region) in zip(base.items, val.items, strict=True):
        assert i == j
        assert train_region[1].stop == val_region[1].start == 32  # 40 px: last 8 held out
    assert "2 images split spatially" in data.split


def test_whole_images_are_held_out_from_larger_folders(tmp_path) -> None:
    data = build_datasets(R.make_recipe(data=_folder(tmp_path / "d", 10), **TINY), 16)
    train_files = {data.train.base.file_index(i) for i in range(len(data.train.base))}
    val_files = {data.val.file_index(i) for i in range(len(data.val))}
    assert len(train_files) == 8 and len(val_files) == 2 and not train_files & val_files


def test_crop_larger_than_the_images_is_clamped_with_a_warning(tmp_path, caplog) -> None:
    recipe = R.make_recipe(data=_folder(tmp_path / "d", 1), **{**TINY, "crop": 4096})
    with caplog.at_level(logging.WARNING, logger="unetkit"):
        data = build_datasets(recipe, 4096)
    assert data.crop == 24 and "crop 4096 is larger than the smallest training image" in caplog.text
    assert tuple(data.train[0]["image"].shape[1:]) == (24, 24)


def test_all_background_masks_are_refused(tmp_path) -> None:
    recipe = R.make_recipe(data=_folder(tmp_path / "d", 2, empty=True), **TINY)
    with pytest.raises(DataError, match="every mask is background only"):
        build_datasets(recipe, 16)


def test_short_runs_decay_instead_of_ending_at_the_peak() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = build_scheduler(opt, "warmup_cosine", total_steps=8, warmup_steps=8)
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(rates) == pytest.approx(1.0) and rates[-1] < 0.1


def test_older_configs_keep_loading() -> None:
    recipe = R.make_recipe("demo", samples_per_epoch=30, batch_size=4)
    assert recipe.steps_per_epoch == 8  # ceil(30 / 4)
    assert R.make_recipe(samples_per_epoch=30, steps_per_epoch=5).steps_per_epoch == 5
    regression = R.record(R.make_recipe("depth-demo"))
    assert "target" not in regression and regression["output"] == "depth"


def test_early_stopping_stops_after_patience() -> None:
    class Draws:
        epoch = 0

        def set_epoch(self, e: int) -> None:
            self.epoch = e

    draws = Draws()
    stop = R._EpochEnd(draws, "val/fg_dice", "max", patience=2)
    answers = [stop(e, {"val/fg_dice": v}, None) for e, v in enumerate([0.5, 0.6, 0.6, 0.59], 1)]
    assert answers == [False, False, False, True] and draws.epoch == 4


def test_dim_16_bit_images_are_normalised_whole_before_augmentation(tmp_path) -> None:
    # A real 16-bit nuclei image often uses 0..~250 of 0..65535: after dtype scaling its
    # signal is ~0.004, so intensity noise or offsets added before normalisation drown it,
    # and a background-only crop normalised on its own is stretched to look like nuclei.
    shape = (64, 96)
    labels = np.zeros(shape, np.uint16)
    image = np.full(shape, 10, np.uint16)
    for k, (y, x) in enumerate([(10, 10), (10, 40), (40, 20), (40, 60)], start=1):
        labels[y : y + 12, x : x + 12] = k
        image[y : y + 12, x : x + 12] = 235
    write_image(tmp_path / "images" / "a.tif", image)
    write_image(tmp_path / "masks" / "a.tif", labels)
    recipe = R.make_recipe(data=str(tmp_path), epochs=1, steps_per_epoch=4, **TINY)
    data = build_datasets(recipe, 16)
    for i in range(len(data.train)):
        s = data.train[i]
        img, fg = s["image"].numpy()[0], s["mask"].numpy() > 0
        if fg.any() and (~fg).any():  # nuclei stay clearly brighter than background
            assert img[fg].mean() - img[~fg].mean() > 0.5
        if not fg.any():  # a background-only crop is not stretched to full range
            assert np.ptp(img) < 0.5
    held_out = data.val.sample(0, None)["image"].numpy()  # background only, whole-image scale
    assert np.abs(held_out).max() < 0.05


def test_the_training_object_size_is_recorded_and_sets_the_min_object_size(tmp_path) -> None:
    from unetkit.formats.checkpoint import read_metadata
    from unetkit.workflows.segment import min_object_size

    # objects of 72, 80 and 48 pixels: equivalent diameters 9.57, 10.09 and 7.82
    recipe = R.make_recipe(data=_folder(tmp_path / "d", 2), epochs=1, steps_per_epoch=1, **TINY)
    R.train(recipe, tmp_path / "run", progress=False)
    meta = read_metadata(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert meta["object_diameter"] == pytest.approx(2 * np.sqrt(72 / np.pi), abs=0.01)
    assert min_object_size(meta, 2) == 7  # 10 % of the median object's 72 pixels
    assert min_object_size(meta, 2, given=3) == 3
    assert min_object_size({}, 2) == 10  # older checkpoints: the fixed default
    assert min_object_size({"object_diameter": 10.0}, 3) == 52  # a ball: pi d^3 / 6


def test_the_paper_recipe_on_small_images_trains_or_says_why(tmp_path) -> None:
    # 100×100 training images: the output crop shrinks to 100 and 100 + the margin is not an
    # input the valid-padding network accepts, so the largest valid one below is used.
    paper = dict(epochs=1, steps_per_epoch=1, batch_size=1)
    paper["model_options"] = {"channels": (4, 8, 16, 32, 64)}
    small = _folder(tmp_path / "d", 5, shape=(100, 100))
    big = _folder(tmp_path / "big", 1, shape=(200, 200))
    recipe = R.make_recipe("paper", data=small, val_data=big, **paper)
    assert R.train(recipe, tmp_path / "run", progress=False).step == 1
    # validation images too small for the network: one clear error before any step
    with pytest.raises(DataError, match="needs at least 188 pixels per side"):
        R.train(R.make_recipe("paper", data=small, **paper), tmp_path / "run2", progress=False)
