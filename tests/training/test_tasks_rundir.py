"""Task metric reduction and the run directory (CSV round trip, plots, rank-0-only writes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import unetkit
from unetkit.errors import ConfigError, DataError
from unetkit.training.logging import RunDirectory, csv_columns
from unetkit.training.tasks import SupervisedTask, Task, batch_size_of, reduce_sums


def test_reduce_sums_uses_count_and_per_metric_denominators() -> None:
    sums = {
        "count": 8.0,
        "loss": 4.0,
        "dice": 3.0,
        "dice/count": 4.0,
        "empty": 1.0,
        "empty/count": 0.0,
    }
    out = reduce_sums(sums)
    assert out["val/loss"] == 0.5 and out["val/dice"] == 0.75
    assert math.isnan(out["val/empty"])
    assert set(out) == {"val/loss", "val/dice", "val/empty"}
    with pytest.raises(ConfigError, match="'count'"):
        reduce_sums({"loss": 1.0})


def test_supervised_task_sums_match_per_sample_average() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(1, 3, 1)
    batch = {"image": torch.randn(5, 1, 4, 4), "mask": torch.randint(0, 3, (5, 4, 4))}

    def metric(out: torch.Tensor, b: dict) -> dict[str, float]:
        return {"acc": float((out.argmax(1) == b["mask"]).float().mean((1, 2)).sum())}

    task = SupervisedTask(lambda out, b: F.cross_entropy(out, b["mask"]), metric)
    assert isinstance(task, Task)
    assert (task.monitor, task.mode) == ("val/loss", "min")
    with torch.no_grad():
        stats = task.validation_metrics(model, batch)
        logits = model(batch["image"]).double()
    # independent float64 reference: per-sample CE and accuracy
    ce = F.cross_entropy(logits, batch["mask"], reduction="none").mean((1, 2))
    acc = (logits.argmax(1) == batch["mask"]).double().mean((1, 2))
    assert stats["count"] == 5
    assert stats["loss"] == pytest.approx(float(ce.sum()), rel=1e-5)
    assert stats["acc"] == pytest.approx(float(acc.sum()), rel=1e-12)
    loss = task.training_loss(model, batch)
    assert loss.ndim == 0 and float(loss.detach()) == pytest.approx(float(ce.mean()), rel=1e-5)


def test_supervised_task_errors() -> None:
    with pytest.raises(ConfigError, match="mode"):
        SupervisedTask(lambda o, b: o.sum(), mode="maximum")
    task = SupervisedTask(lambda o, b: o.mean(), lambda o, b: {"count": 1.0})
    with pytest.raises(ConfigError, match="reserved key 'count'"):
        task.validation_metrics(nn.Identity(), {"image": torch.zeros(2, 1)})
    with pytest.raises(DataError, match="'image'"):
        task.training_loss(nn.Identity(), {"x": torch.zeros(2, 1)})


def test_batch_size_of() -> None:
    assert batch_size_of({"image": torch.zeros(3, 1, 2, 2), "mask": torch.zeros(3)}) == 3
    assert batch_size_of({"latents": torch.zeros(7, 4)}) == 7
    assert batch_size_of([torch.zeros(2, 5), torch.zeros(2)]) == 2
    with pytest.raises(DataError):
        batch_size_of({"caption": "a cat"})


HISTORY = [
    {
        "epoch": 1,
        "step": 4,
        "train/loss": 0.9,
        "lr": 0.01,
        "val/loss": 0.8,
        "val/dice": 0.5,
        "seconds": 1.25,
    },
    {
        "epoch": 2,
        "step": 8,
        "train/loss": 0.1 + 0.2,
        "lr": 0.005,
        "val/loss": 0.7,
        "val/dice": float("nan"),
        "seconds": 1.0,
    },
]


def test_metrics_csv_round_trip(tmp_path) -> None:
    run = RunDirectory(tmp_path / "run", main=True)
    run.write_metrics(HISTORY)
    lines = run.metrics_path.read_text().splitlines()
    assert lines[0] == "epoch,step,train/loss,lr,val/loss,val/dice,seconds"
    rows = run.read_metrics()
    assert len(rows) == 2
    assert rows[1]["train/loss"] == 0.1 + 0.2  # exact float round trip
    assert rows[0]["epoch"] == 1 and isinstance(rows[0]["step"], int)
    assert math.isnan(rows[1]["val/dice"])


def test_csv_columns_keeps_seconds_last_and_new_columns() -> None:
    cols = csv_columns([{"seconds": 1, "epoch": 1, "x": 2}, {"epoch": 2, "y": 3, "step": 5}])
    assert cols == ["epoch", "step", "x", "y", "seconds"]


def test_curves_png_and_config(tmp_path) -> None:
    run = RunDirectory(tmp_path, main=True)
    assert run.plot_curves(HISTORY) == run.curves_path
    with Image.open(run.curves_path) as im:
        assert im.format == "PNG" and im.width > 500
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5  # something was drawn
    run.write_config({"fit": {"lr": 0.1}, "fn": len})
    cfg = run.read_config()
    assert cfg["fit"] == {"lr": 0.1} and cfg["fn"] == repr(len)


def test_non_main_rank_writes_nothing(tmp_path) -> None:
    run = RunDirectory(tmp_path / "r", main=False)
    run.prepare()
    run.write_config({"a": 1})
    run.write_metrics(HISTORY)
    run.plot_curves(HISTORY)
    assert run.save_state({"epoch": 1}) is None
    model = unetkit.create_model("unet", channels=(4, 8), norm="none")
    assert run.save_model(model, "last") is None
    assert not (tmp_path / "r").exists()


def test_prepare_removes_stale_temp_files_and_checks_folder(tmp_path) -> None:
    run = RunDirectory(tmp_path, main=True)
    run.checkpoint_dir.mkdir()
    stale = run.checkpoint_dir / ".state.safetensors.abc123.tmp"
    stale.write_bytes(b"half")
    keep = run.checkpoint_dir / "notes.txt"
    keep.write_text("x")
    run.prepare()
    assert not stale.exists() and keep.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        RunDirectory(tmp_path / "file", main=True).prepare()


def test_save_model_writes_loadable_checkpoint_with_extra(tmp_path) -> None:
    run = RunDirectory(tmp_path, main=True)
    model = unetkit.create_model("unet", channels=(4, 8), norm="none")
    path = run.save_model(model, "best", extra={"classes": ["bg", "cell"]})
    assert path == run.best_path
    assert unetkit.read_metadata(path)["classes"] == ["bg", "cell"]
    loaded = unetkit.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(ConfigError, match="which"):
        run.save_model(model, "first")
