"""Attention heat-map PNGs: one per gate, colormap blended over the image, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unetkit
from unetkit.errors import ConfigError, InputSizeError
from unetkit.inference.attention_maps import save_attention_heatmaps


@pytest.fixture
def net() -> torch.nn.Module:
    return unetkit.create_model("attention_unet", channels=(4, 8, 16, 32), in_channels=3)


def test_writes_one_rgb_png_per_gate(net: torch.nn.Module, tmp_path: Path) -> None:
    paths = save_attention_heatmaps(net, torch.randn(3, 19, 23), tmp_path / "sub" / "img")
    assert [p.name for p in paths] == ["img_attention_level1.png", "img_attention_level2.png"]
    for p in paths:
        arr = np.asarray(Image.open(p))
        assert arr.shape == (19, 23, 3) and arr.dtype == np.uint8
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == [p.name for p in paths]
    assert net.training  # the model's mode is restored


def test_blend_of_constant_map_over_grey_image(tmp_path: Path) -> None:
    # psi = 0, bias 0 -> alpha = 0.5 everywhere; a left/right black/white image.
    net = unetkit.create_model("attention_unet", channels=(4, 8, 16)).eval()
    with torch.no_grad():
        for gate in net.gates[0].gates:
            gate.psi.weight.zero_()
            gate.psi.bias.zero_()
    image = torch.zeros(1, 8, 10)
    image[:, :, 5:] = 3.0  # normalised units: displayed min-max scaled to 0..1
    (path,) = save_attention_heatmaps(net, image, tmp_path / "x", colormap="gray", opacity=0.25)
    arr = np.asarray(Image.open(path)).astype(float)
    # "gray" maps 0.5 to mid grey (its 256-entry table: 128/255); blend 0.75·image + 0.25·that
    heat = 128 / 255
    np.testing.assert_allclose(arr[:, :5], np.round(255 * 0.25 * heat), atol=1)
    np.testing.assert_allclose(arr[:, 5:], np.round(255 * (0.75 + 0.25 * heat)), atol=1)


def test_errors(net: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(InputSizeError, match="C=3"):
        save_attention_heatmaps(net, torch.zeros(1, 8, 8), tmp_path / "a")
    with pytest.raises(ConfigError, match="colormap='nope'"):
        save_attention_heatmaps(net, torch.zeros(3, 8, 8), tmp_path / "a", colormap="nope")
    with pytest.raises(ConfigError, match="needs an AttentionUNet"):
        save_attention_heatmaps(
            unetkit.create_model("unet", channels=(4, 8)), torch.zeros(1, 8, 8), tmp_path / "a"
        )
    net3d = unetkit.create_model("attention_unet", dims=3, channels=(2, 4, 8))
    with pytest.raises(ConfigError, match="dims=3"):
        save_attention_heatmaps(net3d, torch.zeros(1, 4, 4, 4), tmp_path / "a")
    assert not any(tmp_path.iterdir())
