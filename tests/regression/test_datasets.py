from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from unetkit.data.transforms import Compose, ElasticDeform, RandomCrop, RandomFlip, RandomRot90
from unetkit.errors import ConfigError, DataError
from unetkit.regression.datasets import FolderRegressionDataset
from unetkit.regression.io import write_pfm


def _folder(tmp_path, shape=(6, 8)):
    """Four images with targets in four formats; the image value encodes the depth."""
    g = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "targets").mkdir()
    depths = {}
    for i, suffix in enumerate((".png", ".npy", ".pfm", ".tif")):
        name = f"img{i}"
        depth = np.round(g.uniform(1, 50, shape) * 256) / 256  # exact in KITTI's 1/256 steps
        depth[0, 0] = 0.0  # a missing pixel
        Image.fromarray(np.uint8(np.clip(depth * 5, 0, 255))).save(
            tmp_path / "images" / f"{name}.png"
        )
        path = tmp_path / "targets" / f"{name}{suffix}"
        if suffix == ".png":
            Image.fromarray(np.uint16(depth * 256)).save(path)
        elif suffix == ".npy":
            np.save(path, depth * 256)
        elif suffix == ".pfm":
            write_pfm(path, depth * 256)
        else:
            tifffile.imwrite(path, (depth * 256).astype(np.float32))
        depths[name] = depth
    return depths


def test_pairs_images_with_targets_of_any_format(tmp_path):
    depths = _folder(tmp_path)
    ds = FolderRegressionDataset(tmp_path, target_scale=1 / 256)
    assert len(ds) == 4
    ds.validate()
    for i in range(4):
        s = ds[i]
        assert set(s) == {"image", "target", "valid", "name"}
        assert s["image"].dtype == torch.float32 and s["image"].shape == (1, 6, 8)
        assert s["target"].dtype == torch.float32 and s["target"].shape == (1, 6, 8)
        assert s["valid"].dtype == torch.bool and s["valid"].shape == (6, 8)
        depth = depths[s["name"]]
        np.testing.assert_allclose(s["target"][0].numpy(), depth, rtol=1e-6)
        np.testing.assert_array_equal(s["valid"].numpy(), depth > 0)
    # the pair form, and signed targets (0 is a value then)
    ds2 = FolderRegressionDataset(
        (tmp_path / "images", tmp_path / "targets"), positive=False, target_scale=1 / 256
    )
    assert bool(ds2[0]["valid"].all())


def test_missing_values_become_zero_targets_with_valid_false(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "targets").mkdir()
    Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / "images" / "a.png")
    t = np.full((3, 4), 2.0, np.float32)
    t[0, 0], t[1, 1], t[2, 2] = np.nan, np.inf, -1.0
    np.save(tmp_path / "targets" / "a.npy", t)
    s = FolderRegressionDataset(tmp_path)[0]
    assert torch.isfinite(s["target"]).all()
    bad = [(0, 0), (1, 1), (2, 2)]
    assert [tuple(ix) for ix in (~s["valid"]).nonzero().tolist()] == bad
    assert all(float(s["target"][0, y, x]) == 0.0 for y, x in bad)


def test_folder_errors_name_the_files(tmp_path):
    with pytest.raises(DataError, match="targets.*folder not found"):
        (tmp_path / "images").mkdir()
        FolderRegressionDataset(tmp_path)
    (tmp_path / "targets").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "images" / "b.png")
    np.save(tmp_path / "targets" / "a.npy", np.ones((4, 5)))
    with pytest.raises(DataError, match=r"without a target: .*b\.png"):
        FolderRegressionDataset(tmp_path)
    np.save(tmp_path / "targets" / "b.npy", np.ones((4, 4)))
    ds = FolderRegressionDataset(tmp_path)
    with pytest.raises(DataError, match=r"a\.png \(4×4\) and its target .*a\.npy \(4×5\)"):
        ds[0]
    with pytest.raises(DataError, match="1 of 2 samples are invalid"):
        ds.validate()
    np.save(tmp_path / "targets" / "b.npy.npy", np.ones((4, 4)))  # stem "b.npy": an orphan
    write_pfm(tmp_path / "targets" / "b.pfm", np.ones((4, 4)))
    with pytest.raises(DataError, match="two targets for one image"):
        FolderRegressionDataset(tmp_path)
    with pytest.raises(ConfigError, match="target_scale"):
        FolderRegressionDataset(tmp_path, target_scale=0)


