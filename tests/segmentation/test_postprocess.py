"""Post-processing: labels, instance separation, object tables and CSV output."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import regionprops
from skimage.segmentation import find_boundaries

from unetkit.errors import ConfigError, DataError
from unetkit.segmentation.instances import match_instances
from unetkit.segmentation.postprocess import (
    count_instances,
    instances_from_boundary,
    instances_from_distance,
    instances_from_semantic,
    object_table,
    probabilities_to_labels,
    remove_small_objects,
    write_object_table_csv,
)


def _touching_disks(shape=(32, 36), centres=((16, 12), (16, 23)), radius=7.5):
    """Instance image of two overlapping disks split by their bisector (labels 1, 2)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dist = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])
    inside = dist < radius
    labels = np.where(inside.any(0), np.argmin(np.where(inside, dist, np.inf), 0) + 1, 0)
    return labels


def _three_class(labels):
    boundary = find_boundaries(labels, mode="inner")
    return np.where(labels > 0, np.where(boundary, 2, 1), 0)


def test_probabilities_to_labels():
    probs = np.zeros((3, 2, 2))
    probs[2, 0, 0] = probs[1, 1, 1] = 1.0
    assert probabilities_to_labels(torch.from_numpy(probs)).tolist() == [[2, 0], [0, 1]]
    sig = np.array([[[0.2, 0.6], [0.5, 0.9]]])
    assert probabilities_to_labels(sig).tolist() == [[0, 1], [0, 1]]
    assert probabilities_to_labels(sig, threshold=0.1).sum() == 4
    with pytest.raises(DataError, match="channel"):
        probabilities_to_labels(np.zeros(4))


def test_instances_from_semantic_matches_scipy_and_min_size():
    rng = np.random.default_rng(0)
    mask = (ndimage.gaussian_filter(rng.random((40, 40)), 2) > 0.5).astype(np.uint8)
    ref, n = ndimage.label(mask)
    inst = instances_from_semantic(mask)
    assert inst.dtype == np.int32 and count_instances(inst) == n
    # same partition as scipy (labels may differ): each pair maps one-to-one
    pairs = set(zip(inst[mask > 0].tolist(), ref[mask > 0].tolist(), strict=True))
    assert len(pairs) == n
    areas = np.bincount(ref.ravel())[1:]
    big = instances_from_semantic(mask, min_size=20)
    assert count_instances(big) == int((areas >= 20).sum())
    assert sorted(np.bincount(big.ravel())[1:].tolist()) == sorted(areas[areas >= 20].tolist())
    # touching pixels of different classes stay apart; labels in raster order
    assert instances_from_semantic(np.array([1, 1, 2, 2, 0, 1])).tolist() == [1, 1, 2, 2, 0, 3]


def test_two_touching_disks_with_boundary_ring_separate():
    truth = _touching_disks()
    three = _three_class(truth)
    # the foreground alone is one connected blob...
    assert count_instances(instances_from_semantic(three > 0)) == 1
    # ...the boundary class splits it
    inst = instances_from_boundary(three)
    assert count_instances(inst) == 2
    m = match_instances(inst, truth, threshold=0.9)
    assert m.tp == 2
    assert np.array_equal(inst > 0, truth > 0)  # the boundary ring is given back
    # the same from soft, noisy probabilities
    rng = np.random.default_rng(1)
    onehot = np.stack([three == k for k in range(3)]).astype(float)
    logits = 4 * onehot + rng.normal(0, 0.5, onehot.shape)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    soft = instances_from_boundary(torch.from_numpy(probs), min_seed_size=3)
    assert count_instances(soft) == 2
    assert match_instances(soft, truth, threshold=0.8).tp == 2


def test_unseeded_boundary_objects_and_min_size():
    three = np.zeros((10, 12), int)
    three[1:6, 1:6] = 2
    three[2:5, 2:5] = 1  # a cell with interior
    three[7:9, 8:10] = 2  # a tiny cell predicted as all boundary
    assert count_instances(instances_from_boundary(three)) == 2
    assert count_instances(instances_from_boundary(three, keep_unseeded=False)) == 1
    assert count_instances(instances_from_boundary(three, min_size=5)) == 1
    with pytest.raises(DataError, match=r"2 \(boundary\)"):
        instances_from_boundary(np.full((3, 3), 3))


