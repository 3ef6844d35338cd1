"""CZI/ND2/LIF through bioio (the formats extra): files written by pylibCZIrw read back.

CZI files are written here by Zeiss's own ``pylibCZIrw`` (a dependency of bioio-czi) and read
through unetkit; ND2 and LIF have no Python writers, so for them only the routing, the
missing-extra line and the corrupt-file line are tested.
"""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from unetkit.data.io import list_images, load_image, read_image, read_pixel_size
from unetkit.data.volumes import read_volume
from unetkit.errors import DataError
from unetkit.workflows.segment_files import read_input


def _czi():
    pytest.importorskip("bioio_czi")
    return pytest.importorskip("pylibCZIrw.czi")


def _write_czi(path: Path, planes: np.ndarray, *, um: tuple[float, float, float]) -> Path:
    """Write C×Z×Y×X ``planes`` with pixel size (z, y, x) µm through pylibCZIrw."""
    pyczi = _czi()
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        for c in range(planes.shape[0]):
            for z in range(planes.shape[1]):
                czi.write(data=planes[c, z], plane={"C": c, "Z": z, "T": 0})
        # CZI metadata states the scale in metres per pixel
        czi.write_metadata(scale_x=um[2] * 1e-6, scale_y=um[1] * 1e-6, scale_z=um[0] * 1e-6)
    return path


