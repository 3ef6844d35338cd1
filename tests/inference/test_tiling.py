"""Tiling engine: overlap-tile equals one whole-image pass; sliding window blends exactly.

References are independent of the engine: numpy.pad for mirror/edge/zero padding, one forward
pass over the whole padded image, scipy's Gaussian window, and brute-force float64 blending
with a full-size weight buffer.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn as nn

import unetkit
from unetkit import runtime
from unetkit.errors import ConfigError, DataError, InputSizeError
from unetkit.inference import TileOptions
from unetkit.inference.grid import (
    TileGrid,
    extract_tile,
    gaussian_profile,
    importance_map,
    mirror_index,
)
from unetkit.inference.tiling import (
    overlap_tile,
    predict_tiled,
    sliding_window,
)
from unetkit.models.base import SegmentationModel
from unetkit.nn.dims import conv_nd


class Pointwise(SegmentationModel):
    """1×1 conv: translation-equivariant with no boundary effect (same size out)."""

    def __init__(self, dims: int = 2, in_channels: int = 1, out_channels: int = 3) -> None:
        super().__init__()
        self.dims, self.in_channels, self.out_channels = dims, in_channels, out_channels
        self.conv = conv_nd(dims)(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TilePosition(Pointwise):
    """Not translation-equivariant: adds each pixel's position inside the tile, so every
    tile predicts something different and blending weights become visible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = sum(
            torch.arange(n, dtype=x.dtype).view([n] + [1] * (self.dims - 1 - i)) * 0.1
            for i, n in enumerate(x.shape[2:])
        )
        return self.conv(x) + ramp


class ZeroPadConv(Pointwise):
    """3×3 conv with zero padding: the result depends on what lies beyond the tile."""

    def __init__(self) -> None:
        super().__init__(2, 1, 1)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)


def tiny_valid(dims: int = 2, channels: tuple[int, ...] = (4, 8, 16), out: int = 2):
    return unetkit.create_model(
        "unet", dims=dims, channels=channels, padding="valid", norm="none", out_channels=out
    ).eval()


def whole_image_reference(model: SegmentationModel, image: torch.Tensor) -> torch.Tensor:
    """One forward pass over the image mirror-padded (numpy) by the margin on the leading
    side and up to the smallest valid size on the trailing side, cropped to the image."""
    size = image.shape[1:]
    need = model.input_size_for(size)
    before = [(n - model.output_size_for(need)[i]) // 2 for i, n in enumerate(need)]
    pads = [(0, 0)] + [(b, n - s - b) for b, n, s in zip(before, need, size, strict=True)]
    padded = torch.from_numpy(np.pad(image.numpy(), pads, mode="reflect"))
    with torch.no_grad():
        y = model(padded[None])[0]
    return y[(slice(None), *[slice(0, s) for s in size])]


# --- padding and planning ----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_mirror_index_matches_numpy_reflect(n: int) -> None:
    expected = np.pad(np.arange(n), 25, mode="reflect")
    got = mirror_index(torch.arange(-25, n + 25), n).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "mode,np_mode", [("reflect", "reflect"), ("replicate", "edge"), ("constant", "constant")]
)
def test_extract_tile_matches_numpy_pad(mode: str, np_mode: str) -> None:
    image = torch.rand(2, 6, 5, dtype=torch.float64)
    padded = np.pad(image.numpy(), [(0, 0), (13, 13), (13, 13)], mode=np_mode)
    for start, size in [
        ((-4, 2), (8, 9)),
        ((0, 0), (6, 5)),
        ((3, -13), (11, 4)),
        ((-13, -1), (30, 7)),
    ]:
        got = extract_tile(image, start, size, mode)
        ref = padded[
            :, start[0] + 13 : start[0] + 13 + size[0], start[1] + 13 : start[1] + 13 + size[1]
        ]
        np.testing.assert_array_equal(got.numpy(), ref)


