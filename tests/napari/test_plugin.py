"""The napari plugin in a real viewer: sample -> Segment equals `unetkit predict`;
fine-tuning on corrected labels raises their Dice; readers; bad input is a notification."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

import unetkit
from unetkit.cli.main import main
from unetkit.data.io import read_image
from unetkit.data.synthetic import write_synthetic_folder
from unetkit.segmentation.metrics import dice

WAIT_MS = 240_000


def _train(root: Path, target: str) -> Path:
    """A barely trained run on synthetic cells (seconds)."""
    from unetkit.workflows import segment_train as R

    write_synthetic_folder(root / "data", 4, shape=(48, 48), seed=3)
    recipe = R.make_recipe(
        "modern",
        data=str(root / "data"),
        target=target,
        model_options={"channels": (4, 8)},
        epochs=1,
        batch_size=2,
        crop=32,
        samples_per_epoch=4,
    )
    R.train(recipe, root / "base", progress=False)
    return root / "base"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Boundary target (touching cells come out as separate objects)."""
    return _train(tmp_path_factory.mktemp("napari"), "boundary")


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Semantic target: its foreground is what the corrections' Dice measures."""
    return _train(tmp_path_factory.mktemp("napari_semantic"), "semantic")


@pytest.fixture
def widget(make_napari_viewer, unetkit_manifest, qtbot):
    from unetkit.napari._widget import SegmentWidget

    viewer = make_napari_viewer()
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w, name="Segment")
    return w


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import unetkit.napari._widget as W

    seen: list[str] = []
    monkeypatch.setattr(W, "show_error", seen.append)
    return seen


def _wait(qtbot, widget, worker) -> None:
    assert worker is not None
    qtbot.waitUntil(lambda: widget.segment_button.enabled, timeout=WAIT_MS)


def test_manifest_validates(unetkit_manifest: Path) -> None:
    """`npe2 validate --imports` (the real command, run in-process: napari is loaded)."""
    from npe2.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["validate", str(unetkit_manifest), "--imports"])
    assert result.exit_code == 0 and "valid" in result.output, result.output


def test_pyproject_entry_point_finds_the_manifest() -> None:
    """The ``napari.manifest`` entry point in pyproject.toml resolves to this manifest."""
    import tomllib
    from importlib import metadata

    import npe2

    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    value = tomllib.loads(pyproject.read_text())["project"]["entry-points"]["napari.manifest"]
    ep = metadata.EntryPoint(name="unetkit", value=value["unetkit"], group="napari.manifest")
    manifest = npe2.PluginManifest._from_entrypoint(ep, metadata.distribution("unetkit"))
    assert manifest.name == "unetkit" and manifest.contributions.widgets


def test_sample_segment_equals_predict(widget, run: Path, tmp_path: Path, qtbot) -> None:
    viewer = widget.viewer
    viewer.open_sample("unetkit", "cells")
    image = viewer.layers["synthetic cells"]
    viewer.layers.selection.active = image
    widget.checkpoint.value = run
    widget.precision.value = "fp32"
    _wait(qtbot, widget, widget.segment())
    labels = viewer.layers["synthetic cells instances"].data
    # the same image through `unetkit predict` (float32 TIFF: the values survive exactly)
    tifffile.imwrite(tmp_path / "cells.tif", np.asarray(image.data, np.float32))
    out = tmp_path / "pred"
    ckpt = run / "checkpoints" / "best.safetensors"
    argv = ["predict", str(ckpt), str(tmp_path / "cells.tif"), "--out", str(out)]
    assert main([*argv, "--precision", "fp32"]) == 0
    np.testing.assert_array_equal(labels, read_image(out / "cells_instances.png"))
    with open(out / "counts.csv", newline="") as f:
        count = int(next(csv.DictReader(f))["objects"])
    assert count > 0
    points = [layer for layer in viewer.layers if layer.name.startswith("synthetic cells cells")]
    assert len(points) == 1 and points[0].name.endswith(f": {count}")
    assert len(points[0].data) == count and widget.table.shape[0] == count


