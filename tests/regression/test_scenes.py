"""The synthetic scenes: determinism, and depth that agrees with the scene's geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unetkit.errors import ConfigError
from unetkit.regression.datasets import SyntheticDenoiseDataset, SyntheticDepthDataset
from unetkit.regression.scenes import (
    MAX_RANGE,
    Scene,
    Sphere,
    random_scene,
    render_scene,
    synth_depth,
)


def test_deterministic_per_seed_and_index():
    a_img, a_depth = synth_depth((48, 64), seed=(0, 3))
    b_img, b_depth = synth_depth((48, 64), seed=(0, 3))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_depth, b_depth)
    c_img, _ = synth_depth((48, 64), seed=(0, 4))
    assert not np.array_equal(a_img, c_img)
    ds = SyntheticDepthDataset(3, shape=(32, 40), seed=5)
    first = ds[1]
    first["target"].mul_(0)  # samples are copies: the cache is untouched
    again, fresh = ds[1], SyntheticDepthDataset(3, shape=(32, 40), seed=5)[1]
    assert torch.equal(again["target"], fresh["target"]) and float(again["target"].max()) > 1
    assert again["image"].shape == (3, 32, 40) and ds[0]["name"] == "scene_00000"
    assert SyntheticDepthDataset(1, shape=(16, 16), channels=1)[0]["image"].shape == (1, 16, 16)


def test_depth_range_and_invalid_sky():
    for seed in range(6):
        scene = random_scene((40, 48), np.random.default_rng(seed))
        _, depth, ids = render_scene(scene)
        ok = np.isfinite(depth)
        assert ok.mean() > 0.4
        assert np.all(depth[ok] > 0.5) and np.all(depth[ok] <= MAX_RANGE)
        assert np.all(~ok[ids == 0])  # the sky has no depth


def _backproject(scene, depth):
    return depth[..., None].astype(np.float64) * scene.rays()


@pytest.mark.parametrize("seed", range(4))
def test_depth_lies_on_the_surfaces_and_objects_are_nearer_than_the_background(seed):
    scene = random_scene((64, 80), np.random.default_rng(seed))
    _, depth, ids = render_scene(scene)
    rays = scene.rays()
    points = _backproject(scene, depth)
    ok = np.isfinite(depth)
    # the optical axis: P·z_cam equals the depth
    z_cam = scene.camera_axes()[:, 2]
    np.testing.assert_allclose((points @ z_cam)[ok], depth[ok], rtol=1e-6)
    ground = ok & (ids == 1)
    assert ground.any()
    np.testing.assert_allclose(points[ground, 1], scene.height, atol=1e-4)  # y is down
    if scene.wall_normal is not None and (ids == 2).any():
        wall = ok & (ids == 2)
        np.testing.assert_allclose(
            points[wall] @ np.asarray(scene.wall_normal), scene.wall_offset, atol=1e-4
        )
    # background depth by the plane equations: ground y = h, wall n·P = offset
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(rays[..., 1] > 0, scene.height / rays[..., 1], np.inf)
        t_wall = np.full(depth.shape, np.inf)
        if scene.wall_normal is not None:
            nd = rays @ np.asarray(scene.wall_normal)
            t_wall = np.where(nd > 0, scene.wall_offset / nd, np.inf)
    background = np.minimum(t_ground, t_wall)
    for k, sphere in enumerate(scene.spheres, start=3):
        m = ok & (ids == k)
        if not m.any():
            continue
        dist = np.linalg.norm(points[m] - np.asarray(sphere.centre), axis=-1)
        np.testing.assert_allclose(dist, sphere.radius, atol=1e-4 * MAX_RANGE)
        assert np.all(depth[m] < background[m] + 1e-4)  # in front of the ground/wall behind
    first_box = 3 + len(scene.spheres)
    for k, box in enumerate(scene.boxes, start=first_box):
        m = ok & (ids == k)
        if not m.any():
            continue
        c, s = math.cos(box.yaw), math.sin(box.yaw)
        rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
        local = (points[m] - np.asarray(box.centre)) @ rot
        # on the surface: inside the box, and on one face
        rel = np.abs(local) / np.asarray(box.half)
        assert np.all(rel <= 1 + 1e-3)
        np.testing.assert_allclose(rel.max(axis=-1), 1.0, atol=1e-3)
        assert np.all(depth[m] < background[m] + 1e-4)


def _one_sphere_scene(shape=(48, 64)):
    return Scene(
        shape=shape,
        focal=60.0,
        pitch=math.radians(10),
        height=1.5,
        light=(0.0, -math.sqrt(0.5), math.sqrt(0.5)),  # from above, behind the camera
        ambient=0.3,
        ground_colours=((0.6, 0.6, 0.6), (0.6, 0.6, 0.6)),
        checker=1.0,
        wall_normal=None,
        wall_offset=-8.0,
        wall_colour=(0.5, 0.5, 0.5),
        spheres=(Sphere((0.3, 1.0, 4.0), 0.5, (0.8, 0.4, 0.2)),),
        boxes=(),
    )


def test_lambertian_shading_and_cast_shadow_on_a_hand_made_scene():
    scene = _one_sphere_scene()
    image, depth, ids = render_scene(scene)  # no rng: no texture, no noise
    light = np.asarray(scene.light)
    points = _backproject(scene, depth)
    sphere = scene.spheres[0]
    m = ids == 3
    assert m.sum() > 50
    normal = (points[m] - np.asarray(sphere.centre)) / sphere.radius
    shade = scene.ambient + (1 - scene.ambient) * np.clip(normal @ light, 0, None)
    expected = shade[:, None] * np.asarray(sphere.colour)
    np.testing.assert_allclose(image[m], expected, atol=2e-3)
    # the ground: lit unless the segment towards the light passes within r of the centre
    g = ids == 1
    to_centre = np.asarray(sphere.centre) - points[g]
    along = to_centre @ light
    closest = np.linalg.norm(to_centre - along[:, None] * light, axis=-1)
    shadow = (along > 0) & (closest < sphere.radius - 1e-3)
    lit = (along <= 0) | (closest > sphere.radius + 1e-3)
    assert shadow.sum() > 10
    ground_lit = scene.ambient + (1 - scene.ambient) * light @ np.array([0.0, -1.0, 0.0])
    np.testing.assert_allclose(image[g][shadow], 0.6 * scene.ambient, atol=2e-3)
    np.testing.assert_allclose(image[g][lit], 0.6 * ground_lit, atol=2e-3)


def test_denoise_dataset_pairs_noisy_input_with_clean_target():
    ds = SyntheticDenoiseDataset(3, shape=(40, 40), seed=2, noise=(0.1, 0.1))
    s = ds[0]
    assert s["image"].shape == s["target"].shape == (1, 40, 40)
    assert bool(s["valid"].all())
    residual = (s["image"] - s["target"]).numpy()
    assert abs(residual.std() - 0.1) < 0.01 and abs(residual.mean()) < 0.01
    again = SyntheticDenoiseDataset(3, shape=(40, 40), seed=2, noise=(0.1, 0.1))[0]
    assert torch.equal(again["image"], s["image"]) and torch.equal(again["target"], s["target"])
    assert SyntheticDenoiseDataset(1, shape=(16, 16), channels=3)[0]["target"].shape[0] == 3


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="shape"):
        synth_depth((4, 4), seed=0)
    with pytest.raises(ConfigError, match="channels"):
        SyntheticDepthDataset(2, channels=2)
    with pytest.raises(ConfigError, match="n=0"):
        SyntheticDepthDataset(0)
    with pytest.raises(ConfigError, match="noise"):
        SyntheticDenoiseDataset(2, noise=(0.3, 0.1))