def _aligned_sample(shape=(20, 24)):
    index = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    valid = np.ones(shape, bool)
    valid[5:8, 6:9] = False
    return {
        "image": np.stack([index, index + 1000]),
        "target": np.stack([index * 2, index * 3]).astype(np.float32),
        "valid": valid,
        "name": "s",
    }


def test_geometric_transforms_keep_target_and_valid_aligned_with_the_image():
    s = _aligned_sample()
    aug = Compose([RandomCrop((15, 11)), RandomFlip(), RandomRot90()])
    for seed in range(8):
        out = aug(s, np.random.default_rng(seed))
        index = out["image"][0]
        np.testing.assert_array_equal(out["target"][0], index * 2)
        np.testing.assert_array_equal(out["target"][1], index * 3)
        flat = index.astype(int).ravel()
        np.testing.assert_array_equal(out["valid"].ravel(), s["valid"].ravel()[flat])
    padded = RandomCrop((26, 30))(s, np.random.default_rng(0))
    assert padded["target"].shape == (2, 26, 30) and padded["valid"].shape == (26, 30)
    # padding is not ground truth: valid False, target 0 (index 0 gives the only other zeros)
    assert padded["valid"].sum() == s["valid"].sum()
    assert (padded["target"] == 0).sum() == 2 * (26 * 30 - 20 * 24) + 2


def test_elastic_warps_target_with_image_and_never_mixes_in_missing_pixels():
    h, w = 32, 32
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = 0.5 * yy + 0.25 * xx  # cubic and linear interpolation agree on a linear ramp
    valid = np.ones((h, w), bool)
    valid[10:14, 12:20] = False
    target = np.where(valid, 5.0, 0.0).astype(np.float32)[None]
    sample = {"image": ramp[None].copy(), "target": np.stack([ramp, target[0]]), "valid": valid}
    out = ElasticDeform(sigma=3.0)(sample, np.random.default_rng(4))
    inner = (slice(6, -6), slice(6, -6))  # away from the mirrored border
    np.testing.assert_allclose(out["target"][0][inner], out["image"][0][inner], atol=1e-3)
    assert out["valid"].dtype == bool
    assert 0 < (~out["valid"]).sum() < h * w
    # where valid, the warped constant is exactly 5: no blend with the 0 of a missing pixel
    np.testing.assert_allclose(out["target"][1][out["valid"]], 5.0, atol=1e-5)
    assert not np.array_equal(out["valid"], valid)


def test_dataset_with_transform_returns_aligned_tensors(tmp_path):
    _folder(tmp_path, shape=(12, 10))
    aug = Compose([RandomCrop(8), RandomFlip(), RandomRot90()])
    ds = FolderRegressionDataset(tmp_path, transform=aug, target_scale=1 / 256, seed=3)
    plain = FolderRegressionDataset(tmp_path, target_scale=1 / 256)
    for i in range(len(ds)):
        s, ref = ds[i], plain[i]
        assert s["target"].shape == (1, 8, 8) and s["image"].shape == (1, 8, 8)
        # image = floor(depth * 5) / 255 everywhere: the pairing survives augmentation
        expected = np.floor(np.clip(s["target"][0].numpy() * 5, 0, 255)) / 255
        v = s["valid"].numpy()
        np.testing.assert_allclose(s["image"][0].numpy()[v], expected[v], atol=1e-6)
        assert s["valid"].sum() <= ref["valid"].sum()
    ds.set_epoch(1)
    assert not all(torch.equal(ds[i]["target"], plain[i]["target"][:, :8, :8]) for i in range(4))
