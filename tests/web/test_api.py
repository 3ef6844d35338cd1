"""The web API alone (FastAPI's TestClient): uploads, jobs, results, cancel, two users."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from unetkit.data.io import read_image  # noqa: E402
from unetkit.web.app import create_app  # noqa: E402
from unetkit.web.models import ModelList  # noqa: E402
from unetkit.workflows.interactive import Segmenter  # noqa: E402


def make_client(models_root: Path, tmp_path: Path, **options) -> TestClient:
    models = ModelList([models_root / "seg", models_root / "diffusion.safetensors"])
    app = create_app(models, work_dir=tmp_path / "work", **options)
    return TestClient(app)


def model_id(client: TestClient, kind: str) -> str:
    return next(m["id"] for m in client.get("/api/info").json()["models"] if m["kind"] == kind)


def wait(client: TestClient, job_id: str, *, until=("done", "failed", "cancelled")) -> dict:
    for _ in range(2400):  # polls, not wall-clock: a slow machine only takes longer
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in until:
            return job
        assert job["state"] not in ("failed", "cancelled") or job["state"] in until, job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck: {job}")


def upload(client: TestClient, data: bytes, name: str = "cells.png"):
    return client.post("/api/images", files={"file": (name, data, "application/octet-stream")})


def test_bad_uploads_get_4xx_with_a_message(models_root, tmp_path):
    with make_client(models_root, tmp_path, max_upload_mb=0.05) as client:
        cases = {
            "empty": (upload(client, b""), 400, "empty"),
            "gif": (upload(client, b"GIF89a" + bytes(64), "cat.gif"), 415, "not a PNG or TIFF"),
            "text as png": (upload(client, b"hello, not an image", "x.png"), 415, "PNG or TIFF"),
            "truncated": (upload(client, b"\x89PNG\r\n\x1a\n" + bytes(30)), 400, "cannot be read"),
            "too large": (upload(client, png_bytes(_noise(400))), 413, "upload limit"),
            "no file field": (client.post("/api/images", data={"x": "1"}), 400, "'file'"),
        }
        for what, (response, status, text) in cases.items():
            assert response.status_code == status, what
            assert text in response.json()["error"], what
        # a path-traversal name is shown sanitised and never used as a path
        ok = upload(client, png_bytes(_noise(32)), "../../../evil name.png")
        assert ok.status_code == 200 and ok.json()["name"] == "evil_name.png"
        assert not list(tmp_path.rglob("evil*"))
        # ids from the browser never reach the file system either
        for url in ("/api/jobs/..%2F..%2Fwork/files/x.png", "/api/images/../preview.png"):
            assert client.get(url).status_code == 404
        bad_labels = client.post(f"/api/images/{ok.json()['id']}/labels", content=b"\0" * 7)
        assert bad_labels.status_code == 400
        assert "expected 4096 (32x32 int32)" in bad_labels.json()["error"]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _noise(side: int) -> np.ndarray:
    return np.random.default_rng(side).integers(0, 256, (side, side), dtype=np.uint8)


def test_bad_job_settings_are_refused(models_root, tmp_path):
    with make_client(models_root, tmp_path) as client:
        diff = model_id(client, "diffusion")
        r = client.post("/api/jobs/generate", json={"model": diff, "sampler": "eulr"})
        assert r.status_code == 400 and "did you mean 'euler'" in r.json()["error"]
        r = client.post("/api/jobs/generate", json={"model": diff, "n": 1000})
        assert r.status_code == 400 and r.json()["error"].startswith("n: 1000 is outside")
        r = client.post("/api/jobs/segment", json={"model": diff, "images": ["x" * 16]})
        assert r.status_code == 400 and "not a segment model" in r.json()["error"]


def test_segment_results_and_downloads(models_root, cell_images, tmp_path):
    image = read_image(cell_images[0])
    expected = Segmenter(models_root / "seg").segment(image)
    with make_client(models_root, tmp_path) as client:
        img = upload(client, cell_images[0].read_bytes(), cell_images[0].name).json()
        job_id = client.post(
            "/api/jobs/segment", json={"model": model_id(client, "segment"), "images": [img["id"]]}
        ).json()["id"]
        job = wait(client, job_id)
        assert job["state"] == "done", job["error"]
        result = job["result"]["images"][0]
        assert result["count"] == expected.count > 0
        files = f"/api/jobs/{job_id}/files/0"
        labels = tifffile.imread(io.BytesIO(client.get(f"{files}/labels.tif").content))
        assert labels.dtype == np.uint32
        np.testing.assert_array_equal(labels, expected.instances)
        raw = client.get(f"/api/jobs/{job_id}/labels/0").content
        np.testing.assert_array_equal(np.frombuffer(raw, "<i4").reshape(labels.shape), labels)
        rows = list(csv.DictReader(io.StringIO(client.get(f"{files}/objects.csv").text)))
        assert [int(r["label"]) for r in rows] == [r["label"] for r in expected.table]
        mask = np.asarray(Image.open(io.BytesIO(client.get(f"{files}/mask.png").content)))
        np.testing.assert_array_equal(mask > 0, expected.labels > 0)
        geo = json.loads(client.get(f"{files}/objects.geojson").text)
        _check_polygons(geo, labels)


def _check_polygons(geo: dict, labels: np.ndarray) -> None:
    """Each polygon, rasterised by scikit-image at pixel centres, covers its object."""
    from skimage.draw import polygon

    assert len(geo["features"]) == len(np.unique(labels)) - 1
    for feature in geo["features"]:
        label = int(feature["properties"]["measurements"]["label"])
        geometry = feature["geometry"]
        polygons = geometry["coordinates"]
        largest = polygons if geometry["type"] == "Polygon" else max(polygons, key=len)
        ring = np.asarray(largest[0])  # the outer ring
        assert (ring[0] == ring[-1]).all()
        drawn = np.zeros(labels.shape, bool)
        rr, cc = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, labels.shape)
        drawn[rr, cc] = True
        obj = labels == label
        assert (drawn & obj).sum() / (drawn | obj).sum() > 0.6, label


def test_two_users_at_once_get_their_own_results(models_root, cell_images, tmp_path):
    segmenter = Segmenter(models_root / "seg")
    expected = [segmenter.segment(read_image(p)).instances for p in cell_images[:2]]
    assert not np.array_equal(expected[0], expected[1])
    with make_client(models_root, tmp_path, workers=2) as client:
        seg = model_id(client, "segment")
        outcome: dict[int, tuple[str, dict]] = {}

        def user(k: int) -> None:
            img = upload(client, cell_images[k].read_bytes(), cell_images[k].name).json()
            job_id = client.post("/api/jobs/segment", json={"model": seg, "images": [img["id"]]})
            outcome[k] = (job_id.json()["id"], wait(client, job_id.json()["id"]))

        users = [threading.Thread(target=user, args=(k,)) for k in range(2)]
        for t in users:
            t.start()
        for t in users:
            t.join()
        assert outcome[0][0] != outcome[1][0]
        for k, (job_id, job) in outcome.items():
            assert job["state"] == "done" and job["result"]["images"][0]["image"]["name"] == (
                cell_images[k].name
            )
            raw = client.get(f"/api/jobs/{job_id}/files/0/labels.tif").content
            np.testing.assert_array_equal(tifffile.imread(io.BytesIO(raw)), expected[k])


def test_a_cancelled_job_frees_its_worker(models_root, tmp_path):
    with make_client(models_root, tmp_path, workers=1) as client:
        diff = model_id(client, "diffusion")
        long = {"model": diff, "prompt": "a digit", "n": 16, "steps": 500}
        first = client.post("/api/jobs/generate", json=long).json()["id"]
        job = wait(client, first, until=("running",))
        while job["done"] < 2:  # it is sampling, not loading
            job = wait(client, first, until=("running",))
        assert client.post(f"/api/jobs/{first}/cancel").status_code == 200
        job = wait(client, first)
        assert job["state"] == "cancelled" and job["done"] < 500
        second = client.post("/api/jobs/generate", json={**long, "n": 2, "steps": 2}).json()
        done = wait(client, second["id"])
        assert done["state"] == "done" and len(done["result"]["samples"]) == 2
        grid = client.get(f"/api/jobs/{second['id']}/files/grid.png")
        assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")


def test_uploads_without_a_declared_size_are_refused(models_root, tmp_path):
    with make_client(models_root, tmp_path) as client:

        def chunks():
            yield png_bytes(_noise(32))

        r = client.post("/api/images", content=chunks(), headers={"Content-Type": "image/png"})
        assert r.status_code == 411 and "Content-Length" in r.json()["error"]


def test_adapters_are_written_beside_their_base(tmp_path):
    from unetkit.web.tasks import finetune_dir

    run = tmp_path / "cells"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.safetensors").write_bytes(b"")
    assert finetune_dir(run) == tmp_path / "cells-finetune-1"
    (tmp_path / "cells-finetune-1").mkdir()
    assert finetune_dir(run / "checkpoints" / "best.safetensors") == tmp_path / "cells-finetune-2"
    (tmp_path / "loose.safetensors").write_bytes(b"")
    assert finetune_dir(tmp_path / "loose.safetensors") == tmp_path / "loose-finetune-1"


def test_the_default_work_folder_goes_with_the_server(models_root):
    app = create_app(ModelList([models_root / "seg"]))
    with TestClient(app) as client:
        image = upload(client, png_bytes(_noise(32))).json()
        work = app.state.web.images_dir.parent
        assert (work / "images" / image["id"] / "preview.png").is_file()
    assert not work.exists()


def test_16_bit_tiff_and_rgb_png_uploads(models_root, cell_images, tmp_path):
    """Files written by tifffile and Pillow: facts, preview, and the same segmentation."""
    grey = read_image(cell_images[0])
    deep = grey.astype(np.uint16) * 257  # the same picture as 16-bit
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, deep)
    rgb = png_bytes(np.stack([grey] * 3, -1))
    with make_client(models_root, tmp_path) as client:
        a = upload(client, tiff.getvalue(), "deep.tif").json()
        b = upload(client, rgb, "colour.png").json()
        assert (a["width"], a["height"], a["channels"]) == (grey.shape[1], grey.shape[0], 1)
        assert b["channels"] == 3
        shown = Image.open(io.BytesIO(client.get(f"/api/images/{a['id']}/preview.png").content))
        assert shown.size == (grey.shape[1], grey.shape[0]) and shown.mode == "L"
        job = client.post(
            "/api/jobs/segment",
            json={"model": model_id(client, "segment"), "images": [a["id"], b["id"]]},
        ).json()
        done = wait(client, job["id"])
        counts = [r["count"] for r in done["result"]["images"]]
        segmenter = Segmenter(models_root / "seg")
        assert counts == [
            segmenter.segment(deep).count,
            segmenter.segment(np.stack([grey] * 3, -1)).count,
        ]


def test_inpaint_keeps_the_unbrushed_pixels_and_failures_say_why(models_root, tmp_path):
    from unetkit.web.tasks import inpaint_inputs

    picture = _noise(48)
    mask = np.zeros((48, 48), np.uint8)
    mask[12:36, 6:30] = 1
    with make_client(models_root, tmp_path) as client:
        diff = model_id(client, "diffusion")
        image = upload(client, png_bytes(picture)).json()
        client.post(f"/api/images/{image['id']}/mask", content=mask.tobytes())
        settings = {"model": diff, "image": image["id"], "n": 2, "steps": 3, "prompt": "a digit"}
        job = wait(client, client.post("/api/jobs/inpaint", json=settings).json()["id"])
        assert job["state"] == "done" and len(job["result"]["samples"]) == 2
        # the page's resize to the model's 16x16, then every unmasked pixel kept exactly
        x, m = inpaint_inputs(picture, mask, 16, 1)
        known = ((x[0].numpy() + 1) * 127.5).round().astype(np.uint8)
        keep = m[0].numpy() == 0
        for name in job["result"]["samples"]:
            got = np.asarray(
                Image.open(io.BytesIO(client.get(f"/api/jobs/{job['id']}/files/{name}").content))
            )
            np.testing.assert_array_equal(got[keep], known[keep])
            assert not np.array_equal(got[~keep], known[~keep])
        # a speck that vanishes at the model's size: the job fails with one clear line
        speck = np.zeros((48, 48), np.uint8)
        speck[0, 0] = 1  # nearest-neighbour resizing samples pixels 1, 4, 7, ...
        client.post(f"/api/images/{image['id']}/mask", content=speck.tobytes())
        failed = wait(
            client,
            client.post("/api/jobs/inpaint", json=settings).json()["id"],
            until=("failed", "done"),
        )
        assert failed["state"] == "failed" and failed["error"].startswith("mask: nothing brushed")
