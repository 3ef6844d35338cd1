"""Test-time augmentation: exact inverses, group sizes, numpy references, equivariant models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import unetkit
from unetkit.errors import ConfigError
from unetkit.inference import TileOptions
from unetkit.inference.tiling import overlap_tile, predict_tiled, sliding_window
from unetkit.inference.tta import TTATransform, tta_predict, tta_transforms
from unetkit.models.base import SegmentationModel


def symmetric_conv(dims: int, rot90: bool = False, padding: int = 1) -> nn.Module:
    """A 3×3(×3) conv whose kernels are mirror-symmetric on every axis (and symmetric under
    transposing the last two axes if ``rot90``): with zero padding it commutes exactly with
    flips (and quarter turns), while its output still depends on the neighbours."""
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](2, 3, 3, padding=padding)
    with torch.no_grad():
        w = conv.weight
        for axis in range(2, 2 + dims):
            w.copy_((w + w.flip(axis)) / 2)
        if rot90:
            w.copy_((w + w.transpose(-1, -2)) / 2)
    return conv.eval()


class ValidSymmetric(SegmentationModel):
    """Valid-padding 3×3 conv with flip-symmetric kernels (margin 1, shift period 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.dims, self.in_channels, self.out_channels = 2, 2, 3
        self.conv = symmetric_conv(2, padding=0)

    def _output_length(self, n: int) -> int | None:
        return n - 2 if n > 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SameSymmetric(ValidSymmetric):
    def __init__(self) -> None:
        super().__init__()
        self.conv = symmetric_conv(2, rot90=True)

    def _output_length(self, n: int) -> int | None:
        return n


def test_group_sizes_identity_first_and_all_distinct() -> None:
    x3 = torch.rand(1, 1, 4, 4, 4)
    for dims, mode, count in [
        (1, "flip", 2),
        (2, "flip", 4),
        (3, "flip", 8),
        (2, "flip_rot90", 8),
        (3, "flip_rot90", 16),
    ]:
        ts = tta_transforms(dims, mode)
        assert len(ts) == count and ts[0].is_identity
        x = x3[(0,) * (3 - dims)] if dims < 3 else x3
        images = {t.apply(x).numpy().tobytes() for t in ts}
        assert len(images) == count  # no transform repeats another


def test_bad_modes_raise() -> None:
    with pytest.raises(ConfigError, match="flip_rot90.*dims=1"):
        tta_transforms(1, "flip_rot90")
    with pytest.raises(ConfigError, match="did you mean 'flip'"):
        tta_transforms(2, "flp")


@pytest.mark.parametrize("dims,mode", [(1, "flip"), (2, "flip_rot90"), (3, "flip_rot90")])
def test_inverse_is_exact_also_for_non_square(dims: int, mode: str) -> None:
    x = torch.rand(2, 3, *[5, 7, 4][:dims])
    for t in tta_transforms(dims, mode):
        assert torch.equal(t.invert(t.apply(x)), x)
        assert torch.equal(t.apply(t.invert(x)), x)


def test_apply_matches_numpy() -> None:
    x = torch.rand(1, 2, 3, 6, 5)
    t = TTATransform(3, flip_axes=(0, 2), rot90=3)
    ref = np.rot90(np.flip(x.numpy(), (2, 4)), 3, axes=(3, 4))
    np.testing.assert_array_equal(t.apply(x).numpy(), ref)


def test_tta_predict_is_the_mean_of_un_flipped_predictions() -> None:
    net = nn.Conv2d(1, 2, 3, padding=1).eval()  # not flip-equivariant
    x = torch.rand(1, 1, 6, 7)
    with torch.no_grad():
        got = tta_predict(net, x, tta_transforms(2, "flip"))
        preds = []
        for axes in [(), (2,), (3,), (2, 3)]:
            xa = torch.from_numpy(np.flip(x.numpy(), axes).copy())
            preds.append(np.flip(net(xa).numpy(), axes))
    np.testing.assert_allclose(got.numpy(), np.mean(preds, axis=0), atol=1e-6)
    assert not np.allclose(preds[0], preds[1], atol=1e-3)  # the augmentation mattered


@pytest.mark.parametrize("dims,mode", [(1, "flip"), (2, "flip"), (3, "flip"), (2, "flip_rot90")])
def test_equivariant_model_is_unchanged_by_tta(dims: int, mode: str) -> None:
    net = symmetric_conv(dims, rot90=mode == "flip_rot90")
    x = torch.rand(2, 2, *[9, 8, 7][:dims])
    with torch.no_grad():
        torch.testing.assert_close(
            tta_predict(net, x, tta_transforms(dims, mode)), net(x), atol=1e-5, rtol=0
        )


def test_tiled_tta_with_equivariant_models_equals_no_tta() -> None:
    image = torch.rand(2, 23, 19)
    same = SameSymmetric().eval()
    for tta in (True, "flip_rot90"):
        torch.testing.assert_close(
            sliding_window(same, image, tile=(10, 8), overlap=0.5, tta=tta),
            sliding_window(same, image, tile=(10, 8), overlap=0.5),
            atol=1e-5,
            rtol=0,
        )
    valid = ValidSymmetric().eval()
    torch.testing.assert_close(
        overlap_tile(valid, image, tile_out=7, tta="flip"),
        overlap_tile(valid, image, tile_out=7),
        atol=1e-5,
        rtol=0,
    )


def test_predict_tiled_tta_changes_a_real_model_and_keeps_probabilities() -> None:
    net = unetkit.create_model("unet", channels=(4, 8), norm="none")
    image = torch.rand(1, 24, 20)
    plain = predict_tiled(net, image)
    aug = predict_tiled(net, image, TileOptions(tta=True))
    torch.testing.assert_close(aug.sum(0), torch.ones(24, 20))  # mean of probabilities
    assert (aug - plain).abs().max() > 1e-4