def test_finetune_learns_the_corrections(widget, semantic_run: Path, qtbot) -> None:
    viewer = widget.viewer
    viewer.open_sample("unetkit", "cells")
    image, truth = viewer.layers["synthetic cells"], viewer.layers["true cells"]
    viewer.layers.selection.active = image
    widget.checkpoint.value = semantic_run
    widget.precision.value = "fp32"
    _wait(qtbot, widget, widget.segment())
    mine = viewer.layers["synthetic cells instances"]
    corrected = np.asarray(truth.data, np.int32)  # the user's corrections: the true cells
    before = dice(mine.data > 0, corrected > 0, num_classes=2).mean
    mine.data = corrected
    viewer.layers.selection.active = mine
    widget.steps.value, widget.lr.value = 30, 0.03
    steps_seen: list[int] = []
    widget._relay.step.connect(lambda step, total, loss: steps_seen.append(step))
    _wait(qtbot, widget, widget.finetune())
    after = dice(mine.data > 0, corrected > 0, num_classes=2).mean
    assert after > before + 0.2, (before, after)
    assert steps_seen[-1] == 30 and widget.progress.value == 30
    adapter = Path(widget.checkpoint.value)
    assert adapter.is_file() and adapter.parent.parent.name == "base-finetune-1"


def test_bad_input_is_a_notification(widget, tmp_path: Path, errors: list[str], qtbot) -> None:
    viewer = widget.viewer
    widget.segment()  # no image yet
    assert errors and "no Image layer" in errors[-1]
    # a checkpoint of another family: a regression model
    reg = unetkit.create_model("unet", channels=(4, 8), in_channels=1, out_channels=1)
    reg_file = unetkit.save(reg, tmp_path / "reg.safetensors", extra={"task": "regression"})
    viewer.add_image(np.random.rand(32, 32).astype(np.float32), name="grey")
    widget.checkpoint.value = reg_file
    _wait(qtbot, widget, widget.segment())
    assert "regression model, not a segmentation model" in errors[-1]
    # a two-channel model given an RGB image
    two = unetkit.create_model("unet", channels=(4, 8), in_channels=2, out_channels=2)
    two_file = unetkit.save(two, tmp_path / "two.safetensors", extra={"target": "semantic"})
    viewer.add_image(np.random.rand(32, 32, 3).astype(np.float32), name="rgb", rgb=True)
    widget.checkpoint.value = two_file
    _wait(qtbot, widget, widget.segment())
    assert "3 channel(s), but the model takes 2" in errors[-1]
    # fine-tuning an exported file: nothing trainable to attach an adapter to
    (tmp_path / "m.onnx").write_bytes(b"")
    widget.checkpoint.value = tmp_path / "m.onnx"
    assert widget.finetune() is None and "fine-tuning needs a run directory" in errors[-1]
    assert all(len(e.splitlines()) == 1 for e in errors)


def test_reader_opens_predictions_and_runs(run: Path, tmp_path: Path, unetkit_manifest) -> None:
    from unetkit.napari._reader import get_reader

    images = run.parent / "data" / "images"
    out = tmp_path / "pred"
    ckpt = run / "checkpoints" / "best.safetensors"
    assert main(["predict", str(ckpt), str(images), "--out", str(out)]) == 0
    files = sorted(out.glob("*_instances.png"))
    layers = get_reader(str(out))(str(out))
    labels = {meta["name"]: data for data, meta, kind in layers if kind == "labels"}
    assert len(labels) == len(files)
    for f in files:
        np.testing.assert_array_equal(labels[f.stem], read_image(f))
    single = get_reader(str(files[0]))(str(files[0]))
    assert single[0][2] == "labels" and single[0][1]["name"] == files[0].stem
    run_layers = get_reader(str(run))(str(run))
    assert any(meta["name"].endswith("curves") for _, meta, _ in run_layers)
    assert get_reader(str(tmp_path / "nothing.txt")) is None
    # npe2 offers the plugin for those paths
    import npe2

    readers = [
        r.command for r in npe2.PluginManager.instance().iter_compatible_readers(str(files[0]))
    ]
    assert "unetkit.get_reader" in readers