def _two_channel(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(3)
    planes = rng.integers(0, 65535, size=(2, 1, 24, 36), dtype=np.uint16)
    planes[1] //= 2  # the channels differ in range too, so a swap cannot go unnoticed
    return _write_czi(tmp_path / "cells.czi", planes, um=(1.0, 0.4, 0.325)), planes


def test_czi_two_channels_values_order_and_pixel_size(tmp_path: Path) -> None:
    path, planes = _two_channel(tmp_path)
    loaded = load_image(path)
    assert loaded.axes == "YXC"
    assert loaded.image.shape == (2, 24, 36) and loaded.image.dtype == np.float32
    np.testing.assert_array_equal(np.rint(loaded.image * 65535).astype(np.uint16), planes[:, 0])
    assert loaded.pixel_size is not None
    assert loaded.pixel_size.x == pytest.approx(0.325) and loaded.pixel_size.y == pytest.approx(0.4)
    assert loaded.pixel_size.z is None  # a single plane has no z spacing
    assert read_pixel_size(path) == loaded.pixel_size
    raw = read_image(path)  # the file's dtype, channels last, as for TIFF
    assert raw.dtype == np.uint16 and raw.shape == (24, 36, 2)


def test_czi_channels_pick_and_reorder(tmp_path: Path) -> None:
    path, planes = _two_channel(tmp_path)
    swapped = load_image(path, channels=(1, 0)).image
    np.testing.assert_array_equal(np.rint(swapped * 65535).astype(np.uint16), planes[::-1, 0])
    one = load_image(path, channels=(1,)).image
    np.testing.assert_array_equal(np.rint(one[0] * 65535).astype(np.uint16), planes[1, 0])
    with pytest.raises(DataError, match=r"cells\.czi: --channels 2: the image has 2 channel"):
        load_image(path, channels=(2,))


def test_czi_colour_is_read_as_rgb(tmp_path: Path) -> None:
    pyczi = _czi()
    rgb = np.random.default_rng(6).integers(0, 255, size=(12, 14, 3), dtype=np.uint8)
    path = tmp_path / "brightfield.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as czi:
        # pylibCZIrw writes 3-sample planes as Bgr24, memory order B, G, R (its docs)
        czi.write(data=np.ascontiguousarray(rgb[..., ::-1]), plane={"C": 0, "Z": 0, "T": 0})
    loaded = load_image(path)
    assert loaded.axes == "YXC"
    np.testing.assert_array_equal(
        np.rint(loaded.image * 255).astype(np.uint8), rgb.transpose(2, 0, 1)
    )


def test_czi_zstack_reads_as_volume_and_refused_for_2d(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    planes = rng.integers(0, 255, size=(2, 3, 16, 20), dtype=np.uint8)
    path = _write_czi(tmp_path / "stack.czi", planes, um=(1.5, 0.2, 0.2))
    loaded = load_image(path, spatial_dims=3)
    assert loaded.axes == "ZYXC" and loaded.image.shape == (2, 3, 16, 20)
    np.testing.assert_array_equal(np.rint(loaded.image * 255).astype(np.uint8), planes)
    assert loaded.pixel_size.z == pytest.approx(1.5)
    volume, spacing = read_volume(path)
    assert volume.shape == (3, 16, 20, 2)
    np.testing.assert_allclose(spacing, (1.5, 0.2, 0.2))
    with pytest.raises(DataError, match=r"stack\.czi: .*a volume\? use spatial_dims=3"):
        load_image(path)


@pytest.mark.slow  # ~20 s on 2 cores: a tiny train, predict, evaluate and one CLI process
def test_train_and_predict_on_czi_folder_then_corrupt_czi_on_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unetkit.cli.main import main
    from unetkit.data.synthetic import write_synthetic_folder

    data = tmp_path / "data"
    write_synthetic_folder(data, 3, shape=(32, 32), seed=5)
    for png in sorted((data / "images").glob("*.png")):  # the same images as 1-channel CZI
        grey = read_image(png)
        grey = grey if grey.ndim == 2 else grey[..., 0]
        _write_czi(png.with_suffix(".czi"), grey[None, None], um=(1.0, 0.5, 0.5))
        png.unlink()
    assert [p.suffix for p in list_images(data / "images")] == [".czi"] * 3
    run, out = tmp_path / "run", tmp_path / "pred"
    tiny = ["--model-option", "channels=(4,8)", "--epochs", "1", "--batch-size", "2"]
    tiny += ["--crop", "32", "--no-progress", "--samples-per-epoch", "2"]
    assert main(["train", "--data", str(data), "--out", str(run), *tiny]) == 0
    ckpt = run / "checkpoints" / "best.safetensors"
    assert main(["predict", str(ckpt), str(data / "images"), "--out", str(out)]) == 0
    with open(out / "counts.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["pixel_size_um"]) == 0.5 for r in rows)
    assert read_image(out / "cell_000_mask.png").shape == (32, 32)
    assert main(["evaluate", str(ckpt), "--data", str(data)]) == 0
    # --scene travels from the CLI to the reader: these files hold one scene
    czi = str(data / "images" / "cell_000.czi")
    assert main(["predict", str(ckpt), czi, "--out", str(tmp_path / "s"), "--scene", "1"]) == 2
    assert "scene 1 does not exist; the file holds 1 scene(s)" in capsys.readouterr().err
    bad = tmp_path / "broken.czi"
    bad.write_bytes(b"junk" * 50)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unetkit.cli.main",
            "predict",
            str(ckpt),
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("unetkit predict: error: ") and "broken.czi" in lines[0]
    assert len(lines) == 1, proc.stderr


@pytest.mark.parametrize("suffix", [".czi", ".nd2", ".lif"])
def test_missing_extra_names_file_and_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(b"\0" * 64)
    plugin = {".czi": "bioio_czi", ".nd2": "bioio_nd2", ".lif": "bioio_lif"}[suffix]
    monkeypatch.setitem(sys.modules, plugin, None)  # `import` now raises ImportError
    with pytest.raises(DataError) as err:
        load_image(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert plugin.replace("_", "-") in message and "pip install 'unetkit[formats]'" in message


@pytest.mark.parametrize("suffix", [".czi", ".nd2", ".lif"])
def test_corrupt_file_is_one_line_naming_it(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip({".czi": "bioio_czi", ".nd2": "bioio_nd2", ".lif": "bioio_lif"}[suffix])
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"not a microscope file" * 20)
    for read in (load_image, read_image, read_pixel_size):
        with pytest.raises(DataError) as err:
            read(path)
        assert str(err.value).startswith(f"{path}: cannot read") and "\n" not in str(err.value)


def test_scene_refused_for_files_without_scenes(tmp_path: Path) -> None:
    png = tmp_path / "plain.png"
    png.write_bytes(b"")  # the flag is checked before the file is read
    with pytest.raises(DataError, match=r"plain\.png: --scene applies to CZI/ND2/LIF files only"):
        load_image(png, scene=0)


def test_truncated_czi_is_one_line(tmp_path: Path) -> None:
    path, _ = _two_channel(tmp_path)
    cut = tmp_path / "cut.czi"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.czi: cannot read"):
        load_image(cut)


def _fake_plugin(monkeypatch: pytest.MonkeyPatch, reader) -> None:
    """Route .lif to ``reader`` (bioio's in-memory reader stands in for a LIF project)."""
    module = types.ModuleType("bioio_lif")
    module.Reader = reader
    monkeypatch.setitem(sys.modules, "bioio_lif", module)


def test_multi_scene_reads_first_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ArrayLikeReader = pytest.importorskip("bioio.array_like_reader").ArrayLikeReader

    scenes = [np.full((2, 8, 10), s + 1, np.uint8) for s in range(3)]
    sizes = {"Z": None, "Y": 0.65, "X": 0.65}
    _fake_plugin(monkeypatch, lambda p: ArrayLikeReader(scenes, "CYX", physical_pixel_sizes=sizes))
    path = tmp_path / "project.lif"
    path.write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="unetkit.data.vendor"):
        first = load_image(path)
    assert first.image.shape == (2, 8, 10) and np.all(first.image == 1 / 255)
    assert first.pixel_size.x == pytest.approx(0.65)
    assert any(
        "holds 3 scenes" in r.getMessage() and "project.lif" in r.getMessage()
        for r in caplog.records
    )
    assert np.all(load_image(path, scene=2).image == 3 / 255)
    assert np.all(read_input(path, scene=1).image == 2 / 255)  # what predict reads
    with pytest.raises(DataError, match=r"project\.lif: scene 3 does not exist; .* 3 scene"):
        load_image(path, scene=3)


def test_time_series_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ArrayLikeReader = pytest.importorskip("bioio.array_like_reader").ArrayLikeReader

    frames = np.zeros((4, 8, 10), np.uint16)
    _fake_plugin(monkeypatch, lambda p: ArrayLikeReader(frames, "TYX"))
    path = tmp_path / "movie.lif"
    path.write_bytes(b"\0")
    with pytest.raises(DataError, match=r"movie\.lif: .*time series of 4 frames"):
        load_image(path)
