"""Readable pictures: input | prediction | truth, colour bars, volume projections."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps

import unetkit
from unetkit.data.io import read_image, write_image
from unetkit.workflows.pictures import (
    attention_preview,
    comparison,
    map_with_colorbar,
    regression_picture,
)
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
    preview = read_image(tmp_path / "out" / "v_labels_preview.png")  # the labels' projection
    assert preview.shape == (16, 20, 3)
    instances = read_image(tmp_path / "out" / "v_instances.tif")
    assert ((preview.max(axis=-1) > 0) == (instances.max(axis=0) > 0)).all()
    assert read_image(tmp_path / "out" / "v_instances.tif").shape == (8, 16, 20)


def _has_colour(pixels: np.ndarray, rgb_float, tol: int = 3) -> bool:
    rgb = (np.array(rgb_float[:3]) * 255).round().astype(int)
    return bool((np.abs(pixels.reshape(-1, 3).astype(int) - rgb).max(axis=1) <= tol).any())


def _has_colour_bar(pixels: np.ndarray, cmap: str) -> bool:
    """The region shows the colormap's full colours from end to end (a colour bar)."""
    return all(_has_colour(pixels, colormaps[cmap](v), tol=12) for v in np.linspace(0.05, 0.95, 7))


def test_map_over_a_background_keeps_a_full_colour_bar():
    h, w = 50, 70
    values = np.tile(np.linspace(0, 1, w), (h, 1))
    grey = np.full((h, w, 3), 128, np.uint8)
    pic = map_with_colorbar(values, cmap="jet", vmin=0, vmax=1, background=grey, opacity=0.5)
    assert pic.shape[1] == w + 90 and pic.shape[0] >= h
    jet = colormaps["jet"]
    bar, shown = pic[:, w:], pic[-h:, :w]
    assert _has_colour_bar(bar, "jet")  # the scale, unblended
    assert not _has_colour_bar(shown, "jet")  # the map itself is blended with grey
    blend = 0.5 * np.array(jet(1.0)[:3]) + 0.5 * 128 / 255
    assert _has_colour(shown, (*blend, 1.0), tol=4)


def test_attention_preview_has_a_zero_to_one_colour_bar():
    image = np.random.default_rng(0).random((1, 40, 60))
    alpha = np.full((40, 60), 0.5)
    pic = attention_preview(image, alpha)
    assert pic.shape[1] == 60 + 90 and pic.dtype == np.uint8
    assert _has_colour_bar(pic[:, 60:], "jet")
    assert not _has_colour_bar(pic[:, :60], "jet")


def test_predict_writes_attention_previews_with_colour_bars(tmp_path):
    torch.manual_seed(0)
    net = unetkit.create_model("attention_unet", channels=(4, 8, 16))
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore"}
    ck = unetkit.save(net, tmp_path / "a.safetensors", extra=extra)
    image = (np.random.default_rng(1).random((24, 40)) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "cells.png", image)
    predict_files(ck, [tmp_path / "in"], tmp_path / "out", attention_maps=True)
    heat = read_image(tmp_path / "out" / "cells_attention_level1.png")
    # the previews do not match the heat maps' pattern (scripts glob *_attention_level*.png)
    assert [p.name for p in (tmp_path / "out").glob("*_attention_level*.png")] == [
        "cells_attention_level1.png"
    ]
    assert heat.shape == (24, 40, 3)  # pixel for pixel, as before
    preview = read_image(tmp_path / "out" / "cells_attention_preview_level1.png")
    assert preview.shape[1] == 40 + 90 and preview.shape[0] >= 24
    assert _has_colour_bar(preview[:, 40:], "jet")


def test_evaluate_writes_input_prediction_truth_pictures(tmp_path, capsys):
    from unetkit.cli.main import main

    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(4, 8))
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore"}
    ck = unetkit.save(net, tmp_path / "m.safetensors", extra=extra)
    mask = np.full((30, 44), 255, np.uint8)
    mask[14, :] = 0  # a membrane: two cells, the truth's connected components
    image = np.where(mask > 0, 180, 40).astype(np.uint8)
    for sub, arr in (("images", image), ("masks", mask)):
        (tmp_path / "data" / sub).mkdir(parents=True)
        write_image(tmp_path / "data" / sub / "em.png", arr)
    args = ["evaluate", str(ck), "--data", str(tmp_path / "data")]
    assert main([*args, "--pictures", str(tmp_path / "pics")]) == 0
    pic = read_image(tmp_path / "pics" / "em_comparison.png")
    assert pic.shape == (30, 3 * 44 + 2 * 4, 3)
    truth = pic[:, 2 * 48 :]
    yellow = np.array([255, 229, 0])
    # the truth's two cells are outlined on both sides of the membrane row
    for row in (13, 15):
        assert (np.abs(truth[row].astype(int) - yellow).max(axis=1) <= 1).all()
    assert main([*args, "--pictures", str(ck)]) == 2  # a file, not a folder: one line
    assert "--pictures" in capsys.readouterr().err


def test_depth_picture_has_colour_bars_on_one_scale():
    rng = np.random.default_rng(0)
    image = rng.random((1, 32, 40))
    target = np.tile(np.linspace(1.0, 5.0, 40), (1, 32, 1))
    pic = regression_picture(image, target[:, :, ::-1].copy(), target, output="depth")
    assert pic.dtype == np.uint8 and pic.shape[1] == 40 + 2 * (40 + 90) + 2 * 4
    first_map = pic[:, 44 : 44 + 130]
    second_map = pic[:, 44 + 130 + 4 :]
    for panel in (first_map, second_map):
        assert _has_colour_bar(panel[:, 40:], "magma_r")
    restored = regression_picture(image, image, image, output="linear")
    assert restored.shape == (32, 3 * 40 + 2 * 4, 3)
