"""predict over files and folders: outputs, 32-bit labels, unique names, resume, rescaling."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import unetkit
from unetkit.data.io import read_image, write_image
from unetkit.data.tiff import PixelSize
from unetkit.errors import ConfigError, DataError
from unetkit.workflows import segment
from unetkit.workflows.segment import InferenceOptions, Prediction, predict_image, scale_factor
from unetkit.workflows.segment_files import predict_files
from unetkit.workflows.segment_outputs import OutputOptions, unique_names, write_outputs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny semantic U-Net whose output does not matter, only that it runs."""
    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(4, 8))
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore"}
    return unetkit.save(net, tmp_path_factory.mktemp("ck") / "m.safetensors", extra=extra)


def _blobs(shape=(40, 48), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, shape).astype(np.uint8)
    img[5:15, 5:15] = 200
    img[25:35, 20:40] = 220
    return img


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_unique_names_for_colliding_stems(tmp_path):
    files = [
        tmp_path / "a" / "x.png",
        tmp_path / "b" / "x.png",
        tmp_path / "y.png",
        tmp_path / "y.tif",
        tmp_path / "z.png",
    ]
    names = unique_names(files)
    assert names == {
        files[0]: "a_x",
        files[1]: "b_x",
        files[2]: "y_png",
        files[3]: "y_tif",
        files[4]: "z",
    }
    # a renamed stem that equals another input's stem still gets a unique name
    clash = [tmp_path / "y.png", tmp_path / "y.tif", tmp_path / "y_png.png"]
    assert len(set(unique_names(clash).values())) == 3


def test_more_than_65535_labels_go_to_32_bit_tiff(tmp_path):
    labels = np.zeros((520, 520), np.int32)
    labels[::2, ::2] = np.arange(1, 260 * 260 + 1).reshape(260, 260)  # 67,600 objects
    pred = Prediction(np.zeros((1, 520, 520), np.float32), (labels > 0).astype(np.int64), labels)
    image = np.zeros((1, 520, 520), np.float32)
    row = write_outputs(tmp_path, "many", image, pred, OutputOptions())
    assert row["labels"] == "many_instances.tif" and row["objects"] == 67_600
    back = tifffile.imread(tmp_path / "many_instances.tif")
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)
    assert not (tmp_path / "many_instances.png").exists()


def test_small_counts_stay_uint16_png_with_preview_and_tif32_option(tmp_path):
    labels = np.zeros((16, 16), np.int32)
    labels[2:6, 2:6], labels[9:14, 8:15] = 1, 2
    pred = Prediction(np.zeros((1, 16, 16), np.float32), (labels > 0).astype(np.int64), labels)
    image = np.zeros((1, 16, 16), np.float32)
    write_outputs(tmp_path, "s", image, pred, OutputOptions())
    assert read_image(tmp_path / "s_instances.png").dtype == np.uint16
    preview = read_image(tmp_path / "s_labels_preview.png")
    assert preview.shape == (16, 16, 3) and preview.dtype == np.uint8
    assert (preview[0, 0] == 0).all()  # background black
    colours = {tuple(preview[3, 3]), tuple(preview[10, 10])}
    assert len(colours) == 2 and (0, 0, 0) not in colours  # two objects, two colours
    write_outputs(
        tmp_path,
        "t",
        image,
        pred,
        OutputOptions(label_format="tif32"),
        pixel_size=PixelSize(0.5, 0.5),
    )
    with tifffile.TiffFile(tmp_path / "t_instances.tif") as tif:
        assert tif.pages.first.dtype == np.uint32
        assert tif.pages.first.get_resolution()[0] == pytest.approx(2e4)  # px per cm
    table = _rows(tmp_path / "t_objects.csv")
    assert float(table[0]["area_um2"]) == pytest.approx(16 * 0.25)
    assert float(table[1]["centroid_x_um"]) == pytest.approx(11 * 0.5)


