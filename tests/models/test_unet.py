"""The classic U-Net: the paper's exact shape, the modern form, and the size planner."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import unetkit
from unetkit.errors import ConfigError, InputSizeError


@pytest.fixture(scope="module")
def paper() -> nn.Module:
    with torch.device("meta"):
        return unetkit.create_model("unet", preset="paper")


def test_paper_parameter_count(paper: nn.Module) -> None:
    # Ronneberger et al. 2015 with 1 input channel and 2 classes: 31,030,658 parameters
    assert sum(p.numel() for p in paper.parameters()) == 31_030_658


def test_paper_has_23_conv_layers(paper: nn.Module) -> None:
    convs = [m for m in paper.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 23  # "In total the network has 23 convolutional layers."
    kinds = sorted((type(m).__name__, m.kernel_size) for m in convs)
    assert kinds.count(("Conv2d", (3, 3))) == 18
    assert kinds.count(("ConvTranspose2d", (2, 2))) == 4
    assert kinds.count(("Conv2d", (1, 1))) == 1


def test_paper_572_to_388(paper: nn.Module) -> None:
    assert paper.output_size_for((572, 572)) == (388, 388)
    assert paper.input_size_for((388, 388)) == (572, 572)
    assert paper.margin() == (92, 92)
    assert paper.is_valid_padding


@pytest.mark.slow
def test_paper_forward_shape_real() -> None:
    net = unetkit.create_model("unet", preset="paper").eval()
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


def test_valid_size_errors_name_nearest(paper: nn.Module) -> None:
    with pytest.raises(InputSizeError, match=r"nearest valid lengths are 492 and 508"):
        paper.output_size_for((500, 572))
    assert paper.nearest_valid_input((500, 571)) == (508, 572)


def test_valid_planner_matches_real_forward() -> None:
    net = unetkit.create_model("unet", channels=(2, 4, 8), padding="valid", norm="none")
    for n in range(30, 70):
        out = net._output_length(n)
        if out is None or out <= 0:
            with pytest.raises(InputSizeError):
                net(torch.zeros(1, 1, n, n))
        else:
            assert net(torch.zeros(1, 1, n, n)).shape[2:] == (out, out)


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (37, 50), (64, 64), (101, 33)])
def test_same_padding_any_size(size: tuple[int, int]) -> None:
    # eval: batch norm cannot train on a single value per channel (the 1×1 case)
    net = unetkit.create_model("unet", channels=(4, 8, 16, 32)).eval()
    assert net(torch.zeros(1, 1, *size)).shape == (1, 2, *size)


def test_3d_unet_cicek() -> None:
    net = unetkit.create_model("unet", preset="3d", channels=(2, 4, 8))
    assert net(torch.zeros(1, 1, 5, 9, 6)).shape == (1, 2, 5, 9, 6)


def test_wrong_channels_and_rank_are_clear() -> None:
    net = unetkit.create_model("unet", channels=(4, 8), in_channels=3)
    with pytest.raises(InputSizeError, match="expects 3 input channel"):
        net(torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputSizeError, match="N×C×H×W"):
        net(torch.zeros(1, 3, 8))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'channels'"):
        unetkit.create_model("unet", chanels=(4, 8))
    with pytest.raises(ConfigError, match="did you mean 'unet'"):
        unetkit.create_model("unte")
    with pytest.raises(ConfigError, match="unknown preset"):
        unetkit.create_model("unet", preset="papr")
    with pytest.raises(ConfigError, match="dropout"):
        unetkit.create_model("unet", dropout=1.5)


def test_dropout_at_end_of_contracting_path(paper: nn.Module) -> None:
    drops = [n for n, m in paper.named_modules() if isinstance(m, nn.Dropout2d)]
    assert drops == ["encoder.stages.4.block.dropout"]


def test_he_init_matches_paper_std() -> None:
    net = unetkit.create_model("unet", channels=(64, 128), norm="none")
    w = net.encoder.stages[1].block.conv2.conv.weight  # 3x3, 128 in
    expected = (2.0 / (9 * 128)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.02
