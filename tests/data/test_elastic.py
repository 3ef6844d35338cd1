from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unetkit.data.elastic import displacement_field, elastic_deform, warp
from unetkit.errors import ConfigError


def _blobs(shape=(48, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape), 4)
    return np.digitize(smooth, np.quantile(smooth, [0.3, 0.6, 0.8])).astype(np.int64)


def test_field_is_the_bicubic_interpolant_of_the_coarse_grid():
    # Reference: scipy's own 2D cubic spline evaluated on the coarse grid.
    shape, grid, sigma = (37, 49), 3, 10.0
    field = displacement_field(shape, rng=np.random.default_rng(3), grid=grid, sigma=sigma)
    coarse = np.random.default_rng(3).normal(0.0, sigma, size=(2, grid, grid))
    coords = np.meshgrid(*(np.linspace(0, grid - 1, n) for n in shape), indexing="ij")
    for c in range(2):
        ref = ndimage.map_coordinates(coarse[c], coords, order=3, mode="mirror")
        np.testing.assert_allclose(field[c], ref, atol=1e-10)
    # Corners and centre are control points: the field equals the Gaussian draws there.
    controls = field[:, [0, 18, 36]][:, :, [0, 24, 48]]
    np.testing.assert_allclose(controls, coarse, atol=1e-10)


def test_displacement_statistics():
    shape, sigma = (9, 9), 10.0
    rng = np.random.default_rng(0)
    fields = np.stack([displacement_field(shape, rng=rng, sigma=sigma) for _ in range(2000)])
    at_controls = fields[:, :, ::4, ::4]  # control points at 0, 4, 8
    assert abs(at_controls.mean()) < 0.3
    assert at_controls.std() == pytest.approx(sigma, rel=0.03)
    # Between control points the spline averages neighbours: smaller spread, still smooth.
    between = fields[:, :, 2, 2]
    assert 0.3 * sigma < between.std() < sigma
    step = np.abs(np.diff(fields, axis=-1)).max()
    assert step < 4 * sigma  # no jumps from pixel to pixel


def test_warp_follows_the_field_exactly_for_linear_content():
    shape = (40, 50)
    field = displacement_field(shape, rng=np.random.default_rng(1), sigma=3.0)
    ramp = np.indices(shape).astype(np.float64)  # value = own coordinate
    out = warp(ramp, field, order=1)
    target = ramp + field
    inside = np.all((target >= 0) & (target <= np.array(shape)[:, None, None] - 1), axis=0)
    assert inside.mean() > 0.6
    np.testing.assert_allclose(out[:, inside], target[:, inside], atol=1e-9)


def test_zero_sigma_is_identity():
    img = np.random.default_rng(0).random((2, 20, 30))
    labels = _blobs((20, 30))
    out_img, out_lab = elastic_deform([img, labels], rng=np.random.default_rng(0), sigma=0.0)
    np.testing.assert_allclose(out_img, img, atol=1e-9)
    np.testing.assert_array_equal(out_lab, labels)


def test_labels_stay_in_the_label_set_and_keep_dtype():
    labels = _blobs() * 7 + 3  # values {3, 10, 17, 24}
    for dtype in (np.int64, np.uint16, np.int32):
        (out,) = elastic_deform([labels.astype(dtype)], rng=np.random.default_rng(5), sigma=10.0)
        assert out.dtype == dtype
        assert set(np.unique(out)) <= set(np.unique(labels))
        assert (out != labels).any()
    (out,) = elastic_deform([labels > 10], rng=np.random.default_rng(5))
    assert out.dtype == bool


def test_image_equal_to_mask_stays_aligned():
    labels = _blobs()
    image = labels[None].astype(np.float32)
    # Same order: exactly equal. Cubic image vs nearest labels: equal up to edge pixels.
    img0, lab0 = elastic_deform([image, labels], rng=np.random.default_rng(2), orders=[0, 0])
    np.testing.assert_array_equal(img0[0], lab0)
    img3, lab3 = elastic_deform([image, labels], rng=np.random.default_rng(2))
    assert img3.dtype == np.float32
    agree = np.rint(img3[0]) == lab3
    assert agree.mean() > 0.95
    interior = ndimage.minimum_filter(lab3, 5) == ndimage.maximum_filter(lab3, 5)
    assert agree[interior].all()


def test_same_rng_same_result_and_3d():
    vol = np.random.default_rng(0).random((1, 6, 12, 14))
    labels = np.random.default_rng(1).integers(0, 3, (6, 12, 14))
    a = elastic_deform([vol, labels], rng=np.random.default_rng(9), spatial_dims=3, sigma=2)
    b = elastic_deform([vol, labels], rng=np.random.default_rng(9), spatial_dims=3, sigma=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == vol.shape and a[1].shape == labels.shape
    assert set(np.unique(a[1])) <= {0, 1, 2}
    field = displacement_field((6, 12, 14), rng=np.random.default_rng(0))
    assert field.shape == (3, 6, 12, 14)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="grid=1"):
        displacement_field((8, 8), rng=np.random.default_rng(0), grid=1)
    with pytest.raises(ConfigError, match="2 arrays but 1 orders"):
        elastic_deform(
            [np.zeros((4, 4)), np.zeros((4, 4))], rng=np.random.default_rng(0), orders=[0]
        )
    with pytest.raises(ConfigError, match="does not match field shape"):
        warp(np.zeros((4, 5)), np.zeros((2, 4, 4)), order=0)