def test_predict_folder_outputs_resume_and_overwrite(tmp_path, checkpoint, monkeypatch):
    inputs = tmp_path / "in"
    write_image(inputs / "a" / "x.png", _blobs(seed=1))
    write_image(inputs / "b" / "x.png", _blobs(seed=2))
    write_image(inputs / "y.png", _blobs(seed=3))
    tifffile.imwrite(
        inputs / "y.tif", _blobs(seed=4), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit=3
    )
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    outputs = OutputOptions(save_probabilities=True, geojson=True, imagej_rois=True)
    files = [inputs / "a" / "x.png", inputs / "b" / "x.png", inputs / "y.png", inputs / "y.tif"]
    rows = predict_files(checkpoint, files[:3], out, outputs=outputs)
    assert [r["name"] for r in rows] == ["a_x", "b_x", "y"]
    for name in ("a_x", "b_x", "y"):
        for ending in (
            "_mask.png",
            "_instances.png",
            "_labels_preview.png",
            "_overlay.png",
            "_objects.csv",
            "_probabilities.tif",
            ".geojson",
            "_RoiSet.zip",
        ):
            assert (out / f"{name}{ending}").is_file(), name + ending
    probs = tifffile.imread(out / "a_x_probabilities.tif")
    assert probs.dtype == np.float32 and probs.shape == (2, 40, 48)
    assert len(_rows(out / "counts.csv")) == 3

    # a re-run with one more input predicts only that one (the others are done)
    calls = []
    original = segment.predict_image
    monkeypatch.setattr(
        segment, "predict_image", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    rows = predict_files(checkpoint, files, out, outputs=outputs)
    assert len(calls) == 1
    assert [r["name"] for r in rows] == ["a_x", "b_x", "y", "y_tif"]  # y.png keeps its name
    counts = _rows(out / "counts.csv")
    assert len(counts) == 4 and counts[-1]["pixel_size_um"] == "0.5"
    header = (out / "y_tif_objects.csv").read_text().splitlines()[0]
    assert "area_um2" in header and "centroid_x_um" in header

    # other settings are refused unless --overwrite; --overwrite redoes everything
    with pytest.raises(ConfigError, match=r"other settings \(inference\)"):
        predict_files(checkpoint, files, out, InferenceOptions(min_size=3), outputs=outputs)
    calls.clear()
    redo = OutputOptions(save_probabilities=True, geojson=True, imagej_rois=True, overwrite=True)
    predict_files(checkpoint, files, out, InferenceOptions(min_size=3), outputs=redo)
    assert len(calls) == 4


def test_predict_folder_warns_about_skipped_entries(tmp_path, checkpoint, caplog):
    write_image(tmp_path / "in" / "a.png", _blobs())
    (tmp_path / "in" / "readme.txt").write_text("x")
    (tmp_path / "in" / "sub").mkdir()
    with caplog.at_level("WARNING"):
        predict_files(checkpoint, [tmp_path / "in"], tmp_path / "out")
    assert "skipped 2 entries that are not images: readme.txt, sub" in caplog.text


def test_outputs_never_land_on_inputs(tmp_path, checkpoint):
    write_image(tmp_path / "a.png", _blobs())
    write_image(tmp_path / "a_overlay.png", _blobs())
    before = (tmp_path / "a_overlay.png").read_bytes()
    with pytest.raises(DataError, match="a_overlay.png: output would overwrite an input"):
        predict_files(checkpoint, [tmp_path / "a.png", tmp_path / "a_overlay.png"], tmp_path)
    assert (tmp_path / "a_overlay.png").read_bytes() == before


def test_channels_option_picks_channels_for_predict(tmp_path, checkpoint):
    two = np.stack([_blobs(seed=5), _blobs(seed=6)])
    tifffile.imwrite(tmp_path / "two.tif", two, imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(DataError, match=r"two.tif: image has 2 channel\(s\), the model takes 1"):
        predict_files(checkpoint, [tmp_path / "two.tif"], tmp_path / "o1")
    rows = predict_files(
        checkpoint, [tmp_path / "two.tif"], tmp_path / "o2", InferenceOptions(channels=(1,))
    )
    reference = predict_files(checkpoint, [_write(tmp_path / "c1.png", two[1])], tmp_path / "o3")
    a = read_image(tmp_path / "o2" / "two_instances.png")
    b = read_image(tmp_path / "o3" / "c1_instances.png")
    np.testing.assert_array_equal(a, b)
    assert rows[0]["objects"] == reference[0]["objects"]


def _write(path: Path, arr: np.ndarray) -> Path:
    return write_image(path, arr)


def test_scale_factor_from_pixel_size_and_diameter():
    meta = {"pixel_size": 0.5, "object_diameter": 20.0}
    assert scale_factor(meta, InferenceOptions()) == 1.0
    assert scale_factor(meta, InferenceOptions(), PixelSize(0.25, 0.25)) == pytest.approx(0.5)
    assert scale_factor(meta, InferenceOptions(pixel_size=1.0), PixelSize(0.25, 0.25)) == 2.0
    assert scale_factor(meta, InferenceOptions(object_diameter=40.0)) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="--object-diameter"):
        scale_factor({}, InferenceOptions(object_diameter=40.0))
    with pytest.raises(ConfigError, match="--pixel-size -1"):
        InferenceOptions(pixel_size=-1)


def test_rescaled_prediction_matches_prediction_at_the_training_scale(checkpoint):
    """Predicting a 2× upsampled image at scale 0.5 equals predicting the original,
    with labels mapped back by nearest neighbour onto the input grid."""
    model, meta = segment.load_for_inference(checkpoint)
    small = _blobs(shape=(32, 32)).astype(np.float32)[None] / 255
    big = np.repeat(np.repeat(small, 2, axis=1), 2, axis=2)
    options = InferenceOptions(min_size=1)
    direct = predict_image(model, small, meta, options)
    zoomed = predict_image(model, big, meta, options, scale=0.5)
    assert zoomed.instances.shape == (64, 64) and zoomed.probabilities.shape == (2, 64, 64)
    expected = np.repeat(np.repeat(direct.labels, 2, axis=0), 2, axis=1)
    assert (zoomed.labels == expected).mean() > 0.97


def test_predict_json_records_settings(tmp_path, checkpoint):
    write_image(tmp_path / "in" / "a.png", _blobs())
    predict_files(checkpoint, [tmp_path / "in"], tmp_path / "out", InferenceOptions(channels=(0,)))
    settings = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert settings["inference"]["channels"] == [0]
    assert settings["checkpoint"] == str(Path(checkpoint).resolve())


def test_predict_rescales_to_the_checkpoint_pixel_size(tmp_path):
    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(4, 8))
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore", "pixel_size": 1.0}
    ck = unetkit.save(net, tmp_path / "px.safetensors", extra=extra)
    tifffile.imwrite(
        tmp_path / "fine.tif",
        _blobs(shape=(64, 80)),
        imagej=True,
        resolution=(2.0, 2.0),
        metadata={"unit": "um"},
    )
    rows = predict_files(ck, [tmp_path / "fine.tif"], tmp_path / "out")
    assert float(rows[0]["scale"]) == pytest.approx(0.5)  # 0.5 µm pixels -> model's 1 µm
    assert float(rows[0]["pixel_size_um"]) == pytest.approx(0.5)
    labels = read_image(tmp_path / "out" / "fine_instances.png")
    assert labels.shape == (64, 80)  # back on the input grid


