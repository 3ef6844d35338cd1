"""Block-wise predict honours what whole-image predict does: ``--channels`` (and the
checkpoint's channels), the training scale (``--pixel-size`` / ``--object-diameter``,
refused with one line when it would need rescaling), the object table, GeoJSON / ImageJ
ROI exports and ``--save-probabilities`` — on a real ``distributed.LocalCluster``.

References: ``predict_image`` on the whole image in memory, ``object_table`` on the
stitched labels read back whole, roifile / json reading the exports."""

from __future__ import annotations

import csv
import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
writer = pytest.importorskip("ome_zarr.writer")

import unetkit  # noqa: E402
from unetkit.cli.main import main  # noqa: E402
from unetkit.data.io import to_float_image  # noqa: E402
from unetkit.data.synthetic import synth_cells  # noqa: E402
from unetkit.errors import ConfigError, DataError  # noqa: E402
from unetkit.inference import TileOptions  # noqa: E402
from unetkit.inference.backends import load_inference_model  # noqa: E402
from unetkit.segmentation.postprocess import object_table  # noqa: E402
from unetkit.workflows import block_outputs  # noqa: E402
from unetkit.workflows.blocks import BlockOptions  # noqa: E402
from unetkit.workflows.distributed import predict_blocks  # noqa: E402
from unetkit.workflows.segment import InferenceOptions, predict_image  # noqa: E402
from unetkit.workflows.segment_outputs import OutputOptions  # noqa: E402

SIZE, BLOCK = 384, 128
OPTIONS = InferenceOptions(TileOptions(tile=96, batch_size=4), precision="fp32", min_size=10)
MICRONS = {"y": "micrometer", "x": "micrometer"}


def _model(in_channels: int, root: Path, name: str, **extra) -> str:
    """A random-weight U-Net: predictions need not be good, only blob-like (objects then
    cross block borders); ``extra`` goes into the checkpoint's metadata."""
    torch.manual_seed(0)
    net = unetkit.create_model(
        "unet", in_channels=in_channels, channels=(8, 16), out_channels=3, norm="group"
    )
    return str(
        unetkit.save(net, root / f"{name}.safetensors", extra={"target": "semantic", **extra})
    )