def test_instances_from_distance_splits_overlapping_disks():
    truth = _touching_disks()
    inst = instances_from_distance(truth > 0)
    assert count_instances(inst) == 2
    assert match_instances(inst, truth, threshold=0.8).tp == 2
    single = _touching_disks(centres=((16, 16),))
    assert count_instances(instances_from_distance(single > 0)) == 1
    # 3-D: two touching balls
    zz, yy, xx = np.mgrid[:16, :16, :26]
    balls = (np.hypot(np.hypot(zz - 8, yy - 8), xx - 7) < 6) | (
        np.hypot(np.hypot(zz - 8, yy - 8), xx - 17) < 6
    )
    assert count_instances(instances_from_distance(balls)) == 2


def test_remove_small_objects_int_and_bool():
    inst = np.array([[1, 1, 0, 4], [1, 0, 0, 4], [0, 7, 0, 0]])
    out = remove_small_objects(inst, 2)
    assert out.tolist() == [[1, 1, 0, 4], [1, 0, 0, 4], [0, 0, 0, 0]]
    assert remove_small_objects(inst, 3, relabel=True).tolist() == [
        [1, 1, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
    ]
    huge = np.where(inst > 0, inst.astype(np.int64) * 10**12, 0)  # sparse labels are fine
    assert np.array_equal(remove_small_objects(huge, 2) > 0, out > 0)
    assert [r["area"] for r in object_table(huge)] == [3, 2, 1]
    binary = inst > 0
    kept = remove_small_objects(binary, 3)
    assert kept.dtype == bool and kept.sum() == 3


@pytest.mark.parametrize("shape", [(15,), (12, 14), (6, 7, 8)])
def test_object_table_matches_numpy(shape):
    rng = np.random.default_rng(len(shape))
    inst = rng.integers(0, 5, shape) * 3  # labels 3, 6, 9, 12
    image = rng.random(shape)
    rows = object_table(inst, image)
    assert [r["label"] for r in rows] == [3, 6, 9, 12]
    axes = {1: ["x"], 2: ["y", "x"], 3: ["z", "y", "x"]}[len(shape)]
    for row in rows:
        where = np.argwhere(inst == row["label"])
        assert row["area"] == len(where)
        for k, name in enumerate(axes):
            assert row[f"centroid_{name}"] == pytest.approx(where[:, k].mean())
        assert row["mean_intensity"] == pytest.approx(image[inst == row["label"]].mean())


def test_object_table_agrees_with_regionprops_and_multichannel():
    inst = _touching_disks()
    image = np.stack([inst * 1.0, np.ones(inst.shape)])
    rows = object_table(inst, image)
    for row, prop in zip(rows, regionprops(inst), strict=True):
        assert row["label"] == prop.label and row["area"] == prop.area
        assert (row["centroid_y"], row["centroid_x"]) == pytest.approx(prop.centroid)
        assert row["mean_intensity_0"] == pytest.approx(prop.label)
        assert row["mean_intensity_1"] == pytest.approx(1.0)
    assert object_table(np.zeros((3, 3), int)) == []
    with pytest.raises(DataError, match="image shape"):
        object_table(inst, np.zeros((2, 2)))


def test_write_object_table_csv_roundtrip(tmp_path):
    inst = _touching_disks()
    rows = object_table(inst)
    path = tmp_path / "out" / "cells.csv"
    write_object_table_csv(rows, path)
    with open(path, newline="") as f:
        back = list(csv.DictReader(f))
    assert [int(r["label"]) for r in back] == [1, 2]
    assert [int(r["area"]) for r in back] == [r["area"] for r in rows]
    assert float(back[0]["centroid_x"]) == pytest.approx(rows[0]["centroid_x"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["cells.csv"]  # no temp files left
    write_object_table_csv([], path)
    assert path.read_text() == "label,area,centroid_y,centroid_x\n"


@pytest.mark.parametrize("spacing", [(0.5, 0.25), (2.0, 0.65, 0.65)])
def test_object_table_physical_units_agree_with_regionprops_spacing(spacing):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, size=(6, 9, 11)[-len(spacing):])
    rows = object_table(labels, pixel_size=spacing)
    size_key = "area_um2" if len(spacing) == 2 else "volume_um3"
    axes = ("y", "x") if len(spacing) == 2 else ("z", "y", "x")
    for row, region in zip(rows, regionprops(labels, spacing=spacing), strict=True):
        assert row["label"] == region.label
        assert row[size_key] == pytest.approx(region.area)
        for axis, value in zip(axes, region.centroid, strict=True):
            assert row[f"centroid_{axis}_um"] == pytest.approx(value)
    with pytest.raises(ConfigError, match="pixel_size"):
        object_table(labels, pixel_size=(1.0,) * (len(spacing) + 1))
