from __future__ import annotations

import numpy as np
import pytest

from unetkit.data.transforms import (
    Compose,
    ElasticDeform,
    IntensityJitter,
    Normalize,
    RandomCrop,
    RandomFlip,
    RandomRot90,
)
from unetkit.errors import ConfigError


def _sample(shape=(12, 15), channels=2, seed=0) -> dict:
    """A sample whose image channels, mask, instances and weight all encode the pixel index,
    so any misalignment between them shows up as unequal values."""
    index = np.arange(int(np.prod(shape))).reshape(shape)
    image = np.stack([index + 1000.0 * c for c in range(channels)]).astype(np.float32)
    return {
        "image": image,
        "mask": index.astype(np.int64),
        "instances": index.astype(np.int32),
        "weight": index.astype(np.float32),
        "name": "s",
    }


def _assert_aligned(sample: dict) -> None:
    for c in range(sample["image"].shape[0]):
        np.testing.assert_array_equal(sample["image"][c] - 1000.0 * c, sample["mask"])
    np.testing.assert_array_equal(sample["instances"], sample["mask"])
    np.testing.assert_array_equal(sample["weight"], sample["mask"])
    assert sample["name"] == "s"


def test_flip_applies_the_same_flip_everywhere_and_is_its_own_inverse():
    s = _sample()
    out = RandomFlip(p=1.0)(s, np.random.default_rng(0))
    _assert_aligned(out)
    np.testing.assert_array_equal(out["mask"], s["mask"][::-1, ::-1])
    back = RandomFlip(p=1.0)(out, np.random.default_rng(0))
    for key in ("image", "mask", "instances", "weight"):
        np.testing.assert_array_equal(back[key], s[key])
    only_w = RandomFlip(axes=[-1], p=1.0)(s, np.random.default_rng(0))
    np.testing.assert_array_equal(only_w["mask"], s["mask"][:, ::-1])
    assert RandomFlip(p=0.0)(s, np.random.default_rng(0)) is s


def test_rot90_rotates_everything_by_the_same_k_and_inverts():
    s = _sample()
    seen = set()
    for seed in range(12):
        out = RandomRot90()(s, np.random.default_rng(seed))
        _assert_aligned(out)
        k = next(k for k in range(4) if np.array_equal(np.rot90(s["mask"], k), out["mask"]))
        np.testing.assert_array_equal(out["image"], np.rot90(s["image"], k, axes=(1, 2)))
        back = np.rot90(out["mask"], -k)
        np.testing.assert_array_equal(back, s["mask"])
        seen.add(k)
    assert seen == {0, 1, 2, 3}


def test_crop_window_is_contiguous_and_aligned():
    s = _sample((20, 30))
    out = RandomCrop((8, 11))(s, np.random.default_rng(3))
    _assert_aligned(out)
    assert out["mask"].shape == (8, 11)
    y0, x0 = divmod(int(out["mask"][0, 0]), 30)
    np.testing.assert_array_equal(out["mask"], s["mask"][y0 : y0 + 8, x0 : x0 + 11])
    starts = {int(RandomCrop(8)(s, np.random.default_rng(i))["mask"][0, 0]) for i in range(10)}
    assert len(starts) > 5  # random positions


def test_crop_pads_small_samples_reflect_for_image_constant_for_labels():
    s = _sample((4, 5))
    out = RandomCrop((9, 5), label_pad=255)(s, np.random.default_rng(1))
    assert out["image"].shape == (2, 9, 5) and out["mask"].shape == (9, 5)
    padded_rows = ~np.isin(out["mask"], s["mask"]).all(axis=1)
    assert padded_rows.sum() == 5
    np.testing.assert_array_equal(out["mask"][padded_rows], 255)
    np.testing.assert_array_equal(out["instances"][padded_rows], 0)
    np.testing.assert_array_equal(out["weight"][padded_rows], 0)
    # Image rows are reflections of real rows: every padded image row equals some real row.
    real = {tuple(r) for r in s["image"][0]}
    assert all(tuple(r) in real for r in out["image"][0])


