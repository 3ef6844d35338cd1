"""Dense regression through the same CLI: train --task regression, predict, evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import unetkit
from unetkit.cli.main import main
from unetkit.data.io import write_image
from unetkit.regression import SyntheticDepthDataset, read_target, write_target

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
def depth_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/*.png with targets/*.pfm|.npy|.tif depth maps from the synthetic renderer."""
    root = tmp_path_factory.mktemp("depth")
    data = SyntheticDepthDataset(4, shape=(40, 36), seed=3)
    for i, suffix in zip(range(4), (".pfm", ".npy", ".tif", ".pfm"), strict=True):
        s = data[i]
        image = (np.moveaxis(s["image"].numpy(), 0, -1) * 255).clip(0, 255).astype(np.uint8)
        write_image(root / "images" / f"s{i}.png", image)
        depth = s["target"].numpy()[0]
        depth[~s["valid"].numpy()] = 0  # missing pixels
        write_target(root / "targets" / f"s{i}{suffix}", depth)
    return root


def test_train_predict_evaluate_depth(
    depth_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--task", "regression", "--data", str(depth_folder), "--out", str(run), *TINY]
        )
        == 0
    )
    meta = unetkit.read_metadata(run / "checkpoints" / "best.safetensors")
    assert meta["task"] == "regression" and meta["output"] == "depth"
    assert meta["config"]["out_channels"] == 1 and meta["config"]["in_channels"] == 3
    ckpt = str(run / "checkpoints" / "best.safetensors")
    out = tmp_path / "pred"
    assert main(["predict", ckpt, str(depth_folder / "images"), "--out", str(out)]) == 0
    depth = read_target(out / "s0_depth.tif")
    assert depth.shape == (1, 40, 36) and np.all(depth > 0)  # exp(log-depth) is positive
    assert unetkit.data.io.read_image(out / "s0_depth.png").shape == (40, 36, 3)
    assert unetkit.data.io.read_image(out / "s0_depth_preview.png").shape[1] > 36  # + colour bar
    capsys.readouterr()
    pics = tmp_path / "pics"
    assert main(["evaluate", ckpt, "--data", str(depth_folder), "--pictures", str(pics)]) == 0
    printed = capsys.readouterr().out
    for key in ("abs_rel", "rmse", "delta1"):
        assert key in printed
    # input | predicted depth | true depth, each map with a colour bar
    assert unetkit.data.io.read_image(pics / "s0_comparison.png").shape[1] > 3 * 36 + 2 * 90


def test_builtin_denoising_recipe_trains(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "regression",
                "--output",
                "linear",
                "--synthetic-regression",
                "denoise",
                "--out",
                str(run),
                *TINY,
            ]
        )
        == 0
    )
    meta = unetkit.read_metadata(run / "checkpoints" / "best.safetensors")
    assert meta["output"] == "linear" and meta["normalize"] == "none"
    assert "val/psnr" in (run / "metrics.csv").read_text()


def test_regression_loss_names_are_checked() -> None:
    from unetkit.workflows.segment_task import regression_task

    recipe = unetkit.make_recipe(task="regression", output="linear", loss="silog")
    with pytest.raises(unetkit.errors.ConfigError, match="silog"):
        regression_task(recipe)
    assert unetkit.make_recipe(task="regression").loss == "silog"  # depth default
