"""TransUNet: the reference parameter count, any input size, the R50 stem's strides, weight
standardisation, position-embedding interpolation, training and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import unetkit
from unetkit.errors import ConfigError, InputSizeError
from unetkit.models.transunet import ResNetV2Stem

TINY = dict(
    img_size=32,
    stem_width=16,
    stem_blocks=(1, 1, 1),
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    mlp_dim=32,
    head_channels=16,
    decoder_channels=(16, 8, 8, 4),
)


def _official_r50_vit_b16_count(classes: int) -> int:
    """Parameters of the official layout (Beckschen/TransUNet networks/vit_seg_modeling*.py,
    get_r50_b16_config, 224×224, 3 input channels), counted by hand."""

    def bottleneck(cin: int, cout: int, mid: int) -> int:
        n = cin * mid + 9 * mid * mid + mid * cout + 2 * (2 * mid + cout)  # convs + GroupNorms
        return n + (cin * cout + 2 * cout if cin != cout else 0)  # projection + its GroupNorm

    resnet = 3 * 64 * 49 + 2 * 64  # root 7×7 conv + GroupNorm
    for blocks, cin, cout, mid in [(3, 64, 256, 64), (4, 256, 512, 128), (9, 512, 1024, 256)]:
        resnet += bottleneck(cin, cout, mid) + (blocks - 1) * bottleneck(cout, cout, mid)
    h, m = 768, 3072
    layer = 4 * (h * h + h) + (h * m + m) + (m * h + h) + 2 * 2 * h  # q,k,v,out; MLP; 2 LN
    vit = (1024 * h + h) + 14 * 14 * h + 12 * layer + 2 * h  # 1×1 patch conv, pos, encoder LN

    def cbr(cin: int, cout: int) -> int:  # 3×3 conv (no bias) + BatchNorm
        return 9 * cin * cout + 2 * cout

    decoder = cbr(768, 512)
    for cin, skip, cout in [(512, 512, 256), (256, 256, 128), (128, 64, 64), (64, 0, 16)]:
        decoder += cbr(cin + skip, cout) + cbr(cout, cout)
    return resnet + vit + decoder + 9 * 16 * classes + classes


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    with torch.device("meta"):
        return unetkit.create_model("transunet", preset="r50-vit-b16")


def test_reference_parameter_count(reference: nn.Module) -> None:
    n = sum(p.numel() for p in reference.parameters())
    # Exact: the official code's layout with its default n_classes=2 (vit_seg_configs.py),
    # 105,276,066, the figure DA-TransUNet (Sun et al. 2024, Table 3) reports for TransUNet.
    assert n == _official_r50_vit_b16_count(2) == 105_276_066
    # "105.28M" / "105.3M" is the number the literature quotes for R50-ViT-B_16 (2% tolerance)
    assert abs(n - 105.28e6) / 105.28e6 < 0.02
    with torch.device("meta"):
        synapse = unetkit.create_model("transunet", preset="synapse")
    assert sum(p.numel() for p in synapse.parameters()) == _official_r50_vit_b16_count(9)


def test_reference_layout(reference: nn.Module) -> None:
    assert reference.encoder.out_channels == (64, 256, 512, 1024)
    assert [len(reference.encoder.get_submodule(f"layer{i}")) for i in (1, 2, 3)] == [3, 4, 9]
    assert reference.vit.pos.weight.shape == (1, 14 * 14, 768)
    assert len(reference.vit.blocks) == 12
    assert [s.block.conv2.conv.out_channels for s in reference.decoder.stages] == [256, 128, 64, 16]


def test_stem_strides_and_channels() -> None:
    stem = ResNetV2Stem(2, 3, width=8, blocks=(1, 1, 1))
    feats = stem(torch.zeros(1, 3, 64, 48))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (8, 32, 24),
        (32, 16, 12),
        (64, 8, 6),
        (128, 4, 3),
    ]
    assert stem.strides == (2, 4, 8, 16)


@pytest.mark.parametrize("size", [(19, 23), (50, 37), (16, 16), (1, 5)])
def test_any_input_size(size: tuple) -> None:
    net = unetkit.create_model("transunet", in_channels=1, out_channels=3, **TINY).eval()
    with torch.inference_mode():
        assert net(torch.randn(2, 1, *size)).shape == (2, 3, *size)


def test_position_embeddings_follow_the_token_grid() -> None:
    net = unetkit.create_model("transunet", **TINY).eval()  # configured grid 32 // 16 = 2
    grids = []
    net.vit.pos.register_forward_hook(lambda m, i, o: grids.append(tuple(o.shape[1:-1])))
    with torch.inference_mode():
        net(torch.randn(1, 3, 50, 37))  # padded to 64×48 -> 4×3 tokens (interpolated)
        net(torch.randn(1, 3, 32, 32))  # the configured grid: the embedding as learned
    assert grids == [(4, 3), (2, 2)]


def test_weight_standardisation_makes_stem_scale_invariant() -> None:
    net = unetkit.create_model("transunet", **TINY).eval()
    conv = net.encoder.conv1
    w = conv.weight  # the standardised weight the conv uses
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        before = net(x)
        conv.parametrizations.weight.original.mul_(7.0)  # raw scale has no effect
        torch.testing.assert_close(net(x), before, atol=1e-4, rtol=1e-4)
    plain = unetkit.create_model("transunet", weight_std=False, **TINY)
    assert not hasattr(plain.encoder.conv1, "parametrizations")


def test_skips_used() -> None:
    full = unetkit.create_model("transunet", **TINY)
    none = unetkit.create_model("transunet", n_skip=0, **TINY)
    assert [s.block.conv1.conv.in_channels for s in full.decoder.stages] == [
        16 + 128,
        16 + 64,
        8 + 16,
        8,
    ]
    assert [s.block.conv1.conv.in_channels for s in none.decoder.stages] == [16, 16, 8, 8]
    assert none(torch.randn(2, 3, 19, 23)).shape == (2, 2, 19, 23)


def test_gradient_steps_reduce_loss() -> None:
    net = unetkit.create_model("transunet", dropout=0.0, **TINY)
    x = torch.randn(2, 3, 16, 16)
    target = (x[:, :1] > 0).long().squeeze(1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert net.encoder.conv1.parametrizations.weight.original.grad is not None


def test_save_load_round_trip(tmp_path: Path) -> None:
    net = unetkit.create_model("transunet", in_channels=1, **TINY).eval()
    path = unetkit.save(net, tmp_path / "transunet.safetensors")
    loaded = unetkit.load(path)
    assert loaded.config == net.config
    x = torch.randn(1, 1, 50, 37)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_bad_config_and_input_errors() -> None:
    with pytest.raises(ConfigError, match=r"stem_blocks=\(3, 4\)"):
        unetkit.create_model("transunet", stem_blocks=(3, 4))
    with pytest.raises(ConfigError, match="num_heads=5 must divide hidden_size=768"):
        unetkit.create_model("transunet", num_heads=5)
    with pytest.raises(ConfigError, match="n_skip=4"):
        unetkit.create_model("transunet", n_skip=4)
    net = unetkit.create_model("transunet", **TINY)
    with pytest.raises(InputSizeError, match="expects 3 input channel"):
        net(torch.zeros(1, 1, 32, 32))
    with pytest.raises(InputSizeError, match="N×C×H×W"):
        net(torch.zeros(1, 3, 32))


@pytest.mark.slow
def test_reference_forward_224() -> None:
    net = unetkit.create_model("transunet", preset="synapse").eval()
    with torch.inference_mode():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 9, 224, 224)
