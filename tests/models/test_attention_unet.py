"""Attention U-Net: gate wiring, attention maps, fused heads, parameter count of the paper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import unetkit
from unetkit.errors import ConfigError
from unetkit.models.attention_unet import attention_maps
from unetkit.segmentation.losses import build_loss


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _official_ct_count(f: list[int], cin: int, ncls: int, heads: int) -> int:
    """Parameters of the official unet_CT_{single,multi}_att_dsv_3D, counted by hand.

    Every conv there has a bias, also when batch norm follows (2 parameters per channel).
    """

    def conv(i: int, o: int, k: int = 27, bias: bool = True) -> int:
        return i * o * k + (o if bias else 0)

    def double(i: int, o: int) -> int:  # UnetConv3: (conv 3³ + BN + ReLU) × 2
        return conv(i, o) + 2 * o + conv(o, o) + 2 * o

    enc = double(cin, f[0]) + sum(double(f[i], f[i + 1]) for i in range(4))
    dec = sum(double(f[i + 1] + f[i], f[i]) for i in range(4))  # trilinear up + concat
    dsv = sum(conv(f[i], ncls, 1) for i in range(4)) + conv(4 * ncls, ncls, 1)
    gating = conv(f[4], f[4], 1) + 2 * f[4]
    gates = 0
    for i in (1, 2, 3):  # skip f[i], gating signal f[i+1], F_int = f[i], theta 2×2×2 no bias
        one = conv(f[i], f[i], 1) + 2 * f[i] + conv(f[i], f[i], 8, False)
        one += conv(f[i + 1], f[i], 1) + conv(f[i], 1, 1)
        gates += heads * one + conv(heads * f[i], f[i], 1) + 2 * f[i]
    return enc + dec + dsv + gating + gates


def test_paper_parameter_count() -> None:
    # Oktay et al., MIDL 2018, Table 1 (CT-150, 4 classes, 1 input channel): U-Net 5.88M,
    # Attention U-Net 6.40M parameters; official code ozan-oktay/Attention-Gated-Networks,
    # models/networks/unet_CT_dsv_3D.py and unet_CT_multi_att_dsv_3D.py, feature_scale=4
    # (widths 16..256), configs/config_unet_ct_multi_att_dsv.json.
    with torch.device("meta"):
        att = unetkit.create_model("attention_unet", preset="paper", in_channels=1, out_channels=4)
        unet = unetkit.create_model(
            "unet", dims=3, channels=(16, 32, 64, 128, 256), up="resize", out_channels=4
        )
    assert abs(_params(att) - 6.40e6) / 6.40e6 < 0.02
    assert abs(_params(unet) - 5.88e6) / 5.88e6 < 0.02
    # Exactly the official model, less the conv biases that batch norm makes redundant
    # (unetkit's ConvNormAct has no bias before a norm): 2 per channel of every such conv.
    f = [16, 32, 64, 128, 256]
    redundant = 2 * sum(f) + 2 * sum(f[:4]) + f[4] + 2 * sum(f[1:4]) + sum(f[1:4])
    assert _params(att) == _official_ct_count(f, 1, 4, heads=2) - redundant


def test_return_attention_shapes_order_and_range() -> None:
    net = unetkit.create_model("attention_unet", channels=(4, 8, 16, 32)).eval()
    assert net.gated_levels == (1, 2)
    with torch.no_grad():
        logits, maps = net(torch.randn(2, 1, 19, 23), return_attention=True)
        plain = net(torch.zeros(1, 1, 19, 23))
    assert logits.shape == (2, 2, 19, 23)
    assert isinstance(plain, torch.Tensor) and plain.shape == (1, 2, 19, 23)  # logits only
    assert [tuple(m.shape) for m in maps] == [(2, 1, 10, 12), (2, 1, 5, 6)]  # finest first
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in maps)


def test_gates_are_wired_to_the_coarser_signal() -> None:
    net = unetkit.create_model("attention_unet", channels=(4, 8, 16, 32)).eval()
    seen: dict[str, torch.Tensor] = {}
    net.gating.register_forward_hook(lambda m, i, o: seen.__setitem__("gating", o))
    net.decoder.stages[0].register_forward_hook(lambda m, i, o: seen.__setitem__("stage0", o))
    for k, gate in enumerate(net.gates):
        gate.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"g{k}", i))
    net(torch.randn(1, 1, 16, 16))
    skip, g = seen["g0"]  # deepest gate: level-2 skip, gated by the bottleneck's 1×1 conv
    assert skip.shape[1:] == (16, 4, 4) and g is seen["gating"]
    skip, g = seen["g1"]  # next gate: level-1 skip, gated by the first decoder stage
    assert skip.shape[1:] == (8, 8, 8) and g is seen["stage0"]


def test_constant_gates_give_constant_maps() -> None:
    net = unetkit.create_model("attention_unet", channels=(4, 8, 16, 32), gate_heads=2).eval()
    with torch.no_grad():
        for skip in net.gates:
            for k, gate in enumerate(skip.gates):
                gate.psi.weight.zero_()
                gate.psi.bias.fill_(float(k))  # heads sigmoid(0), sigmoid(1): mean map
    expected = (0.5 + 1.0 / (1.0 + np.exp(-1.0))) / 2
    _, maps = net(torch.randn(1, 1, 12, 20), return_attention=True)
    for m in maps:
        torch.testing.assert_close(m, torch.full_like(m, expected))
    for m in attention_maps(net, torch.randn(1, 1, 12, 20)):
        assert m.shape == (1, 1, 12, 20)
        torch.testing.assert_close(m, torch.full_like(m, expected))


def _upsample_linear(a: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """Linear up-sampling by ``factor`` along ``axis``, half-pixel centres, edge clamped."""
    n = a.shape[axis]
    src = np.clip((np.arange(factor * n) + 0.5) / factor - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * a.ndim
    shape[axis] = factor * n
    w = (src - lo).reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - w) + np.take(a, hi, axis=axis) * w


@pytest.mark.parametrize(("dims", "size"), [(2, (16, 24)), (3, (8, 16, 8))])
def test_attention_maps_are_separable_linear_upsamplings(dims: int, size: tuple[int, ...]) -> None:
    net = unetkit.create_model("attention_unet", dims=dims, channels=(2, 4, 8, 16)).eval()
    x = torch.randn(1, 1, *size)
    maps = attention_maps(net, x)
    with torch.no_grad():
        _, raw = net(x, return_attention=True)
    assert [tuple(m.shape) for m in maps] == [(1, 1, *size)] * 2
    for level, m, r in zip(net.gated_levels, maps, raw, strict=True):
        expected = r.double().numpy()
        for axis in range(2, 2 + dims):
            expected = _upsample_linear(expected, 2**level, axis)
        np.testing.assert_allclose(m.double().numpy(), expected, rtol=1e-5, atol=1e-6)

    odd = attention_maps(net, torch.randn(1, 1, *(s - 3 for s in size)))  # padded and cropped
    assert [tuple(m.shape) for m in odd] == [(1, 1, *(s - 3 for s in size))] * 2


def test_fused_deep_supervision_head() -> None:
    net = unetkit.create_model(
        "attention_unet", channels=(4, 8, 16), deep_supervision="fused", up="resize"
    )
    assert len(net.head.heads) == 2 and net.head.merge.in_channels == 2 * 2
    y = net(torch.randn(2, 1, 11, 14))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 2, 11, 14)
    with pytest.raises(ConfigError, match="did you mean 'fused'"):
        unetkit.create_model("attention_unet", deep_supervision="fuse")
    with pytest.raises(ConfigError, match="gate_heads=0"):
        unetkit.create_model("attention_unet", gate_heads=0)


def test_gradient_step_reduces_loss() -> None:
    net = unetkit.create_model("attention_unet", channels=(4, 8, 16))
    x, mask = torch.randn(2, 1, 16, 16), (torch.randn(2, 16, 16) > 0).long()
    loss_fn = build_loss("dice_ce")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(net(x), {"mask": mask})
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in net.gates.parameters())  # gates are trained


def test_save_load_round_trip(tmp_path: Path) -> None:
    net = unetkit.create_model("attention_unet", preset="paper", channels=(2, 4, 8)).eval()
    path = unetkit.save(net, tmp_path / "att.safetensors")
    loaded = unetkit.load(path).eval()
    assert loaded.config == net.config
    x = torch.randn(1, 1, 5, 7, 6)
    with torch.no_grad():
        a, maps_a = net(x, return_attention=True)
        b, maps_b = loaded(x, return_attention=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(maps_a, maps_b, rtol=0, atol=0)


def test_attention_maps_rejects_other_models() -> None:
    with pytest.raises(ConfigError, match="needs an AttentionUNet"):
        attention_maps(unetkit.create_model("unet", channels=(4, 8)), torch.zeros(1, 1, 8, 8))


def test_shallow_model_has_no_gates() -> None:
    net = unetkit.create_model("attention_unet", channels=(4, 8))
    assert net.gated_levels == () and len(net.gates) == 0 and not hasattr(net, "gating")
    logits, maps = net(torch.randn(1, 1, 7, 9), return_attention=True)
    assert logits.shape == (1, 2, 7, 9) and maps == []