@pytest.mark.parametrize(
    "n,t,overlap",
    [(100, 32, 0.25), (33, 32, 0.5), (97, 16, 0.0), (64, 64, 0.5), (10, 16, 0.5), (1000, 7, 0.9)],
)
def test_sliding_grid_covers_with_overlap(n: int, t: int, overlap: float) -> None:
    (starts,) = TileGrid.sliding((n,), (t,), overlap).starts
    if n <= t:
        assert starts == (-((t - n) // 2),)  # one centred, padded tile
        return
    assert starts[0] == 0 and starts[-1] == n - t  # last tile snapped to the end
    gaps = np.diff(starts)
    assert gaps.min() >= 1 and gaps.max() <= max(1, t * (1 - overlap))  # overlap honoured
    covered = np.zeros(n, bool)
    for s in starts:
        covered[s : s + t] = True
    assert covered.all()


def test_stepped_grid_keeps_step_and_covers_once() -> None:
    grid = TileGrid.stepped((70, 53), (12, 12), (8, 8))
    count = np.zeros((70, 53), int)
    for start in grid:
        dst, src = grid.regions(start)
        count[dst] += 1
        assert all(s.start == 0 for s in src)
    np.testing.assert_array_equal(count, 1)
    assert grid.starts[0] == tuple(range(0, 70, 8))


# --- overlap-tile == one whole-image pass ------------------------------------------------
@pytest.mark.parametrize("tile_out", [12, 30, (8, 28), 200])
def test_overlap_tile_equals_whole_image_pass(tile_out) -> None:
    model = tiny_valid(out=3)
    image = torch.rand(1, 70, 53)
    got = overlap_tile(model, image, tile_out=tile_out, batch_size=3)
    assert got.shape == (3, 70, 53) and got.dtype == torch.float32
    torch.testing.assert_close(got, whole_image_reference(model, image), atol=1e-5, rtol=0)


def test_overlap_tile_aligns_tiles_to_the_pooling_period() -> None:
    # Depth 3: valid outputs are 4, 12, 20, ... (≡ 4 mod 8) but the network only commutes
    # with shifts of 8, so 12-pixel tiles must advance by 8. Stitching them edge to edge
    # (advancing by 12) changes the result: the alignment is what the equality rests on.
    model = tiny_valid(channels=(2, 4, 8, 16))
    image = torch.rand(1, 30, 27)
    ref = whole_image_reference(model, image)
    torch.testing.assert_close(overlap_tile(model, image, tile_out=12), ref, atol=1e-5, rtol=0)
    naive = torch.empty_like(ref)
    with torch.no_grad():
        for i in range(0, 30, 12):
            for j in range(0, 27, 12):
                tile = extract_tile(image, (i - 44, j - 44), (100, 100))
                y = model(tile[None])[0]
                h, w = naive[:, i : i + 12, j : j + 12].shape[1:]
                naive[:, i : i + 12, j : j + 12] = y[:, :h, :w]
    assert (naive - ref).abs().max() > 1e-4


def test_overlap_tile_3d_and_1d() -> None:
    model3 = tiny_valid(dims=3, channels=(4, 8))
    image3 = torch.rand(1, 9, 7, 10)
    got = overlap_tile(model3, image3, tile_out=(4, 6, 4), batch_size=5)
    torch.testing.assert_close(got, whole_image_reference(model3, image3), atol=1e-5, rtol=0)
    model1 = tiny_valid(dims=1)
    image1 = torch.rand(1, 101)
    got = overlap_tile(model1, image1, tile_out=16)
    torch.testing.assert_close(got, whole_image_reference(model1, image1), atol=1e-5, rtol=0)


def test_overlap_tile_activation_and_out_buffer() -> None:
    model = tiny_valid()
    image = torch.rand(1, 30, 21)
    buffer = torch.full((2, 30, 21), float("nan"))
    got = overlap_tile(model, image, tile_out=8, activation="probabilities", out=buffer)
    assert got is buffer
    ref = torch.softmax(whole_image_reference(model, image), dim=0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


# --- sliding window ----------------------------------------------------------------------
def test_gaussian_profile_matches_scipy_and_map_is_symmetric() -> None:
    for n in (7, 16, 33):
        ref = scipy.signal.windows.gaussian(n, std=0.125 * n)
        np.testing.assert_allclose(
            gaussian_profile(n).numpy(), np.maximum(ref / ref.max(), 1e-6), rtol=1e-12
        )
    w = importance_map((16, 9, 12))
    assert w.min() > 0 and w.max() <= 1
    for axis in range(3):
        torch.testing.assert_close(w, w.flip(axis), atol=0, rtol=0)
    assert torch.equal(importance_map((5, 4), "constant"), torch.ones(5, 4))


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize(
    "dims,size,tile", [(1, (61,), 16), (2, (37, 29), (16, 11)), (3, (11, 9, 13), 6)]
)
def test_sliding_window_of_pointwise_model_equals_whole_pass(blend, dims, size, tile) -> None:
    model = Pointwise(dims, 2, 3).eval()
    image = torch.rand(2, *size)
    got = sliding_window(model, image, tile=tile, overlap=0.5, blend=blend, batch_size=3)
    with torch.no_grad():
        ref = torch.softmax(model(image[None])[0], dim=0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_sliding_window_blend_matches_brute_force_float64(blend: str) -> None:
    model = TilePosition(2, 1, 2).eval()
    image = torch.rand(1, 30, 23)
    tile, overlap = (12, 10), 0.4
    got = sliding_window(model, image, tile=tile, overlap=overlap, blend=blend, activation=None)
    # Independent reference: loop over the windows, full-size float64 weight buffer.
    starts = [
        TileGrid.sliding((n,), (t,), overlap).starts[0] for n, t in zip((30, 23), tile, strict=True)
    ]
    if blend == "gaussian":
        g = [scipy.signal.windows.gaussian(t, 0.125 * t) for t in tile]
        weight = np.outer(g[0] / g[0].max(), g[1] / g[1].max())
    else:
        weight = np.ones(tile)
    total, wsum = np.zeros((2, 30, 23)), np.zeros((30, 23))
    with torch.no_grad():
        for i in starts[0]:
            for j in starts[1]:
                y = model(image[None, :, i : i + 12, j : j + 10])[0].double().numpy()
                total[:, i : i + 12, j : j + 10] += y * weight
                wsum[i : i + 12, j : j + 10] += weight
    np.testing.assert_allclose(got.numpy(), total / wsum, atol=1e-5)


def test_sliding_window_small_image_is_padded_centred() -> None:
    model = ZeroPadConv().eval()
    image = torch.rand(1, 5, 7)
    got = sliding_window(model, image, tile=(9, 12), pad_mode="replicate", activation=None)
    padded = torch.from_numpy(np.pad(image.numpy(), [(0, 0), (2, 2), (2, 3)], mode="edge"))
    with torch.no_grad():
        ref = model(padded[None])[0, :, 2:7, 2:9]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_batch_size_does_not_change_results() -> None:
    same = unetkit.create_model("unet", channels=(4, 8), norm="batch").eval()
    image = torch.rand(1, 41, 35)
    a = sliding_window(same, image, tile=16, overlap=0.5, batch_size=1)
    b = sliding_window(same, image, tile=16, overlap=0.5, batch_size=7)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    valid = tiny_valid()
    a = overlap_tile(valid, image, tile_out=8, batch_size=1)
    b = overlap_tile(valid, image, tile_out=8, batch_size=64)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# --- predict_tiled -----------------------------------------------------------------------
def test_predict_tiled_dispatches_on_padding() -> None:
    image = np.random.rand(1, 40, 33).astype(np.float32)
    valid = tiny_valid()
    ref = torch.softmax(whole_image_reference(valid, torch.from_numpy(image)), dim=0)
    for tile in (None, 16):
        got = predict_tiled(valid, image, TileOptions(tile=tile), device="cpu")
        assert got.device.type == "cpu" and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    same = unetkit.create_model("unet", channels=(4, 8))
    same.train()
    got = predict_tiled(same, image)  # tile=None: small image, one pass
    assert same.training  # the caller's mode is restored
    with torch.no_grad():
        ref = torch.softmax(same.eval()(torch.from_numpy(image)[None])[0], dim=0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    tiled = predict_tiled(same, image, TileOptions(tile=16, overlap=0.5), activation="logits")
    torch.testing.assert_close(
        tiled, sliding_window(same, image, tile=16, overlap=0.5, activation=None)
    )


def test_bad_inputs_name_the_expected_shape() -> None:
    model = unetkit.create_model("unet", channels=(4, 8), in_channels=3)
    with pytest.raises(
        InputSizeError, match=r"3 input channel.*\(3, …, …\), got shape \(1, 20, 20\)"
    ):
        predict_tiled(model, torch.rand(1, 20, 20))
    with pytest.raises(InputSizeError, match=r"C×H×W.*\(1, 3, 20, 20\).*image\[0\]"):
        predict_tiled(model, torch.rand(1, 3, 20, 20))
    with pytest.raises(InputSizeError, match=r"image\[None\]"):
        predict_tiled(unetkit.create_model("unet", channels=(4, 8)), torch.rand(20, 20))
    with pytest.raises(DataError, match="uint8"):
        predict_tiled(model, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ConfigError, match="overlap_tile"):
        sliding_window(tiny_valid(), torch.rand(1, 50, 50), tile=8)
    with pytest.raises(ConfigError, match="sliding_window"):
        overlap_tile(model, torch.rand(3, 50, 50), tile_out=8)
    with pytest.raises(ConfigError, match="did you mean 'gaussian'"):
        sliding_window(model, torch.rand(3, 9, 9), tile=8, blend="gausian")
    with pytest.raises(ConfigError, match="overlap"):
        sliding_window(model, torch.rand(3, 9, 9), tile=8, overlap=1.0)


def test_large_image_memory_stays_bounded() -> None:
    # A 2048² image through a pointwise 1 -> 4 channel model (a 1×1 conv written as a
    # broadcast, so the model itself allocates only its output), in a fresh process so the
    # peak RSS belongs to this call: the rise must stay near the 64 MiB output plus one tile
    # batch (~10 MiB), far below holding every window's prediction (~115 MiB more here).
    script = textwrap.dedent("""
        import resource, torch
        from unetkit.inference.tiling import sliding_window
        class Pointwise(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
            def forward(self, x):
                return x * self.scale.view(1, 4, 1, 1)
        net = Pointwise()
        torch.manual_seed(0)
        # away from 0: a pixel at exactly 0 ties all four classes (rand gives one ~1 run in 4)
        image = torch.rand(1, 2048, 2048) + 0.1
        sliding_window(net, image[:, :300, :300], tile=256)  # warm up the allocator
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = sliding_window(net, image, tile=256, overlap=0.25, batch_size=4)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ref = torch.softmax(net(image[None])[0], 0)
        print((after - before) / 1024, *out.shape, float((out - ref).abs().max()))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    rise, *shape, error = (float(v) for v in result.stdout.split())
    assert shape == [4, 2048, 2048]
    assert error < 1e-5  # a pointwise model: tiling changes nothing
    assert rise < 64 + 40, f"peak memory rose by {rise:.0f} MiB"


# --- bounded-memory reduction and the bf16 fast path ------------------------------------
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("dims,size,tile", [(2, (45, 31), (12, 10)), (3, (13, 9, 11), (5, 6, 4))])
def test_banded_reduce_equals_plain_result(blend, dims, size, tile) -> None:
    # Windows that differ per position make every blend weight visible; the band is one
    # tile high, so the image spans several bands and each row is finished exactly once.
    model = TilePosition(dims, 1, 3).eval()
    image = torch.rand(1, *size)
    kw = dict(tile=tile, overlap=0.4, blend=blend, batch_size=3)
    plain = sliding_window(model, image, **kw)
    same = sliding_window(model, image, reduce=lambda p: p.clone(), **kw)
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=1e-6)
    labels = sliding_window(model, image, reduce="argmax", **kw)
    assert labels.dtype == torch.uint8 and labels.shape == size
    assert torch.equal(labels, plain.argmax(0).to(torch.uint8))
    half = sliding_window(model, image, reduce=lambda p: p[1:2].half(), **kw)
    assert half.shape == (1, *size) and half.dtype == torch.float16
    torch.testing.assert_close(half.float(), plain[1:2], atol=1e-3, rtol=1e-3)


def test_reduce_with_overlap_tile_and_out_buffer() -> None:
    model = tiny_valid(out=3)
    image = torch.rand(1, 37, 29)
    plain = overlap_tile(model, image, tile_out=12, activation="probabilities")
    buffer = torch.full((37, 29), 255, dtype=torch.uint8)
    got = overlap_tile(
        model, image, tile_out=12, activation="probabilities", reduce="argmax", out=buffer
    )
    assert got is buffer and torch.equal(got, plain.argmax(0).to(torch.uint8))
    with pytest.raises(InputSizeError, match="uint8 CPU tensor of shape \\(37, 29\\)"):
        overlap_tile(model, image, tile_out=12, reduce="argmax", out=torch.zeros(37, 29))
    with pytest.raises(ConfigError, match="did you mean 'argmax'"):
        predict_tiled(model, image, TileOptions(tile=12), reduce="argmx")


def test_bf16_fast_path_is_close_and_restores_the_model() -> None:
    model = unetkit.create_model("unet", channels=(4, 8), norm="batch").train()
    image = torch.rand(1, 40, 36)
    ref = predict_tiled(model, image, TileOptions(tile=16))
    with runtime.prepared(model, "bf16") as runner:
        fast = predict_tiled(model, image, TileOptions(tile=16), runner=runner)
    assert fast.dtype == torch.float32
    assert 0 < (fast - ref).abs().max() < 3e-2  # bf16 really ran, and stayed close
    assert model.training
    assert all(p.is_contiguous() for p in model.parameters())  # layout given back
    with pytest.raises(ConfigError, match="precision"), runtime.prepared(model, "fp16"):
        pass


def test_banded_argmax_memory_stays_below_the_float_output() -> None:
    # 2048² image, 4 classes: the plain engine holds a 64 MiB float32 sum; the banded
    # argmax holds a 4 MiB uint8 map plus a 256-row band (8 MiB) and one tile batch.
    script = textwrap.dedent("""
        import resource, torch
        from unetkit.inference.tiling import sliding_window
        class Pointwise(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
            def forward(self, x):
                return x * self.scale.view(1, 4, 1, 1)
        net = Pointwise()
        torch.manual_seed(0)
        # away from 0: a pixel at exactly 0 ties all four classes (rand gives one ~1 run in 4)
        image = torch.rand(1, 2048, 2048) + 0.1
        sliding_window(net, image[:, :600, :600], tile=256, reduce="argmax")  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = sliding_window(net, image, tile=256, overlap=0.25, batch_size=4, reduce="argmax")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ref = net(image[None])[0].argmax(0).to(torch.uint8)
        print((after - before) / 1024, int((out != ref).sum()))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    rise, wrong = (float(v) for v in result.stdout.split())
    assert wrong == 0
    assert rise < 40, f"peak memory rose by {rise:.0f} MiB"
