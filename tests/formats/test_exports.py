"""GeoJSON (QuPath) and RoiSet.zip (ImageJ) exports, read back by independent code: the
JSON polygons filled by skimage.draw.polygon, the ROIs read by roifile."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from skimage.draw import disk, polygon

from unetkit.formats.geojson import write_geojson
from unetkit.formats.imagej_roi import write_roi_zip


@pytest.fixture
def labels():
    """Touching, holed, ragged and split objects on 96×120."""
    rng = np.random.default_rng(3)
    out = np.zeros((96, 120), np.int32)
    for k, (r, c, rad) in enumerate([(20, 20, 12), (20, 43, 11), (60, 30, 15), (70, 90, 18)], 1):
        out[disk((r, c), rad, shape=out.shape)] = k
    out[55:65, 25:35] = 0  # a hole in object 3
    out[out == 3] = 3
    noisy = rng.random(out.shape) < 0.03
    out[noisy & (out == 4)] = 0  # ragged object with pin holes
    out[5:12, 80:110] = 5
    out[15:20, 100:112] = 5  # object 5 in two pieces
    out[0:6, 0:6] = 6  # touches the image border
    return out


def _fill(ring, shape):
    xy = np.asarray(ring, float)
    rr, cc = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=shape)  # pixel centres inside
    mask = np.zeros(shape, bool)
    mask[rr, cc] = True
    return mask


def _shoelace(ring):
    xy = np.asarray(ring, float)
    return float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_geojson_polygons_fill_back_to_their_labels(tmp_path, labels):
    rows = [
        {"label": k, "area": int((labels == k).sum()), "area_um2": 0.25 * (labels == k).sum()}
        for k in range(1, 7)
    ]
    path = write_geojson(tmp_path / "img.geojson", labels, rows, object_type="cell")
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == 6
    for feature in collection["features"]:
        props = feature["properties"]
        assert props["objectType"] == "cell"
        assert set(props["classification"]) == {"name", "color"}
        k = int(props["measurements"]["label"])
        assert props["measurements"]["area"] == (labels == k).sum()
        geometry = feature["geometry"]
        polygons = (
            [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        )
        filled = np.zeros(labels.shape, bool)
        for rings in polygons:
            assert all(ring[0] == ring[-1] for ring in rings)  # closed rings (GeoJSON)
            signs = [_shoelace(ring) > 0 for ring in rings]
            assert signs == [True] + [False] * (len(rings) - 1)  # RFC 7946 winding
            part = _fill(rings[0], labels.shape)
            for hole in rings[1:]:
                part &= ~_fill(hole, labels.shape)
            filled |= part
        assert _iou(filled, labels == k) > 0.95, k
    types = {f["properties"]["name"]: f["geometry"]["type"] for f in collection["features"]}
    assert types["Nucleus 5"] == "MultiPolygon"


def test_roiset_zip_read_by_roifile_fills_back_to_labels(tmp_path, labels):
    roifile = pytest.importorskip("roifile")
    path = write_roi_zip(tmp_path / "img_RoiSet.zip", labels)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == [f"000{k}.roi" for k in range(1, 7)]
    rois = roifile.roiread(path)
    assert len(rois) == 6
    for roi in rois:
        assert roi.roitype == roifile.ROI_TYPE.POLYGON
        k = int(roi.name)
        filled = _fill(roi.coordinates(), labels.shape)
        truth = labels == k
        if k == 5:  # ImageJ polygons have no parts: the largest piece is written
            truth = truth & (np.arange(labels.shape[0])[:, None] < 13)
        if k in (3, 4):  # nor holes: compare with the filled object
            from scipy import ndimage

            truth = ndimage.binary_fill_holes(truth)
        assert _iou(filled, truth) > 0.95, k


def test_empty_labels_give_empty_exports(tmp_path):
    empty = np.zeros((8, 8), np.int32)
    fc = json.loads(write_geojson(tmp_path / "e.geojson", empty).read_text())
    assert fc == {"type": "FeatureCollection", "features": []}
    with zipfile.ZipFile(write_roi_zip(tmp_path / "e_RoiSet.zip", empty)) as archive:
        assert archive.namelist() == []