def test_intensity_jitter_changes_only_the_image_and_follows_the_formula():
    s = _sample()
    s["image"] = np.random.default_rng(0).random((1, 12, 15)).astype(np.float32)
    jitter = IntensityJitter(gain=(2.0, 2.0), bias=(0.5, 0.5), gamma=(1.0, 1.0), noise_std=0.0)
    out = jitter(s, np.random.default_rng(0))
    np.testing.assert_allclose(out["image"], s["image"] * 2 + 0.5, rtol=1e-6)
    for key in ("mask", "instances", "weight"):
        assert out[key] is s[key]
    gamma = IntensityJitter(gain=(1, 1), bias=(0, 0), gamma=(2.0, 2.0), noise_std=0.0)
    img = gamma(s, np.random.default_rng(0))["image"]
    lo, hi = s["image"].min(), s["image"].max()
    np.testing.assert_allclose(img, lo + (hi - lo) * ((s["image"] - lo) / (hi - lo)) ** 2, 1e-5)
    noisy = IntensityJitter(noise_std=0.1)(s, np.random.default_rng(0))["image"]
    assert noisy.dtype == np.float32 and not np.allclose(noisy, s["image"])


def test_elastic_transform_keeps_image_and_labels_aligned():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    mask = ((yy - 20) ** 2 + (xx - 18) ** 2 < 120).astype(np.int64) + (xx > 30)
    s = {
        "image": mask[None].astype(np.float32),
        "mask": mask,
        "instances": mask.astype(np.int32) * 5,
        "weight": np.ones((40, 40), np.float32) * 2,
    }
    out = ElasticDeform(sigma=6.0)(s, rng)
    assert (out["mask"] != mask).any()
    assert set(np.unique(out["mask"])) <= {0, 1, 2}
    np.testing.assert_array_equal(out["instances"], out["mask"] * 5)
    np.testing.assert_allclose(out["weight"], 2.0, atol=1e-9)  # linear: stays constant
    assert (np.rint(out["image"][0]) == out["mask"]).mean() > 0.97


def test_compose_is_deterministic_per_seed_and_works_in_3d():
    aug = Compose([RandomCrop(6), RandomFlip(), RandomRot90(axes=(1, 2)), IntensityJitter()])
    s = _sample((7, 9, 10), channels=1)
    a = aug(s, np.random.default_rng(4))
    b = aug(s, np.random.default_rng(4))
    c = aug(s, np.random.default_rng(5))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (1, 6, 6, 6) and a["mask"].shape == (6, 6, 6)
    assert not np.array_equal(a["mask"], c["mask"])
    geometric = Compose([RandomCrop((5, 8)), RandomFlip(), RandomRot90(axes=(0, 2))])
    out = geometric(s, np.random.default_rng(0))
    _assert_aligned(out)
    out = ElasticDeform(sigma=2.0)(s, np.random.default_rng(0))
    assert out["image"].shape == s["image"].shape


def test_normalize():
    s = _sample(channels=2)
    out = Normalize("zscore")(s)["image"]
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1.0, atol=1e-5)
    pct = Normalize("percentile")(s)["image"]
    np.testing.assert_allclose(np.percentile(pct, [1, 99], axis=(1, 2)).T, [[0, 1]] * 2, atol=1e-5)
    with pytest.raises(ConfigError, match="did you mean 'zscore'"):
        Normalize("zscor")


def test_bad_transform_arguments():
    with pytest.raises(ConfigError, match="size"):
        RandomCrop(0)
    with pytest.raises(ConfigError, match="more axes"):
        RandomCrop((2, 2, 2))(_sample(), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="axis 2 out of range"):
        RandomRot90(axes=(0, 2))(_sample(), np.random.default_rng(0))


def test_center_crop_moves_every_spatial_key_together():
    from unetkit.data.transforms import CenterCrop

    image = np.arange(2 * 7 * 9, dtype=np.float32).reshape(2, 7, 9)
    sample = {"image": image, "mask": image[0].astype(np.int64), "name": "a"}
    out = CenterCrop(lambda shape: (5, 6))(sample)
    assert out["image"].shape == (2, 5, 6) and out["mask"].shape == (5, 6)
    np.testing.assert_array_equal(out["image"][0], image[0, 1:6, 1:7])
    np.testing.assert_array_equal(out["mask"], out["image"][0])
    assert CenterCrop(lambda shape: (50, 50))(sample)["image"].shape == (2, 7, 9)
