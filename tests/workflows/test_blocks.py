"""Block sources and normalisation statistics against the whole-image computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unetkit.data.io import to_float_image, write_image
from unetkit.data.transforms import Normalize
from unetkit.workflows import block_sources
from unetkit.workflows.block_sources import normalization_stats, normalize, open_source
from unetkit.workflows.blocks import block_grid


@pytest.fixture()
def rgb(tmp_path: Path) -> tuple[Path, np.ndarray]:
    pixels = np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    write_image(path, pixels)
    return path, pixels


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_small_image_statistics_are_normalizes_own(rgb, mode: str) -> None:
    path, pixels = rgb
    source = open_source(str(path))
    image = to_float_image(pixels)
    expected = Normalize(mode)({"image": image})["image"]
    got = normalize(image, normalization_stats(source, mode, 32))
    np.testing.assert_array_equal(got, expected)  # bit for bit
    part = normalize(image[:, 10:40, 5:60], normalization_stats(source, mode, 32))
    np.testing.assert_array_equal(part, expected[:, 10:40, 5:60])


def test_checkpoint_percentiles_and_picked_channels(rgb) -> None:
    """A checkpoint's own percentiles (e.g. CSBDeep's 1, 99.8) and ``--channels 2,0``
    give what ``Normalize`` gives on the picked channels of the whole image."""
    path, pixels = rgb
    source = open_source(str(path), channels=(2, 0))
    image = to_float_image(pixels, channels=(2, 0))
    expected = Normalize("percentile", percentiles=(1, 99.8))({"image": image})["image"]
    stats = normalization_stats(source, "percentile", 32, (1, 99.8))
    np.testing.assert_array_equal(
        normalize(source.pixels(slice(None), slice(None)), stats), expected
    )


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_large_image_statistics_from_blocks(rgb, mode: str, monkeypatch) -> None:
    path, pixels = rgb
    monkeypatch.setattr(block_sources, "EXACT_STATS_PIXELS", 100)  # force the block-wise path
    monkeypatch.setattr(block_sources, "_SAMPLE_PIXELS", 1600)  # percentiles from a 1/4 sample
    centre, scale = normalization_stats(open_source(str(path)), mode, 32)
    flat = to_float_image(pixels).reshape(3, -1).astype(np.float64)
    if mode == "zscore":
        np.testing.assert_allclose(centre, flat.mean(1), rtol=1e-6)
        np.testing.assert_allclose(scale, flat.std(1), rtol=1e-6)
    else:  # a strided sample: close to the exact percentiles of a uniform image
        low, high = np.percentile(flat, [1, 99], axis=1)
        np.testing.assert_allclose(centre, low, atol=0.02)
        np.testing.assert_allclose(centre + scale, high, atol=0.02)


def test_block_grid_covers_the_image_once() -> None:
    cover = np.zeros((100, 70), int)
    for b in block_grid((100, 70), 32):
        cover[b.slices] += 1
        grown = b.grown(8, (100, 70))
        assert grown.y0 >= 0 and grown.x1 <= 70
        np.testing.assert_array_equal(
            np.arange(100)[grown.slices[0]][b.within(grown)[0]], np.arange(b.y0, b.y1)
        )
    assert (cover == 1).all()