def _write_zarr(path: Path, data: np.ndarray, axes: str, **kwargs) -> Path:
    group = zarr.open_group(str(path), mode="w")
    chunks = (1,) * (data.ndim - 2) + (BLOCK // 2, BLOCK // 2)
    writer.write_image(data, group, axes=axes, storage_options={"chunks": chunks}, **kwargs)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("outputs")
    grey, _ = synth_cells((SIZE, SIZE), seed=3, n_cells=(60, 70))
    other, _ = synth_cells((SIZE, SIZE), seed=4, n_cells=(60, 70))
    two = (np.stack([other, grey]) * 255).astype(np.uint8)  # c, y, x: cells in channel 1
    return {
        "root": root,
        "two": two,
        "zarr2": _write_zarr(root / "two.ome.zarr", two, "cyx", scale={"y": 0.5, "x": 0.5}),
        "grey": _write_zarr(
            root / "grey.ome.zarr",
            two[1],
            "yx",
            scale={"y": 0.5, "x": 0.5},
            axes_units=MICRONS,
            scale_factors=(2,),
        ),
        "one": _model(1, root, "one"),
        "picked": _model(1, root, "picked", channels=[1]),
    }


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            processes=False,
            protocol="tcp://",
            dashboard_address=None,  # threads, but real TCP comms
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _group(out: Path) -> zarr.Group:
    return zarr.open_group(str(out), mode="r")


def _table(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_channels_flag_and_checkpoint_channels(setup: dict, client, tmp_path: Path) -> None:
    """``--channels 1`` on a 2-channel image equals predict on channel 1; a checkpoint
    trained on channel 1 picks it by itself; a wrong count is one line naming the file."""
    model, meta = load_inference_model(setup["one"])
    image = to_float_image(np.moveaxis(setup["two"], 0, -1), channels=(1,))
    ref = predict_image(model, image, meta, OPTIONS)
    blocks = BlockOptions(block_size=BLOCK)
    options = dataclasses.replace(OPTIONS, channels=(1,))
    saved = OutputOptions(save_probabilities=True)
    predict_blocks(
        setup["one"],
        [setup["zarr2"]],
        tmp_path / "a",
        options,
        blocks,
        outputs=saved,
        client=client,
    )
    group = _group(tmp_path / "a" / "two.zarr")
    np.testing.assert_array_equal(group["probabilities/0"][:], ref.probabilities)
    np.testing.assert_array_equal(group["0"][:], ref.labels)
    predict_blocks(
        setup["picked"], [setup["zarr2"]], tmp_path / "b", OPTIONS, blocks, client=client
    )
    np.testing.assert_array_equal(_group(tmp_path / "b" / "two.zarr")["0"][:], ref.labels)
    with pytest.raises(DataError) as e:
        predict_blocks(setup["one"], [setup["zarr2"]], tmp_path / "c", OPTIONS, blocks)
    msg = str(e.value)
    assert "two.ome.zarr" in msg and "2 channel(s)" in msg and "--channels" in msg
    assert "\n" not in msg


def test_object_table_and_exports_from_blocks(setup: dict, client, tmp_path: Path) -> None:
    """The object table summed block by block equals ``object_table`` on the whole
    stitched labels (µm columns from the store's micrometre scale); GeoJSON and ImageJ
    ROIs hold one outline per object, in the labels' pixel grid."""
    outputs = OutputOptions(geojson=True, imagej_rois=True, object_type="cell")
    rows = predict_blocks(
        setup["one"],
        [setup["grey"]],
        tmp_path,
        OPTIONS,
        BlockOptions(block_size=BLOCK),
        outputs=outputs,
        client=client,
    )
    labels = _group(tmp_path / "grey.zarr")["labels/instances/0"][:]
    crossing = set(np.unique(labels[BLOCK - 1][labels[BLOCK - 1] == labels[BLOCK]])) - {0}
    assert labels.max() == rows[0]["objects"] >= 20 and len(crossing) >= 3  # it means something
    image = to_float_image(setup["two"][1])
    want = object_table(labels, image, pixel_size=(0.5, 0.5))
    got = _table(tmp_path / "grey_objects.csv")
    assert [list(r) for r in got] == [list(r) for r in want]  # same columns, same order
    assert [r["label"] for r in got] == [r["label"] for r in want]
    for key in want[0]:
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-12)
    features = json.loads((tmp_path / "grey.geojson").read_text())["features"]
    assert len(features) == labels.max()
    assert {f["properties"]["objectType"] for f in features} == {"cell"}
    first = features[0]["geometry"]["coordinates"][0]  # the exterior ring of object 1
    ys, xs = np.nonzero(labels == 1)
    assert min(p[0] for p in first) == xs.min() and max(p[1] for p in first) == ys.max() + 1
    import roifile

    with zipfile.ZipFile(tmp_path / "grey_RoiSet.zip") as z:
        rois = [roifile.ImagejRoi.frombytes(z.read(n)) for n in z.namelist()]
    assert len(rois) == labels.max()
    assert (rois[0].left, rois[0].top) == (xs.min(), ys.min())


def test_refused_outputs_are_one_line(setup: dict, tmp_path: Path, monkeypatch) -> None:
    blocks = BlockOptions(block_size=BLOCK)
    monkeypatch.setattr(block_outputs, "EXPORT_PIXELS", 100 * 100)
    for outputs, flag in (
        (OutputOptions(geojson=True), "--geojson"),
        (OutputOptions(imagej_rois=True), "--imagej-rois"),
        (OutputOptions(label_format="tif32"), "--labels-format tif32"),
    ):
        with pytest.raises(ConfigError) as e:
            predict_blocks(
                setup["one"], [setup["grey"]], tmp_path, OPTIONS, blocks, outputs=outputs
            )
        assert flag in str(e.value) and "\n" not in str(e.value)
    blended = dataclasses.replace(OPTIONS, tiles=TileOptions(tile=96, blend="constant"))
    with pytest.raises(ConfigError, match="blend='constant'") as e:
        predict_blocks(setup["one"], [setup["grey"]], tmp_path, blended, blocks)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # refused before any work


def test_training_scale_is_honoured_or_refused(setup: dict, tmp_path: Path) -> None:
    """A checkpoint trained at 1 µm/pixel: the 0.5 µm store is refused with the level at
    that scale named; at --level 1 (1 µm) it runs, as with --pixel-size 1 (the store
    then carries 1 µm); --object-diameter without a trained diameter is one line."""
    ckpt = _model(1, tmp_path, "scaled", pixel_size=1.0)
    blocks = BlockOptions(block_size=BLOCK)
    with pytest.raises(ConfigError) as e:
        predict_blocks(ckpt, [setup["grey"]], tmp_path / "a", OPTIONS, blocks)
    msg = str(e.value)
    assert "0.5 µm/pixel" in msg and "rescaling by 0.5" in msg and "--level 1" in msg
    assert "\n" not in msg
    one_micron = dataclasses.replace(OPTIONS, pixel_size=1.0)
    predict_blocks(ckpt, [setup["grey"]], tmp_path / "b", one_micron, blocks)
    ms = _group(tmp_path / "b" / "grey.zarr").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]
    assert ms["axes"][0]["unit"] == "micrometer"
    predict_blocks(ckpt, [setup["grey"]], tmp_path / "c", OPTIONS, BlockOptions(96, level=1))
    model, meta = load_inference_model(ckpt)
    level1 = zarr.open_array(str(setup["grey"] / "s1"), mode="r")[:]
    ref = predict_image(model, to_float_image(level1), meta, OPTIONS)
    np.testing.assert_array_equal(_group(tmp_path / "c" / "grey.zarr")["0"][:], ref.labels)
    diameter = dataclasses.replace(OPTIONS, object_diameter=20.0)
    with pytest.raises(ConfigError, match="--object-diameter") as e:
        predict_blocks(ckpt, [setup["grey"]], tmp_path / "d", diameter, blocks)
    assert "\n" not in str(e.value)


