"""Swin-Unet: the reference parameter count, the stage resolutions and windows of the official
224×224 setting, any input size, training and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import unetkit
from unetkit.errors import ConfigError, InputSizeError

TINY = dict(embed_dim=8, depths=(2, 1), num_heads=(1, 2), window_size=3, patch_size=2)


def _official_swin_unet_count(classes: int) -> int:
    """Parameters of the official layout (HuCaoFighting/Swin-Unet, networks/
    swin_transformer_unet_skip_expand_decoder_sys.py with configs/swin_tiny_patch4_window7_224_
    lite.yaml: C=96, depths 2,2,2,2, heads 3,6,12,24, window 7, 3 input channels), by hand."""

    def block(c: int, heads: int) -> int:
        attn = (c * 3 * c + 3 * c) + (c * c + c) + 13 * 13 * heads  # qkv, proj, bias table
        return attn + (c * 4 * c + 4 * c) + (4 * c * c + c) + 2 * 2 * c  # MLP, 2 LayerNorms

    widths, heads = [96, 192, 384, 768], [3, 6, 12, 24]
    n = 3 * 96 * 16 + 96 + 2 * 96  # 4×4 patch conv + LayerNorm
    for i in range(4):
        n += 2 * block(widths[i], heads[i])
        if i < 3:  # patch merging: LayerNorm(4C) + Linear(4C -> 2C, no bias)
            n += 2 * 4 * widths[i] + 4 * widths[i] * 2 * widths[i]
    n += 2 * 768  # encoder norm
    for i in (2, 1, 0):  # expand from level i+1 (Linear C -> 2C, LN(C/2)), concat linear, blocks
        up = widths[i + 1]
        n += up * 2 * up + 2 * (up // 2)
        n += 2 * widths[i] * widths[i] + widths[i] + 2 * block(widths[i], heads[i])
    n += 2 * 96  # norm_up
    n += 96 * 16 * 96 + 2 * 96  # final 4× expanding: Linear(C -> 16C) + LN(C)
    return n + 96 * classes  # 1×1 output conv without bias


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    with torch.device("meta"):
        return unetkit.create_model("swin_unet", preset="synapse")


def test_reference_parameter_count(reference: nn.Module) -> None:
    n = sum(p.numel() for p in reference.parameters())
    assert n == _official_swin_unet_count(9) == 27_168_900
    # 27.17M: Swin-Unet (224×224, 9 Synapse classes) as reported in the comparison tables of
    # later papers, e.g. HiFormer (Heidari et al., WACV 2023, Table 1); 2% tolerance
    assert abs(n - 27.17e6) / 27.17e6 < 0.02


def test_official_resolutions_and_windows_at_224() -> None:
    # full-width-free check of the 224×224 geometry: a narrow model with the official stages
    net = unetkit.create_model("swin_unet", embed_dim=6, num_heads=(1, 1, 1, 1), depths=(2,) * 4)
    grids = []
    for stage in net.encoder:
        attn = stage.blocks[1].attn  # the shifted block of each stage
        attn.register_forward_hook(lambda m, i, o: grids.append(m.windows_for(o.shape[1:-1])))
    with torch.inference_mode():
        net.eval()(torch.zeros(1, 3, 224, 224))
    # 56, 28, 14 tokens: 7×7 windows shifted by 3; the 7×7 bottleneck: one unshifted window
    assert grids == [((7, 7), (3, 3))] * 3 + [((7, 7), (0, 0))]
    assert net.multiple == 32


@pytest.mark.parametrize("size", [(19, 23), (50, 37), (3, 2), (64, 64)])
def test_any_input_size(size: tuple) -> None:
    net = unetkit.create_model("swin_unet", in_channels=1, out_channels=3, **TINY).eval()
    with torch.inference_mode():
        assert net(torch.randn(2, 1, *size)).shape == (2, 3, *size)


def test_odd_input_is_padded_and_cropped_back() -> None:
    # a 33×30 image is reflect-padded to 36×32 (multiple of patch·2^(stages-1) = 4) and the
    # logits cropped: the same as running the padded image and cropping by hand
    net = unetkit.create_model("swin_unet", **TINY).eval()
    x = torch.randn(1, 3, 33, 30)
    padded = nn.functional.pad(x, (0, 2, 0, 3), mode="reflect")
    with torch.inference_mode():
        torch.testing.assert_close(net(x), net(padded)[..., :33, :30], rtol=0, atol=0)


def test_gradient_steps_reduce_loss() -> None:
    net = unetkit.create_model("swin_unet", drop_path=0.0, **TINY)
    x = torch.randn(2, 3, 16, 16)
    target = (x[:, :1] > 0).long().squeeze(1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    table = net.encoder[0].blocks[0].attn.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_save_load_round_trip(tmp_path: Path) -> None:
    net = unetkit.create_model("swin_unet", in_channels=1, **TINY).eval()
    path = unetkit.save(net, tmp_path / "swin_unet.safetensors")
    loaded = unetkit.load(path)
    assert loaded.config == net.config
    x = torch.randn(1, 1, 50, 37)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_bad_config_and_input_errors() -> None:
    with pytest.raises(ConfigError, match=r"num_heads\[1\]=5 must divide"):
        unetkit.create_model("swin_unet", num_heads=(3, 5, 12, 24))
    with pytest.raises(ConfigError, match="one entry per stage"):
        unetkit.create_model("swin_unet", depths=(2, 2, 2))
    net = unetkit.create_model("swin_unet", **TINY)
    with pytest.raises(InputSizeError, match="expects 3 input channel"):
        net(torch.zeros(1, 2, 16, 16))


@pytest.mark.slow
def test_reference_forward_224() -> None:
    net = unetkit.create_model("swin_unet", preset="synapse").eval()
    with torch.inference_mode():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 9, 224, 224)
