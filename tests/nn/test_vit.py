"""Transformer blocks: attention against float64 references, (shifted-)window masks against a
brute-force definition of the windows, position-embedding interpolation against skimage/numpy,
and the patch merging / expanding layouts against explicit slicing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from skimage.transform import resize

from unetkit.errors import ConfigError, InputSizeError
from unetkit.nn.swin import (
    PatchExpanding,
    PatchMerging,
    WindowAttention,
    depth_to_space,
    relative_position_index,
    space_to_depth,
    window_partition,
    window_reverse,
)
from unetkit.nn.vit import (
    DropPath,
    PatchEmbed,
    PositionEmbedding,
    SelfAttention,
    ViTEncoder,
    resize_position_embedding,
)


def _heads_attention(x: np.ndarray, attn: SelfAttention, bias: np.ndarray) -> np.ndarray:
    """float64 multi-head attention of tokens x (L×C) with an additive L×L×heads bias."""
    w = {k: v.detach().double().numpy() for k, v in attn.state_dict().items()}
    qkv = x @ w["qkv.weight"].T + w["qkv.bias"]
    c = x.shape[-1]
    h = attn.num_heads
    d = c // h
    out = np.zeros_like(x)
    for i in range(h):
        q, k, v = (qkv[:, j * c + i * d : j * c + (i + 1) * d] for j in range(3))
        s = q @ k.T / math.sqrt(d) + bias[:, :, i]
        s = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, i * d : (i + 1) * d] = (s / s.sum(axis=1, keepdims=True)) @ v
    return out @ w["proj.weight"].T + w["proj.bias"]


def test_self_attention_matches_float64_reference() -> None:
    attn = SelfAttention(8, 2).double().eval()
    for p in attn.parameters():
        p.data.normal_()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    out = attn(x)
    for b in range(3):
        ref = _heads_attention(x[b].numpy(), attn, np.zeros((5, 5, 2)))
        np.testing.assert_allclose(out[b].detach().numpy(), ref, rtol=1e-10, atol=1e-10)


def _brute_force_window_attention(x: torch.Tensor, attn: WindowAttention) -> np.ndarray:
    """Shifted windows by their definition (Liu et al. 2021, Fig. 2): window borders at
    shift + k·window per axis; tokens attend only within their window; bias by offset."""
    size = x.shape[1:-1]
    big_w = attn.window_size
    win = [min(big_w, s) for s in size]
    shift = [big_w // 2 if attn.shift and s > big_w else 0 for s in size]
    coords = list(itertools.product(*[range(s) for s in size]))
    table = attn.relative_position_bias_table.detach().double().numpy()
    n = len(coords)
    bias = np.full((n, n, attn.num_heads), -np.inf)
    for a, p in enumerate(coords):
        for b, q in enumerate(coords):
            same = all(
                (pi - s) // w == (qi - s) // w
                for pi, qi, s, w in zip(p, q, shift, win, strict=True)
            )
            if same:
                row = 0
                for pi, qi in zip(p, q, strict=True):
                    row = row * (2 * big_w - 1) + (pi - qi + big_w - 1)
                bias[a, b] = table[row]
    tokens = x[0].reshape(n, -1).numpy()
    return _heads_attention(tokens, attn, bias).reshape(x.shape[1:])


@pytest.mark.parametrize(
    ("size", "window"),
    [((11,), 4), ((7, 9), 3), ((6, 6), 3), ((2, 9), 3), ((3, 4, 5), 2)],
)
@pytest.mark.parametrize("shift", [False, True])
def test_window_attention_matches_brute_force(size: tuple, window: int, shift: bool) -> None:
    attn = WindowAttention(len(size), 4, 2, window, shift=shift).double().eval()
    for p in attn.parameters():
        p.data.normal_()
    x = torch.randn(1, *size, 4, dtype=torch.float64)
    out = attn(x).detach().numpy()
    np.testing.assert_allclose(out[0], _brute_force_window_attention(x, attn), atol=1e-10)


def test_shifted_windows_keep_regions_apart() -> None:
    # 6×6 grid, window 3, shift 1: the cyclic shift puts rows/cols 0 and 5 into one window,
    # but token (0, 0) is its own region, and (2, 2) sees exactly rows/cols 1..3.
    attn = WindowAttention(2, 4, 1, 3, shift=True)
    x = torch.randn(1, 6, 6, 4, requires_grad=True)
    out = attn(x)
    for (i, j), region in [
        ((0, 0), {(0, 0)}),
        ((2, 2), set(itertools.product(range(1, 4), repeat=2))),
    ]:
        (grad,) = torch.autograd.grad(out[0, i, j].sum(), x, retain_graph=True)
        seen = {tuple(ix) for ix in (grad[0].abs().sum(-1) > 0).nonzero().tolist()}
        assert seen == region


def test_small_axes_use_one_unshifted_window() -> None:
    attn = WindowAttention(2, 4, 1, 7, shift=True)
    assert attn.windows_for((7, 7)) == ((7, 7), (0, 0))  # Swin-Unet's 7×7 bottleneck
    assert attn.windows_for((14, 5)) == ((7, 5), (3, 0))


@pytest.mark.parametrize("size", [(8,), (6, 9), (4, 6, 2)])
def test_window_partition_round_trip(size: tuple) -> None:
    window = tuple(2 if s % 2 == 0 else 3 for s in size)
    x = torch.randn(2, *size, 3)
    w = window_partition(x, window)
    count = math.prod(s // k for s, k in zip(size, window, strict=True))
    assert w.shape == (2, count, math.prod(window), 3)
    assert torch.equal(window_reverse(w, window, size), x)


def test_relative_position_index_covers_table() -> None:
    idx = relative_position_index((3, 3), 3)
    assert idx.min() == 0 and idx.max() == 24  # (2·3-1)^2 rows
    assert torch.equal(idx + idx.T, torch.full_like(idx, 24))  # offset and its negation
    assert idx.diagonal().unique().tolist() == [12]  # zero offset: the table's centre
    # a smaller window reuses the centre rows of the same table
    assert set(relative_position_index((2, 2), 3).unique().tolist()) == {
        6,
        7,
        8,
        11,
        12,
        13,
        16,
        17,
        18,
    }


def test_position_embedding_unchanged_on_its_grid() -> None:
    pe = PositionEmbedding((4, 5), 6)
    assert resize_position_embedding(pe.weight, (4, 5), (4, 5)) is pe.weight


@pytest.mark.parametrize("new", [(7, 3), (2, 9), (4, 5)])
def test_position_embedding_interpolation_matches_skimage(new: tuple) -> None:
    pos = torch.randn(1, 4 * 5, 3, dtype=torch.float64)
    out = resize_position_embedding(pos, (4, 5), new).reshape(*new, 3).numpy()
    img = pos.reshape(4, 5, 3).numpy()
    ref = resize(img, (*new, 3), order=1, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_position_embedding_interpolation_1d_matches_numpy() -> None:
    pos = torch.randn(1, 6, 2, dtype=torch.float64)
    out = resize_position_embedding(pos, (6,), (10,))[0].numpy()
    centres = (np.arange(10) + 0.5) * 6 / 10 - 0.5  # half-pixel centres, clamped at the ends
    for c in range(2):
        np.testing.assert_allclose(out[:, c], np.interp(centres, np.arange(6), pos[0, :, c]))


def test_vit_encoder_any_grid_and_gradient_to_position_embedding() -> None:
    vit = ViTEncoder(2, 8, 16, grid=4, num_layers=1, num_heads=2, mlp_dim=32)
    y = vit(torch.randn(2, 8, 5, 3))
    assert y.shape == (2, 16, 5, 3)
    y.square().mean().backward()
    assert vit.pos.weight.grad is not None and vit.pos.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("factor", [2, 4])
def test_space_to_depth_inverse(dims: int, factor: int) -> None:
    x = torch.randn(2, *([factor * 3] * dims), 5)
    for reverse in (False, True):
        y = space_to_depth(x, factor, reverse=reverse)
        assert y.shape == (2, *([3] * dims), factor**dims * 5)
    assert torch.equal(depth_to_space(space_to_depth(x, factor), factor), x)


def test_depth_to_space_layout_is_swin_unets() -> None:
    # einops "b h w (p1 p2 c) -> b (h p1) (w p2) c", written out as loops
    f, c = 2, 3
    x = torch.randn(1, 2, 3, f * f * c)
    y = depth_to_space(x, f)
    for h, w, p1, p2, k in itertools.product(range(2), range(3), range(f), range(f), range(c)):
        assert y[0, h * f + p1, w * f + p2, k] == x[0, h, w, (p1 * f + p2) * c + k]


def test_patch_merging_matches_swin_order() -> None:
    m = PatchMerging(2, 3)
    x = torch.randn(2, 4, 6, 3)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(m(x), m.reduction(m.norm(cat)))
    assert m(x).shape == (2, 2, 3, 6)
    with pytest.raises(InputSizeError, match=r"even.*\(4, 6\)"):
        m(torch.randn(1, 3, 6, 3))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_patch_merging_and_expanding_shapes(dims: int) -> None:
    x = torch.randn(2, *([4] * dims), 8)
    down = PatchMerging(dims, 8)(x)
    assert down.shape == (2, *([2] * dims), 16)
    up = PatchExpanding(dims, 16)(down)
    assert up.shape == x.shape  # back to the merged grid's resolution and width
    final = PatchExpanding(dims, 8, factor=4, out_dim=8)(x)
    assert final.shape == (2, *([16] * dims), 8)


def test_patch_expanding_is_linear_then_rearrange_then_norm() -> None:
    pe = PatchExpanding(2, 8)
    assert pe.expand.weight.shape == (16, 8)  # 2D: C -> 2C, then 2×2 tokens of C/2
    x = torch.randn(1, 3, 2, 8)
    torch.testing.assert_close(pe(x), pe.norm(depth_to_space(pe.expand(x), 2)))


def test_patch_embed_sizes_and_error() -> None:
    pe = PatchEmbed(2, 3, 8, 4)
    assert pe(torch.zeros(1, 3, 8, 12)).shape == (1, 2, 3, 8)
    with pytest.raises(InputSizeError, match=r"\(12, 12\)"):
        pe(torch.zeros(1, 3, 9, 12))


def test_heads_must_divide_width() -> None:
    with pytest.raises(ConfigError, match="num_heads=3"):
        SelfAttention(8, 3)
    with pytest.raises(ConfigError, match="window_size=0"):
        WindowAttention(2, 8, 2, 0)


def test_drop_path_drops_whole_samples() -> None:
    dp = DropPath(0.5)
    x = torch.ones(200, 3, 4)
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0.3 < (per_sample[:, 0] > 0).float().mean() < 0.7
    assert torch.equal(dp.eval()(x), x)


def test_window_attention_trains_after_inference_mode() -> None:
    # the cached index/mask must not be inference tensors, or training after predict fails
    attn = WindowAttention(2, 4, 1, 3, shift=True)
    with torch.inference_mode():
        attn(torch.randn(1, 7, 8, 4))
    attn(torch.randn(1, 7, 8, 4)).sum().backward()
    assert attn.relative_position_bias_table.grad is not None
