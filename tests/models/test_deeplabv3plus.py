"""DeepLabV3+ and its dilated ResNet encoder: strides, dilation, shapes, counts, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import unetkit
from unetkit.errors import ConfigError
from unetkit.models.deeplabv3plus import TINY, DeepLabV3Plus
from unetkit.models.resnet import ResNetEncoder
from unetkit.nn.aspp import ASPP
from unetkit.nn.conv import ConvNormAct


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _tiny(**overrides: object) -> DeepLabV3Plus:
    return unetkit.create_model("deeplabv3plus", **{**TINY, "in_channels": 2, **overrides})


# --- parameter counts against published numbers (built on the meta device) ---------------
# torchvision ResNet weights, meta["num_params"] (torchvision/models/resnet.py), minus the
# ImageNet classifier fc (512·1000+1000 for ResNet-18/34, 2048·1000+1000 for 50/101/152).
TORCHVISION_RESNET = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "resnet101": 44_549_160 - 2_049_000,
    "resnet152": 60_192_808 - 2_049_000,
}
# torchvision DeepLabV3_ResNet{50,101}_Weights.COCO_WITH_VOC_LABELS_V1 meta["num_params"]
# (torchvision/models/segmentation/deeplabv3.py): 21 classes, ASPP rates 12/24/36 at OS8,
# a 3×3 256-conv head + classifier, and the auxiliary FCN head on layer3.
TORCHVISION_DEEPLABV3 = {"resnet50": 42_004_074, "resnet101": 60_996_202}
# segmentation_models_pytorch DeepLabV3Plus(encoder_name="resnet50", classes=21), whose ASPP
# and decoder use atrous separable convs: 26,682,725 parameters, as counted in
# https://github.com/qubvel-org/segmentation_models.pytorch/issues/819 . ResNet-101 adds
# torchvision's 44,549,160 - 25,557,032 backbone parameters to it.
SMP_DEEPLABV3PLUS_SEPARABLE = {
    "resnet50": 26_682_725,
    "resnet101": 26_682_725 + 44_549_160 - 25_557_032,
}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_RESNET))
def test_resnet_encoder_matches_torchvision_count(arch: str) -> None:
    with torch.device("meta"):
        enc = ResNetEncoder(2, 3, arch=arch, output_stride=16)
    assert _params(enc) == TORCHVISION_RESNET[arch]


@pytest.mark.parametrize("arch", sorted(TORCHVISION_DEEPLABV3))
def test_encoder_and_aspp_match_torchvision_deeplabv3(arch: str) -> None:
    # DeepLabV3 = our encoder + our ASPP + a 3×3 head + classifier (+ aux FCN head): the
    # encoder and ASPP counts must reproduce torchvision's published total exactly
    with torch.device("meta"):
        enc = ResNetEncoder(2, 3, arch=arch, output_stride=8)
        aspp = ASPP(2, 2048, 256, rates=(12, 24, 36))
        head = ConvNormAct(2, 256, 256, 3, norm="batch")
        aux = ConvNormAct(2, 1024, 256, 3, norm="batch")
    classifier = 256 * 21 + 21
    total = _params(enc) + _params(aspp) + _params(head) + _params(aux) + 2 * classifier
    assert total == TORCHVISION_DEEPLABV3[arch]


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_reference_deeplabv3plus_count(arch: str) -> None:
    # DeepLabV3+ (21 classes, OS16, plain convs) = torchvision's DeepLabV3 (published count)
    # minus its aux head and 3×3 head conv, plus the V3+ decoder (paper §3.1 and Table 2:
    # 1×1 conv to 48 channels, two 3×3 256-channel convs; all with BN, no conv bias).
    with torch.device("meta"):
        net = unetkit.create_model("deeplabv3plus", backbone=arch, out_channels=21)
    aux_head = 1024 * 256 * 9 + 2 * 256 + 256 * 21 + 21
    v3_head = 256 * 256 * 9 + 2 * 256
    decoder = 256 * 48 + 2 * 48 + (256 + 48) * 256 * 9 + 2 * 256 + 256 * 256 * 9 + 2 * 256
    expected = TORCHVISION_DEEPLABV3[arch] - aux_head - v3_head + decoder
    assert _params(net) == expected
    assert _params(net) == {"resnet50": 40_352_181, "resnet101": 59_344_309}[arch]


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_separable_deeplabv3plus_count_matches_smp(arch: str) -> None:
    # ours adds BN after each depthwise conv (official TF implementation): +0.05%
    with torch.device("meta"):
        net = unetkit.create_model("deeplabv3plus", preset="separable", backbone=arch)
    published = SMP_DEEPLABV3PLUS_SEPARABLE[arch]
    assert abs(_params(net) - published) / published < 0.02


# --- output stride and dilation -------------------------------------------------------
@pytest.mark.parametrize(("os", "expected"), [(8, (2, 4, 8, 8, 8)), (16, (2, 4, 8, 16, 16))])
def test_encoder_strides_and_feature_sizes(os: int, expected: tuple[int, ...]) -> None:
    enc = ResNetEncoder(2, 1, arch="resnet18", widths=(4, 4, 8, 8), output_stride=os).eval()
    feats = enc(torch.zeros(1, 1, 64, 96))
    assert enc.strides == expected
    assert [tuple(f.shape[2:]) for f in feats] == [(64 // s, 96 // s) for s in expected]
    assert [f.shape[1] for f in feats] == list(enc.out_channels)


def test_os8_dilates_layer3_and_layer4() -> None:
    enc = ResNetEncoder(2, 1, arch="resnet50", widths=(4, 4, 4, 4), output_stride=8)
    dil = [[b.conv2.dilation[0] for b in layer] for layer in enc.layers]
    strides = [[b.conv2.stride[0] for b in layer] for layer in enc.layers]
    # first block of a dilated layer keeps the previous rate (it replaces a strided conv)
    assert dil == [[1, 1, 1], [1, 1, 1, 1], [1, 2, 2, 2, 2, 2], [2, 4, 4]]
    assert strides == [[1, 1, 1], [2, 1, 1, 1], [1] * 6, [1, 1, 1]]
    grid = ResNetEncoder(2, 1, arch="resnet50", widths=(4,) * 4, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in grid.layer4] == [1, 2, 4]  # OS32: grid only


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_dilated_encoder_equals_strided_encoder_subsampled(dims: int) -> None:
    # replacing a stride by dilation (Chen et al. 2017 §3.1) must give the strided network's
    # features at every other position, exactly (eval mode, same weights)
    torch.manual_seed(0)
    opts = dict(arch="resnet34", widths=(2, 3, 4, 5))
    strided = ResNetEncoder(dims, 2, output_stride=32, **opts).double().eval()
    for p in strided.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(1, 2, *([64] * dims), dtype=torch.float64)
    with torch.no_grad():
        ref = strided(x)
        for os, step in ((16, 2), (8, 4)):
            dense = ResNetEncoder(dims, 2, output_stride=os, **opts).double().eval()
            dense.load_state_dict(strided.state_dict())
            feats = dense(x)
            every = (slice(None), slice(None), *([slice(None, None, step)] * dims))
            torch.testing.assert_close(feats[-1][every], ref[-1])
            torch.testing.assert_close(feats[2], ref[2])  # layer2 untouched


@pytest.mark.parametrize(("os", "rates"), [(8, (12, 24, 36)), (16, (6, 12, 18)), (32, (3, 6, 9))])
def test_model_aspp_rates_follow_output_stride(os: int, rates: tuple[int, ...]) -> None:
    net = _tiny(output_stride=os)
    assert net.aspp.rates == rates
    assert [b.conv.dilation[0] for b in net.aspp.branches[1:4]] == list(rates)
    assert len(net.aspp.branches) == 5


@pytest.mark.parametrize("os", [8, 16])
def test_deepest_features_at_one_over_output_stride(os: int) -> None:
    net = _tiny(output_stride=os).eval()
    seen = {}
    net.aspp.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(i[0].shape[2:])))
    net(torch.zeros(1, 2, 64, 48))
    assert seen["shape"] == (64 // os, 48 // os)


# --- shapes, training, checkpoints --------------------------------------------------------
@pytest.mark.parametrize("os", [8, 16])
@pytest.mark.parametrize("size", [(19, 23), (1, 1), (33, 17), (9, 11, 7), (5, 3, 13)])
def test_odd_sizes(os: int, size: tuple[int, ...]) -> None:
    net = _tiny(dims=len(size), output_stride=os, out_channels=3).eval()
    assert net(torch.randn(1, 2, *size)).shape == (1, 3, *size)


def test_separable_and_group_norm_variant() -> None:
    net = _tiny(separable=True, norm="group", out_channels=4, multi_grid=(1, 2))
    y = net(torch.randn(1, 2, 21, 30))  # group norm: batch 1 trains fine
    assert y.shape == (1, 4, 21, 30)
    assert net.decoder[0].depthwise.groups == TINY["aspp_channels"] + TINY["low_level_channels"]


def test_gradient_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    net = _tiny(out_channels=3)
    x = torch.randn(2, 2, 24, 20)
    target = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_save_load_round_trip(tmp_path: Path) -> None:
    net = _tiny(output_stride=8, separable=True, out_channels=2).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.5)
    path = unetkit.save(net, tmp_path / "deeplab.safetensors")
    loaded = unetkit.load(path)
    assert isinstance(loaded, DeepLabV3Plus) and loaded.config == net.config
    x = torch.randn(2, 2, 17, 26)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_torchvision_compatible_key_names() -> None:
    keys = set(ResNetEncoder(2, 3, arch="resnet50", widths=(4,) * 4).state_dict())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
              "layer3.5.conv3.weight", "layer4.2.bn3.bias"):  # fmt: skip
        assert k in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'resnet50'"):
        _tiny(backbone="resnet5")
    with pytest.raises(ConfigError, match="output_stride=4"):
        _tiny(output_stride=4)
    with pytest.raises(ConfigError, match="multi_grid"):
        _tiny(multi_grid=(1, 2, 4))  # resnet18's layer4 has 2 blocks
    with pytest.raises(ConfigError, match="widths"):
        _tiny(widths=(4, 8, 8))
    with pytest.raises(ConfigError, match="dims=1"):
        _tiny(dims=1)