def test_tiff_pixel_size_goes_into_the_store(setup: dict, tmp_path: Path) -> None:
    """A TIFF's resolution tags (0.25 µm/pixel) become the store's micrometre scale and
    the object table's µm columns."""
    import tifffile

    tif = tmp_path / "cells.tif"
    tifffile.imwrite(tif, setup["two"][1], tile=(64, 64), resolution=(4e4, 4e4), resolutionunit=3)
    predict_blocks(setup["one"], [tif], tmp_path / "out", OPTIONS, BlockOptions(block_size=BLOCK))
    ms = _group(tmp_path / "out" / "cells.zarr").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.25, 0.25]
    assert ms["axes"][1] == {"name": "x", "type": "space", "unit": "micrometer"}
    row = _table(tmp_path / "out" / "cells_objects.csv")[0]
    assert row["area_um2"] == pytest.approx(row["area"] * 0.0625)


def test_cli_block_path_flags(setup: dict, tmp_path: Path, capsys) -> None:
    """The CLI passes the output flags to the block path, refuses the whole-image-only
    ones with one line each, and --overwrite restarts a store made with other options."""
    base = ["predict", setup["one"], str(setup["grey"]), "--out", str(tmp_path)]
    base += ["--block-size", str(BLOCK), "--tile", "96", "--precision", "fp32"]
    assert main([*base, "--geojson", "--save-probabilities"]) == 0
    assert (tmp_path / "grey.geojson").is_file() and (tmp_path / "grey_objects.csv").is_file()
    assert "probabilities" in _group(tmp_path / "grey.zarr")
    for flag in (["--attention-maps"], ["--backend", "onnx"], ["--compile"]):
        capsys.readouterr()
        assert main([*base, *flag]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"unetkit predict: error: {flag[0]}") and "\n" not in err
    capsys.readouterr()
    assert main([*base, "--min-size", "50"]) == 2  # other options: resume refused
    assert "another --out" in capsys.readouterr().err
    assert main([*base, "--min-size", "50", "--overwrite"]) == 0
    table = _table(tmp_path / "grey_objects.csv")
    assert min(r["area"] for r in table) >= 50
    assert "probabilities" not in _group(tmp_path / "grey.zarr")  # the store started afresh


def test_local_workers_keep_glibc_malloc_dynamic() -> None:
    """``local:N`` worker processes run without Dask's ``MALLOC_TRIM_THRESHOLD_`` (which
    pins glibc's mmap threshold, re-faulting every large tensor) and keep one OpenMP
    thread each."""
    import os

    from unetkit.workflows.dask_cluster import dask_client

    with dask_client("local:1", dashboard=None) as c:
        seen = c.run(
            lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ["OMP_NUM_THREADS"])
        )
    assert list(seen.values()) == [(None, "1")]
