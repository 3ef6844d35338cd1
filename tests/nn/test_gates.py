"""Attention gate and squeeze-excitation blocks against float64 numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetkit.errors import ConfigError
from unetkit.nn.gates import SCSE, AttentionGate, ChannelSE, GatedSkip, SpatialSE


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _upsample2_linear(a: np.ndarray, axis: int) -> np.ndarray:
    """2× linear up-sampling along ``axis`` with half-pixel centres (align_corners=False)."""
    n = a.shape[axis]
    src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    shape = [1] * a.ndim
    shape[axis] = 2 * n
    w = w.reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - w) + np.take(a, hi, axis=axis) * w


def _w(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def test_attention_gate_matches_float64_reference_2d() -> None:
    # Oktay et al. eq. 1-2 computed by hand: strided 2×2 theta as a patch einsum, 1×1 convs
    # as channel einsums, separable bilinear resampling of alpha.
    gate = AttentionGate(2, 3, 5, 4, project=False).double()
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    g = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    out, alpha = gate(x, g)

    xn, gn = x.numpy(), g.numpy()
    patches = xn.reshape(2, 3, 3, 2, 4, 2)  # n, c, h/2, kh, w/2, kw
    theta = np.einsum("nchiwj,fcij->nfhw", patches, _w(gate.theta.weight))
    phi = np.einsum("nghw,fg->nfhw", gn, _w(gate.phi.weight)[:, :, 0, 0])
    phi += _w(gate.phi.bias)[None, :, None, None]
    f = np.maximum(theta + phi, 0.0)
    q = np.einsum("nfhw,f->nhw", f, _w(gate.psi.weight)[0, :, 0, 0]) + _w(gate.psi.bias)[0]
    a = _upsample2_linear(_upsample2_linear(_sigmoid(q), 1), 2)[:, None]
    np.testing.assert_allclose(alpha.detach().numpy(), a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.detach().numpy(), a * xn, rtol=1e-10, atol=1e-12)
    assert gate.theta.bias is None  # the paper's parameter list has b_g and b_psi only


@pytest.mark.parametrize(("dims", "size"), [(1, (10,)), (2, (6, 8)), (3, (4, 6, 2))])
def test_constant_psi_gives_constant_coefficients(dims: int, size: tuple[int, ...]) -> None:
    gate = AttentionGate(dims, 4, 6, 3, project=False)
    with torch.no_grad():
        gate.psi.weight.zero_()
        gate.psi.bias.fill_(0.7)
    x = torch.randn(2, 4, *size)
    g = torch.randn(2, 6, *(s // 2 for s in size))
    out, alpha = gate(x, g)
    expected = 1.0 / (1.0 + np.exp(-0.7))
    assert alpha.shape == (2, 1, *size)
    torch.testing.assert_close(alpha, torch.full_like(alpha, expected))
    torch.testing.assert_close(out, x * expected)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gate_output_shapes_and_range_with_projection(dims: int) -> None:
    size = (8, 6, 4)[:dims]
    gate = AttentionGate(dims, 4, 8, 2)
    x = torch.randn(3, 4, *size)
    # a gating signal on a different grid is resampled to theta(x)'s grid
    out, alpha = gate(x, torch.randn(3, 8, *(1,) * dims))
    assert out.shape == x.shape and alpha.shape == (3, 1, *size)
    assert float(alpha.detach().min()) >= 0.0 and float(alpha.detach().max()) <= 1.0
    out.sum().backward()
    assert all(p.grad is not None for p in gate.parameters())


def test_gated_skip_averages_head_coefficients() -> None:
    skip = GatedSkip(2, 4, 8, heads=2).eval()
    x, g = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)
    out, alpha = skip(x, g)
    a0, a1 = (gate.coefficients(x, g) for gate in skip.gates)
    torch.testing.assert_close(alpha, (a0 + a1) / 2)
    assert out.shape == x.shape
    assert not torch.allclose(a0, a1)  # independent heads
    assert skip.merge.conv.in_channels == 8  # two gated copies concatenated


def test_gate_errors() -> None:
    with pytest.raises(ConfigError, match="heads=0"):
        GatedSkip(2, 4, 8, heads=0)
    with pytest.raises(ConfigError, match="subsample=0"):
        AttentionGate(2, 4, 8, 4, subsample=0)


def test_channel_se_matches_reference() -> None:
    se = ChannelSE(2, 6, reduction=3).double()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    z = x.numpy().mean(axis=(2, 3))  # n, c
    h = np.maximum(z @ _w(se.fc1.weight)[:, :, 0, 0].T + _w(se.fc1.bias), 0)
    s = _sigmoid(h @ _w(se.fc2.weight)[:, :, 0, 0].T + _w(se.fc2.bias))
    np.testing.assert_allclose(se(x).detach().numpy(), x.numpy() * s[:, :, None, None], rtol=1e-10)
    assert se.fc1.out_channels == 2


def test_spatial_se_and_scse_match_reference() -> None:
    block = SCSE(3, 4).double()
    x = torch.randn(1, 4, 3, 2, 5, dtype=torch.float64)
    xn = x.numpy()
    w, b = _w(block.sse.squeeze.weight)[0, :, 0, 0, 0], _w(block.sse.squeeze.bias)[0]
    sse = xn * _sigmoid(np.einsum("ncdhw,c->ndhw", xn, w) + b)[:, None]
    np.testing.assert_allclose(block.sse(x).detach().numpy(), sse, rtol=1e-10)
    np.testing.assert_allclose(
        block(x).detach().numpy(), block.cse(x).detach().numpy() + sse, rtol=1e-10
    )
    assert SpatialSE(1, 3)(torch.randn(2, 3, 7)).shape == (2, 3, 7)
