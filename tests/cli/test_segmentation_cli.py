"""The segmentation main job through the CLI: train -> predict -> evaluate, and bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import unetkit
from unetkit.cli.main import main
from unetkit.data.synthetic import write_synthetic_folder

TINY = [
    "--model-option",
    "channels=(4,8)",
    "--epochs",
    "1",
    "--batch-size",
    "2",
    "--crop",
    "32",
    "--no-progress",
    "--samples-per-epoch",
    "4",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    write_synthetic_folder(root, 5, shape=(48, 40), seed=1)
    return root


@pytest.fixture(scope="module")
def trained(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", str(folder), "--out", str(run), *TINY]) == 0
    return run


def test_train_writes_run_directory(trained: Path) -> None:
    for rel in (
        "config.json",
        "metrics.csv",
        "curves.png",
        "checkpoints/best.safetensors",
        "checkpoints/last.safetensors",
        "checkpoints/state.safetensors",
    ):
        assert (trained / rel).is_file(), rel
    resolved = json.loads((trained / "config.json").read_text())["run"]
    assert resolved["crop"] == 32 and resolved["target"] == "boundary"
    meta = unetkit.read_metadata(trained / "checkpoints" / "best.safetensors")
    assert meta["target"] == "boundary" and meta["config"]["out_channels"] == 3


def test_predict_writes_masks_instances_overlays_counts(
    trained: Path, folder: Path, tmp_path: Path
) -> None:
    ckpt = trained / "checkpoints" / "best.safetensors"
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(ckpt),
                str(folder / "images"),
                "--out",
                str(out),
                "--tile",
                "32",
                "--tta",
            ]
        )
        == 0
    )
    stems = sorted(p.stem for p in (folder / "images").iterdir())
    for stem in stems:
        for suffix in ("mask.png", "instances.png", "overlay.png", "objects.csv"):
            assert (out / f"{stem}_{suffix}").is_file()
    overlay = unetkit.data.io.read_image(out / f"{stems[0]}_overlay.png")
    assert overlay.shape == (48, 40, 3)
    with open(out / "counts.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).stem for r in rows] == stems
    inst = unetkit.data.io.read_image(out / f"{stems[0]}_instances.png")
    assert int(rows[0]["objects"]) == len(np.setdiff1d(np.unique(inst), [0]))


def test_evaluate_prints_metrics(
    trained: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = trained / "checkpoints" / "best.safetensors"
    assert main(["evaluate", str(ckpt), "--data", str(folder), "--mask-mode", "instances"]) == 0
    out = capsys.readouterr().out
    for key in ("dice_mean", "iou_mean", "pixel_error", "rand_error", "ap_50"):
        assert key in out


def test_toml_config_and_flags(folder: Path, tmp_path: Path) -> None:
    conf = tmp_path / "run.toml"
    conf.write_text(
        'target = "semantic"\nloss = "ce"\nlr = 0.01\n[model_options]\nchannels = [4, 8]\n'
    )
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(conf),
        "--data",
        str(folder),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--crop",
        "32",
        "--no-progress",
        "--samples-per-epoch",
        "2",
    ]
    assert main(args) == 0
    resolved = json.loads((run / "config.json").read_text())["run"]
    assert resolved["lr"] == 0.01 and resolved["loss"] == "ce"
    assert resolved["model_options"]["channels"] == [4, 8]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unetkit.cli.main", *args], capture_output=True, text=True
    )


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # one error (validation lists one line per bad file under it), never a traceback
    assert lines[0].startswith("unetkit ") and ": error: " in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) <= 4, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_bad_input_missing_folder(tmp_path: Path) -> None:
    _one_error_line(
        _cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *TINY), "nope"
    )


def test_bad_input_image_without_mask(folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    write_synthetic_folder(bad, 3, shape=(32, 32), seed=2)
    orphan = sorted((bad / "masks").iterdir())[0]
    orphan.unlink()
    _one_error_line(
        _cli("train", "--data", str(bad), "--out", str(tmp_path / "r"), *TINY), orphan.stem
    )


def test_bad_input_wrong_label_values(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    write_synthetic_folder(bad, 3, shape=(32, 32), seed=2)
    masks = sorted((bad / "masks").iterdir())
    for m in masks:  # class-index masks, one with a value outside 0..1
        unetkit.data.io.write_image(m, (unetkit.data.io.read_image(m) > 0).astype(np.uint8))
    mask = masks[1]
    unetkit.data.io.write_image(mask, np.full((32, 32), 7, np.uint8))
    proc = _cli(
        "train",
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "r"),
        "--mask-mode",
        "index",
        "--target",
        "semantic",
        *TINY,
    )
    _one_error_line(proc, mask.name, "7")


def test_bad_input_nan_and_truncated_images(trained: Path, tmp_path: Path) -> None:
    ckpt = str(trained / "checkpoints" / "best.safetensors")
    nan = tmp_path / "nan.tif"
    img = np.ones((32, 32), np.float32)
    img[3, 3] = np.nan
    tifffile.imwrite(nan, img)
    _one_error_line(_cli("predict", ckpt, str(nan), "--out", str(tmp_path / "o")), "nan.tif")
    trunc = tmp_path / "trunc.png"
    unetkit.data.io.write_image(tmp_path / "ok.png", np.zeros((32, 32), np.uint8))
    trunc.write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    _one_error_line(_cli("predict", ckpt, str(trunc), "--out", str(tmp_path / "o")), "trunc.png")


def test_predict_never_overwrites_inputs(trained: Path, tmp_path: Path) -> None:
    ckpt = str(trained / "checkpoints" / "best.safetensors")
    img = tmp_path / "a_mask.png"  # would collide with the mask output of a.png
    unetkit.data.io.write_image(tmp_path / "a.png", np.zeros((32, 32), np.uint8))
    unetkit.data.io.write_image(img, np.full((32, 32), 9, np.uint8))
    before = img.read_bytes()
    proc = _cli("predict", ckpt, str(tmp_path / "a.png"), str(img), "--out", str(tmp_path))
    _one_error_line(proc, "overwrite an input")
    assert img.read_bytes() == before


def test_predict_attention_maps(tmp_path: Path, trained: Path) -> None:
    net = unetkit.create_model("attention_unet", channels=(4, 8, 16))
    extra = {"task": "segmentation", "target": "semantic", "normalize": "zscore"}
    ckpt = unetkit.save(net, tmp_path / "att.safetensors", extra=extra)
    unetkit.data.io.write_image(
        tmp_path / "in" / "a.png", np.arange(40 * 36, dtype=np.uint8).reshape(40, 36)
    )
    assert (
        main(
            [
                "predict",
                str(ckpt),
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "o"),
                "--attention-maps",
            ]
        )
        == 0
    )
    maps = sorted((tmp_path / "o").glob("a_attention_level*.png"))
    assert len(maps) == len(net.gated_levels) >= 1
    assert unetkit.data.io.read_image(maps[0]).shape[:2] == (40, 36)
    plain = str(trained / "checkpoints" / "best.safetensors")
    _one_error_line(
        _cli(
            "predict", plain, str(tmp_path / "in"), "--out", str(tmp_path / "p"), "--attention-maps"
        ),
        "attention gates",
    )


def test_volumes_train_predict_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """3D: multi-page TIFF volumes with instance labels, through the same commands."""
    from unetkit.data.volumes import write_volume

    rng = np.random.default_rng(0)
    for i in range(3):
        labels = np.zeros((12, 20, 18), np.uint16)
        labels[2:7, 3:10, 4:12], labels[6:11, 10:17, 6:14] = 1, 2
        labels[1:4, 14:19, 1:6] = 3
        image = (labels > 0) * 150 + rng.integers(0, 60, labels.shape)
        write_volume(tmp_path / "data" / "images" / f"v{i}.tif", image.astype(np.uint8))
        write_volume(tmp_path / "data" / "masks" / f"v{i}.tif", labels)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--spatial-dims",
                "3",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(run),
                "--model-option",
                "channels=(4,8)",
                "--epochs",
                "1",
                "--batch-size",
                "1",
                "--crop",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    ckpt = run / "checkpoints" / "best.safetensors"
    assert unetkit.read_metadata(ckpt)["config"]["dims"] == 3
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(ckpt),
                str(tmp_path / "data" / "images"),
                "--out",
                str(out),
                "--tile",
                "16",
            ]
        )
        == 0
    )
    inst = unetkit.data.io.read_image(out / "v0_instances.tif")
    assert inst.shape == (12, 20, 18)
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--data", str(tmp_path / "data")]) == 0
    assert "dice_mean" in capsys.readouterr().out


def test_builtin_data_reports_heldout_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "small.toml"
    conf.write_text("synthetic_size = 64\nsynthetic_train = 2\nsynthetic_val = 1\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(conf), "--out", str(run), *TINY]) == 0
    assert "held-out synthetic images: dice" in capsys.readouterr().out
    with open(run / "heldout.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    assert len(list((run / "samples").glob("*_overlay.png"))) == 3