def test_image_finished_just_before_a_kill_is_not_predicted_again(
    tmp_path, checkpoint, monkeypatch
):
    """kill -9 after an image's label file (written last) but before its counts.csv row:
    the re-run rebuilds the row from the files instead of predicting the image again."""
    for k in range(3):
        write_image(tmp_path / "in" / f"i{k}.png", _blobs(seed=k))
    out = tmp_path / "out"
    first = predict_files(checkpoint, [tmp_path / "in"], out)
    rows = _rows(out / "counts.csv")
    with open(out / "counts.csv", "w") as f:  # the row of the last image never got written
        f.write(",".join(rows[0]) + "\n")
        for r in rows[:2]:
            f.write(",".join(r.values()) + "\n")
    calls = []
    original = segment.predict_image
    monkeypatch.setattr(
        segment, "predict_image", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    again = predict_files(checkpoint, [tmp_path / "in"], out)
    assert calls == []
    assert [int(r["objects"]) for r in again] == [r["objects"] for r in first]
    assert len(_rows(out / "counts.csv")) == 3


def test_cli_predict_with_every_output_flag_then_resume(tmp_path, checkpoint, capsys):
    from unetkit.cli.main import main

    (tmp_path / "in").mkdir()
    tifffile.imwrite(
        tmp_path / "in" / "two.tif",
        np.stack([_blobs(seed=7), _blobs(seed=8)]),
        imagej=True,
        metadata={"axes": "CYX"},
    )
    argv = [
        "predict",
        str(checkpoint),
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--channels",
        "1",
        "--pixel-size",
        "0.5",
        "--labels-format",
        "tif32",
        "--save-probabilities",
        "--geojson",
        "--imagej-rois",
        "--object-type",
        "cell",
    ]
    assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "counts.csv",
        "predict.json",
        "two.geojson",
        "two_RoiSet.zip",
        "two_instances.tif",
        "two_labels_preview.png",
        "two_mask.png",
        "two_objects.csv",
        "two_overlay.png",
        "two_probabilities.tif",
    ]
    assert "area_um2" in (tmp_path / "out" / "two_objects.csv").read_text().splitlines()[0]
    capsys.readouterr()
    assert main(argv) == 0  # finished: nothing to redo
    assert "two.tif" in capsys.readouterr().out
    assert main([*argv[:-1], "detection"]) == 2  # other settings: refused, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert main([*argv[:5], "--channels", "1,x"]) == 2
    assert "--channels" in capsys.readouterr().err


def test_one_call_api_reads_files_axis_aware(tmp_path, checkpoint):
    two = np.stack([_blobs(seed=9), _blobs(seed=10)])
    tifffile.imwrite(tmp_path / "two.tif", two, imagej=True, metadata={"axes": "CYX"})
    from_file = unetkit.predict(checkpoint, tmp_path / "two.tif", channels=(1,), precision="fp32")
    from_array = unetkit.predict(checkpoint, two[1], precision="fp32")
    np.testing.assert_array_equal(from_file.instances, from_array.instances)


def test_regression_outputs_get_unique_names_too(tmp_path):
    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(4, 8), out_channels=1)
    extra = {"task": "regression", "output": "depth", "normalize": "zscore"}
    ck = unetkit.save(net, tmp_path / "d.safetensors", extra=extra)
    write_image(tmp_path / "in" / "y.png", _blobs(seed=1))
    write_image(tmp_path / "in" / "y.tif", _blobs(seed=2))
    predict_files(ck, [tmp_path / "in"], tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "y_png_depth.tif" in names and "y_tif_depth.tif" in names
    assert "y_png_depth_preview.png" in names
