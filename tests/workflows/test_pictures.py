"""Readable pictures: input | prediction | truth, colour bars, volume projections."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps

import unetkit
from unetkit.data.io import read_image
from unetkit.workflows.pictures import comparison, map_with_colorbar
from unetkit.workflows.segment_files import predict_files


def test_comparison_puts_input_prediction_and_truth_side_by_side():
    image = np.random.default_rng(0).random((1, 20, 30)).astype(np.float32)
    pred = np.zeros((20, 30), np.int32)
    pred[5:12, 5:12] = 1
    truth = np.zeros((20, 30), np.int32)
    truth[6:14, 15:25] = 1
    pic = comparison(image, pred, truth)
    assert pic.shape == (20, 3 * 30 + 2 * 4, 3) and pic.dtype == np.uint8
    first, second, third = pic[:, :30], pic[:, 34:64], pic[:, 68:98]
    assert (first[..., 0] == first[..., 1]).all()  # the input in grey
    yellow = np.array([255, 229, 0])
    assert (np.abs(second[5, 8].astype(int) - yellow) <= 1).all()  # prediction outline
    assert (np.abs(third[6, 20].astype(int) - yellow) <= 1).all()  # truth outline
    assert (pic[:, 30:34] == 255).all()  # white gap


def test_comparison_of_a_volume_is_a_max_projection():
    image = np.zeros((1, 6, 10, 12), np.float32)
    labels = np.zeros((6, 10, 12), np.int32)
    labels[4, 2:6, 3:8] = 1  # one object on one slice only
    pic = comparison(image, labels)
    assert pic.shape == (10, 2 * 12 + 4, 3)
    assert (pic[2:6, 16 + 3 : 16 + 8] != pic[0, 16]).any()  # the object shows


def test_map_with_colorbar_shows_the_colour_scale():
    values = np.linspace(0, 10, 64 * 48).reshape(48, 64)
    pic = map_with_colorbar(values, label="depth (m)", cmap="viridis")
    assert pic.ndim == 3 and pic.shape[1] > 64 and pic.dtype == np.uint8
    colours = pic.reshape(-1, 3).astype(int)
    for end in (0.0, 1.0):
        rgb = (np.array(colormaps["viridis"](end)[:3]) * 255).astype(int)
        assert (np.abs(colours - rgb).max(axis=1) <= 3).any()


def test_predict_volume_writes_a_projection_overlay(tmp_path):
    torch.manual_seed(0)
    net = unetkit.create_model("unet", dims=3, channels=(4, 8))
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore"}
    ck = unetkit.save(net, tmp_path / "v.safetensors", extra=extra)
    vol = (np.random.default_rng(0).random((8, 16, 20)) * 255).astype(np.uint8)
    unetkit.data.volumes.write_volume(tmp_path / "in" / "v.tif", vol)
    predict_files(ck, [tmp_path / "in"], tmp_path / "out")
    assert read_image(tmp_path / "out" / "v_overlay.png").shape == (16, 20, 3)
    assert read_image(tmp_path / "out" / "v_instances.tif").shape == (8, 16, 20)
