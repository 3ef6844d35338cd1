"""V-Net (Milletari, Navab & Ahmadi, 3DV 2016): architecture, parameter counts, behaviour,
and the paper's Dice loss (squared denominators)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unetkit
from unetkit.errors import ConfigError
from unetkit.models.vnet import ResidualStage, VNet, VNetConfig
from unetkit.segmentation.losses import build_loss, soft_dice_loss

WIDTHS = (16, 32, 64, 128, 256)


def _reference_count(
    left: tuple[int, ...],
    right: tuple[int, ...],
    *,
    prelu_per_channel: bool = True,
    batch_norm: bool = False,
    head_5x5x5: bool = False,
) -> int:
    """Parameters of a V-Net written out layer by layer, as the paper's Fig. 1 and the two
    reference implementations describe it (1 input channel, 2 output maps, biased convs).

    ``left``: convs per left stage (16..256 channels), ``right``: convs per right stage,
    finest first (32..256 channels). Down: 2³ conv stride 2, c -> 2c; up: 2³ transposed
    conv to the skip's width, then concatenation. Each conv/transposed conv is followed by
    a PReLU (one weight per channel in Caffe, one per layer in PyTorch's nn.PReLU()), and
    optionally a batch norm (2 parameters per channel).
    """

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k**3 + cout

    def extras(c: int) -> int:
        return (c if prelu_per_channel else 1) + (2 * c if batch_norm else 0)

    total = conv(1, 16, 5) + extras(16)  # input stage: its first conv takes the volume
    total += (left[0] - 1) * (conv(16, 16, 5) + extras(16))
    for level in range(1, 5):
        c = WIDTHS[level]
        total += conv(c // 2, c, 2) + extras(c)
        total += left[level] * (conv(c, c, 5) + extras(c))
    deep = WIDTHS[-1]
    for level in (3, 2, 1, 0):
        skip = WIDTHS[level]
        total += conv(deep, skip, 2) + extras(skip)  # transposed conv: same count
        total += right[level] * (conv(2 * skip, 2 * skip, 5) + extras(2 * skip))
        deep = 2 * skip
    if head_5x5x5:  # both implementations: 5³ conv 32 -> 2 (+ PReLU, BN), then 1³ conv 2 -> 2
        return total + conv(32, 2, 5) + extras(2) + conv(2, 2, 1)
    return total + conv(32, 2, 1)  # the paper's 1×1×1 output convolution


def _count(preset: str | None = None, **overrides) -> int:
    with torch.device("meta"):
        net = unetkit.create_model("vnet", preset=preset, **overrides)
    return sum(p.numel() for p in net.parameters())


def test_paper_parameter_count() -> None:
    # Milletari et al. 2016, Fig. 1: left stages with 1, 2, 3, 3, 3 convolutions at
    # 16..256 channels, right stages with 3, 3, 2, 1 at 256..32, PReLU, 1×1×1 output conv.
    # The paper prints no parameter count; this is its layer list written out.
    expected = _reference_count((1, 2, 3, 3, 3), (1, 2, 3, 3))
    assert expected == 65_175_314
    assert _count() == _count("paper") == expected


def test_official_prototxt_parameter_count() -> None:
    # faustomilletari/VNet, Prototxt/train_noPooling_ResNet_cinque.prototxt (the official
    # Caffe net): 1, 1, 2, 3, 3 convs left and 3, 2, 1, 1 right (fewer than Fig. 1, see
    # faustomilletari/VNet issue #9), per-channel PReLU, and a 5³ conv + PReLU + 1³ conv head.
    expected = _reference_count((1, 1, 2, 3, 3), (1, 1, 2, 3), head_5x5x5=True)
    assert expected == 61_982_682
    assert abs(_count("prototxt") - expected) / expected < 0.02


def test_vnet_pytorch_parameter_count() -> None:
    # mattmacy/vnet.pytorch, vnet.py: VNet(elu=False) as built by its train.py (which prints
    # "Number of params"): batch norm after every conv, nn.PReLU() (one weight), 1, 1, 2, 3, 2
    # convs left and 1, 1, 2, 2 right (its comment: "corresponds to what is in the actual
    # prototxt, not the intent"), 5³ + 1³ head: 45,600,340 parameters, the "~45.6 M" quoted
    # for it. Our preset has no conv bias before a norm and a 1×1×1 head: within 0.1 %.
    expected = _reference_count(
        (1, 1, 2, 3, 2), (1, 1, 2, 2), prelu_per_channel=False, batch_norm=True, head_5x5x5=True
    )
    assert expected == 45_600_340
    assert abs(_count("vnet_pytorch") - expected) / expected < 0.02


def test_paper_layers() -> None:
    with torch.device("meta"):
        net = unetkit.create_model("vnet", preset="paper")
    convs = [m for m in net.modules() if type(m) is nn.Conv3d]
    kinds = [(m.kernel_size, m.stride) for m in convs]
    assert kinds.count(((5, 5, 5), (1, 1, 1))) == (1 + 2 + 3 + 3 + 3) + (3 + 3 + 2 + 1)
    assert kinds.count(((2, 2, 2), (2, 2, 2))) == 4  # strided-conv down-sampling, no pooling
    assert kinds.count(((1, 1, 1), (1, 1, 1))) == 1  # the output layer
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in ups] == [
        (256, 128, (2, 2, 2)),
        (256, 64, (2, 2, 2)),
        (128, 32, (2, 2, 2)),
        (64, 16, (2, 2, 2)),
    ]
    widths = [s.block.convs[-1].conv.out_channels for s in net.decoder.stages]
    assert widths == [256, 128, 64, 32]  # up-conv + concatenated skip
    assert not any(isinstance(m, nn.MaxPool3d | nn.BatchNorm3d) for m in net.modules())
    prelus = [m for m in net.modules() if isinstance(m, nn.PReLU)]
    assert len(prelus) == 21 + 4 + 4  # one per stage conv (last: after the add), down, up


def test_input_stage_adds_broadcast_input() -> None:
    net = unetkit.create_model("vnet", channels=(16, 32), num_convs=(1, 1), init="default")
    stage = net.encoder.stages[0].block
    conv = stage.convs[0].conv
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    with torch.no_grad():
        stage.act.weight.copy_(torch.linspace(0.1, 0.4, 16))
    x = torch.randn(2, 1, 5, 6, 7)
    expected = F.prelu(x.expand(-1, 16, -1, -1, -1), stage.act.weight)
    torch.testing.assert_close(stage(x), expected, rtol=0, atol=0)


def test_residual_stage_is_conv_plus_identity() -> None:
    torch.manual_seed(1)
    stage = ResidualStage(3, 8, 8, 2, kernel_size=5, act="prelu").eval()
    x = torch.randn(1, 8, 6, 5, 7)
    c1, c2 = stage.convs[0], stage.convs[1]
    branch = F.conv3d(
        F.prelu(F.conv3d(x, c1.conv.weight, c1.conv.bias, padding=2), c1.act.weight),
        c2.conv.weight,
        c2.conv.bias,
        padding=2,
    )  # no activation before the add
    expected = F.prelu(branch + x, stage.act.weight)
    torch.testing.assert_close(stage(x), expected)
    odd = ResidualStage(2, 3, 16, 1)  # 16 is not a multiple of 3: 1×1 projection shortcut
    assert isinstance(odd.shortcut, nn.Conv2d) and odd(torch.zeros(1, 3, 4, 4)).shape[1] == 16


@pytest.mark.parametrize(
    ("dims", "size"), [(3, (9, 20, 13)), (3, (1, 3, 2)), (2, (37, 50)), (2, (17, 5))]
)
def test_any_size_same_size_out(dims: int, size: tuple[int, ...]) -> None:
    net = unetkit.create_model(
        "vnet", dims=dims, channels=(4, 8, 16), num_convs=(1, 2, 2), out_channels=3
    ).eval()
    assert net(torch.zeros(1, 1, *size)).shape == (1, 3, *size)


def test_gradient_step_reduces_dice_loss() -> None:
    torch.manual_seed(0)
    net = unetkit.create_model("vnet", channels=(4, 8), num_convs=(1, 2), kernel_size=3)
    x = torch.randn(2, 1, 8, 10, 6)
    target = (x[:, 0] > 0).long()
    loss_fn = build_loss("dice", squared=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(net(x), {"mask": target})
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert losses[-1] < losses[0]


def test_save_load_round_trip(tmp_path: Path) -> None:
    net = unetkit.create_model(
        "vnet",
        channels=(4, 8, 16),
        num_convs=(1, 2, 2),
        decoder_convs=(2, 1),
        norm="instance",
        in_channels=2,
    ).eval()
    path = unetkit.save(net, tmp_path / "vnet.safetensors")
    loaded = unetkit.load(path)
    assert isinstance(loaded, VNet) and loaded.config == net.config
    assert loaded.config.decoder_convs == (2, 1)
    x = torch.randn(1, 2, 7, 9, 10)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="num_convs"):
        VNetConfig(channels=(4, 8, 16), num_convs=(1, 2))
    with pytest.raises(ConfigError, match="decoder_convs"):
        VNetConfig(channels=(4, 8, 16), num_convs=(1, 2, 2), decoder_convs=(1, 1, 1))
    with pytest.raises(ConfigError, match="odd"):
        VNetConfig(kernel_size=4)
    with pytest.raises(ConfigError, match="did you mean 'num_convs'"):
        unetkit.create_model("vnet", num_conv=(1, 2, 3, 3, 3))
    with pytest.raises(ConfigError, match="dims"):
        VNetConfig(dims=4)


# --- the paper's Dice loss ---------------------------------------------------------------


def _dice_reference(probs: np.ndarray, onehot: np.ndarray, smooth: float, squared: bool):
    """1 − mean over classes of (2 Σ p g + s) / (Σ p^e + Σ g^e + s), sums over batch and
    space, in float64 (Milletari et al. 2016, eq. 1 for e = 2)."""
    axes = (0, *range(2, probs.ndim))
    e = 2 if squared else 1
    dice = (2 * (probs * onehot).sum(axes) + smooth) / (
        (probs**e).sum(axes) + (onehot**e).sum(axes) + smooth
    )
    return 1.0 - dice.mean()


def test_squared_dice_matches_float64_softmax() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 5, 6, 4))
    target = rng.integers(0, 3, size=(2, 5, 6, 4))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    onehot = np.moveaxis(np.eye(3)[target], -1, 1)
    t_logits, t_target = torch.tensor(logits, dtype=torch.float32), torch.tensor(target)
    for include_background in (False, True):
        lo = 0 if include_background else 1
        for squared in (False, True):
            expected = _dice_reference(probs[:, lo:], onehot[:, lo:], 1e-5, squared)
            got = soft_dice_loss(
                t_logits, t_target, squared=squared, include_background=include_background
            )
            assert abs(float(got) - expected) < 1e-6
    squared_loss = build_loss("dice", squared=True)(t_logits, {"mask": t_target})
    plain_loss = build_loss("dice")(t_logits, {"mask": t_target})
    reference = _dice_reference(probs[:, 1:], onehot[:, 1:], 1e-5, True)
    assert abs(float(squared_loss) - reference) < 1e-6
    assert float(squared_loss) < float(plain_loss)  # Σp² < Σp for soft probabilities


def test_squared_dice_sigmoid_soft_target() -> None:
    # a 1-channel model with a soft target: g² ≠ g, so squaring the target matters too
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 1, 7, 5))
    target = rng.random(size=(2, 7, 5))
    p = 1 / (1 + np.exp(-logits[:, 0]))
    expected = 1 - (2 * (p * target).sum() + 1.0) / ((p**2).sum() + (target**2).sum() + 1.0)
    got = soft_dice_loss(
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(target, dtype=torch.float32),
        squared=True,
        smooth=1.0,
    )
    assert abs(float(got) - expected) < 1e-6


def test_squared_dice_perfect_prediction_and_ignore() -> None:
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[:, :2] = 1
    logits = 40.0 * F.one_hot(target, 2).movedim(-1, 1).float() - 20.0
    assert float(soft_dice_loss(logits, target, squared=True)) < 1e-6
    ignored = target.clone()
    ignored[:, 3] = -100
    noisy = logits.clone()
    noisy[:, :, 3] = torch.randn(1, 2, 4, 4) * 50  # ignored voxels may predict anything
    assert float(soft_dice_loss(noisy, ignored, squared=True)) < 1e-6
