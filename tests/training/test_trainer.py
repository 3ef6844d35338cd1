"""fit(): learning, run-directory files, gradient accumulation, resume, SIGKILL, precision."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import trainer_toy  # registered by conftest.py

import unetkit
from unetkit.errors import ConfigError
from unetkit.formats.checkpoint import load_state
from unetkit.runtime import resolve_precision
from unetkit.training import FitConfig, fit
from unetkit.training.logging import RunDirectory

TOY = Path(trainer_toy.__file__)


toy = trainer_toy
ToySegmentation, make_model, make_task, run = (
    toy.ToySegmentation,
    toy.make_model,
    toy.make_task,
    toy.run,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny convolutions: a second thread only adds synchronisation (5x slower on a busy CI box)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if atol == 0.0:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


def test_fit_learns_and_writes_the_run_directory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = unetkit.create_model("unet", channels=(8, 16), norm="none")
    extra = {"classes": ["background", "blob"]}
    _, result = run(
        tmp_path,
        6,
        model=model,
        checkpoint_extra=extra,
        run_config={"data": "toy"},
        scheduler="warmup_cosine",
    )
    losses = [row["train/loss"] for row in result.history]
    assert losses[-1] < 0.6 * losses[0]
    assert result.history[-1]["val/accuracy"] > 0.75
    assert result.epochs_run == 6 and result.resumed_from == 0 and result.step == 6 * 4
    assert result.monitor == "val/accuracy"
    accs = [row["val/accuracy"] for row in result.history]
    assert result.best_metric == max(accs) and result.best_epoch == accs.index(max(accs)) + 1

    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "epoch",
        "step",
        "train/loss",
        "lr",
        "val/accuracy",
        "val/loss",
        "seconds",
    ]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["train/loss"]) for r in rows] == losses
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = RunDirectory(tmp_path).read_config()
    assert config["fit"]["epochs"] == 6 and config["fit"]["autocast"] == "fp32"
    assert config["model"]["name"] == "unet" and config["model"]["config"]["channels"] == [8, 16]
    assert config["run"] == {"data": "toy"} and config["data"]["train_samples"] == 16

    ckpt = tmp_path / "checkpoints"
    last = unetkit.load(ckpt / "last.safetensors")
    _assert_same_weights(last, model)
    meta = unetkit.read_metadata(ckpt / "best.safetensors")
    assert meta["classes"] == extra["classes"]
    assert meta["training"]["epoch"] == result.best_epoch
    assert meta["training"]["metrics"]["val/accuracy"] == result.best_metric
    best = unetkit.load(ckpt / "best.safetensors")
    assert isinstance(best, type(model))


def test_grad_accumulation_equals_large_batch_and_manual_sgd(tmp_path: Path) -> None:
    # 6 samples: batch 4 = [4, 2]; batch 2 x accum 2 = groups of [2+2, 2] -> same updates
    common = dict(optimizer="sgd", lr=0.05, n_train=6)
    big, _ = run(tmp_path / "big", 2, batch_size=4, **common)
    acc, _ = run(tmp_path / "acc", 2, batch_size=2, grad_accum=2, **common)
    _assert_same_weights(big, acc, atol=1e-6)

    # independent reference for the first step: SGD on the mean loss of the first 4 samples
    # of the epoch-0 order, which DistributedSampler draws from a generator seeded seed+epoch
    one, _ = run(tmp_path / "one", 1, batch_size=2, grad_accum=2, max_steps=1, **common)
    ref = make_model()
    data = ToySegmentation(6, seed=1)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:4].tolist()
    images = torch.stack([data[i]["image"] for i in order])
    masks = torch.stack([data[i]["mask"] for i in order])
    F.cross_entropy(ref(images), masks).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.05 * p.grad
    _assert_same_weights(one, ref, atol=1e-6)


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    full, full_result = run(tmp_path / "full", 4, scheduler="cosine")

    # a run of 4 epochs that stops after 2 (as if killed), resumed by a fresh process/model
    run(tmp_path / "cut", 4, scheduler="cosine", on_epoch_end=lambda e, row, m: e == 2)
    assert load_state(tmp_path / "cut/checkpoints/state.safetensors")["epoch"] == 2
    resumed, result = run(tmp_path / "cut", 4, scheduler="cosine")
    _assert_same_weights(resumed, full)
    assert result.resumed_from == 2 and result.epochs_run == 4 and result.step == 16
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    for a, b in zip(result.history, full_result.history, strict=True):
        assert a["train/loss"] == b["train/loss"] and a["val/loss"] == b["val/loss"]

    # "run 2 epochs, then resume to 4" with a schedule that does not depend on the horizon
    run(tmp_path / "two", 2)
    extended, _ = run(tmp_path / "two", 4)
    const_full, _ = run(tmp_path / "const", 4)
    _assert_same_weights(extended, const_full)
    assert len(RunDirectory(tmp_path / "two").read_metrics()) == 4

    # a finished run resumes to nothing; resume=False starts over
    again, result = run(tmp_path / "two", 4)
    assert result.resumed_from == 4 and result.epochs_run == 4
    _assert_same_weights(again, const_full)
    _, fresh = run(tmp_path / "two", 1, resume=False)
    assert fresh.resumed_from == 0 and len(fresh.history) == 1


def test_resume_rewrites_model_files_written_after_the_state(tmp_path: Path) -> None:
    # a kill between the state commit and the last/best writes leaves them an epoch behind
    model, result = run(tmp_path, 2, on_epoch_end=lambda e, row, m: e == 1)
    ckpt = tmp_path / "checkpoints"
    (ckpt / "last.safetensors").unlink()
    (ckpt / "best.safetensors").unlink()
    (ckpt / ".last.safetensors.x1y2.tmp").write_bytes(b"torn")
    _, result = run(tmp_path, 1)  # nothing left to train: only the repair runs
    assert result.resumed_from == 1 and result.best_epoch == 1
    _assert_same_weights(unetkit.load(ckpt / "last.safetensors"), model)
    _assert_same_weights(unetkit.load(ckpt / "best.safetensors"), model)
    assert unetkit.read_metadata(ckpt / "last.safetensors")["training"]["epoch"] == 1
    assert not list(ckpt.glob(".*.tmp"))


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    run_dir, epochs = tmp_path / "run", 30
    state = run_dir / "checkpoints" / "state.safetensors"
    proc = subprocess.Popen(
        [sys.executable, str(TOY), str(run_dir), "--epochs", str(epochs), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # no deadline of our own: how long start-up takes depends on the machine; a hang is
        # stopped by pytest's per-test timeout
        while not state.exists():
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # right after a commit: likely mid-way through last/best
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    saved = load_state(state)  # every file present is complete: none is half-written
    done = saved["epoch"]
    assert 1 <= done < epochs, "the run was not killed mid-way"
    for path in (run_dir / "checkpoints").glob("*.safetensors"):
        if path.name != "state.safetensors":
            unetkit.load(path)

    resumed, result = run(run_dir, epochs)
    assert result.resumed_from == done and result.epochs_run == epochs
    assert [r["epoch"] for r in result.history] == list(range(1, epochs + 1))
    assert not list(run_dir.rglob(".*.tmp"))
    for name in ("last", "best"):
        unetkit.load(run_dir / "checkpoints" / f"{name}.safetensors")
    assert load_state(state)["epoch"] == epochs
    full, _ = run(tmp_path / "full", epochs)
    _assert_same_weights(resumed, full)


def test_bf16_autocast_runs_on_cpu(tmp_path: Path) -> None:
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_precision("fp32", torch.device("cpu")) is None
    seen: list[torch.dtype] = []
    task = make_task()
    loss_fn = task.loss_fn
    task.loss_fn = lambda out, b: (seen.append(out.dtype), loss_fn(out, b))[1]
    model = make_model()
    result = fit(
        model,
        task,
        ToySegmentation(8, seed=1),
        ToySegmentation(4, seed=2),
        FitConfig(epochs=2, batch_size=4, lr=1e-2, precision="bf16"),
        run_dir=tmp_path,
        progress=False,
    )
    assert torch.bfloat16 in seen  # the forward ran under autocast
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in result.history)
    assert next(model.parameters()).dtype == torch.float32  # weights stay fp32
    assert RunDirectory(tmp_path).read_config()["fit"]["autocast"] == ("bf16")


def test_trainable_subset_only_changes_selected_parameters(tmp_path: Path) -> None:
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(tmp_path, 1, model=model, trainable=lambda name, p: name.startswith("head."))
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == k.startswith("head."), k
    config = RunDirectory(tmp_path).read_config()
    assert config["model"]["trainable_parameters"] == 2 * 4 + 2


def test_frozen_batchnorm_keeps_its_statistics_and_full_training_updates_them(
    tmp_path: Path,
) -> None:
    def bn_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return unetkit.create_model("unet", channels=(4, 8), norm="batch")

    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run(tmp_path / "head", 1, model=model, trainable=lambda name, p: name.startswith("head."))
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], model.state_dict()[k]) for k in stats)

    full = bn_model()
    run(tmp_path / "full", 1, model=full)
    assert all(not torch.equal(before[k], full.state_dict()[k]) for k in stats)


def test_without_validation_best_tracks_train_loss_and_max_steps(tmp_path: Path) -> None:
    model = make_model()
    result = fit(
        model,
        make_task(),
        ToySegmentation(8, seed=1),
        None,
        FitConfig(epochs=5, batch_size=2, lr=1e-2, precision="fp32", max_steps=6),
        run_dir=tmp_path,
        progress=False,
    )
    assert result.monitor == "train/loss" and result.step == 6
    assert result.epochs_run == 2  # 4 steps per epoch: the 6th step ends epoch 2
    assert [r["step"] for r in result.history] == [4, 6]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epochs=0), "epochs=0"),
        (dict(grad_accum=0), "grad_accum"),
        (dict(precision="fp16"), "did you mean"),
        (dict(optimizer="adam"), "did you mean 'adamw'"),
        (dict(checkpoint_extra={"training": 1}), "reserved"),
        (dict(grad_clip=0.0), "grad_clip"),
    ],
)
def test_fit_rejects_bad_options(tmp_path: Path, kwargs: dict, match: str) -> None:
    options = dict(epochs=1, batch_size=2, lr=1e-3) | kwargs
    extra = options.pop("checkpoint_extra", None)
    with pytest.raises(ConfigError, match=match):
        config = FitConfig(**options)
        fit(make_model(), make_task(), ToySegmentation(4), None, config, run_dir=tmp_path,
            checkpoint_extra=extra)  # fmt: skip


def test_unknown_monitor_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="val/dice"):
        fit(
            make_model(),
            make_task(monitor="val/dice"),
            ToySegmentation(4),
            ToySegmentation(2),
            FitConfig(epochs=1, batch_size=2, lr=1e-3),
            run_dir=tmp_path,
            progress=False,
        )


class _Killed(Exception):
    pass


def _noisy_task(kill_after: int | None = None):
    """The toy task with random input noise (augmentation: it draws from torch's global RNG,
    so a resume must restore the RNG streams); with ``kill_after`` it raises (like a kill)
    in the forward of micro-batch number ``kill_after + 1``."""
    task = make_task()
    seen = [0]
    inner = task.training_loss

    def training_loss(model, batch):
        seen[0] += 1
        if kill_after is not None and seen[0] > kill_after:
            raise _Killed
        noisy = batch["image"] + 0.3 * torch.randn_like(batch["image"])
        return inner(model, {**batch, "image": noisy})

    task.training_loss = training_loss
    return task


def test_mid_epoch_state_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    # 16 samples / batch 2 = 8 steps per epoch; a state every 3 steps (3, 6 | 11, 12, ...)
    opts = dict(batch_size=2, scheduler="cosine", save_every_steps=3)
    full, full_result = run(tmp_path / "full", 2, task=_noisy_task(), **opts)

    with pytest.raises(_Killed):  # killed in epoch 2 during step 13: the state of step 12
        run(tmp_path / "cut", 2, task=_noisy_task(kill_after=12), **opts)
    saved = load_state(tmp_path / "cut/checkpoints/state.safetensors")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, 12, 4)
    resumed, result = run(tmp_path / "cut", 2, task=_noisy_task(), **opts)
    _assert_same_weights(resumed, full)
    assert result.step == 16 and result.resumed_from == 1
    for a, b in zip(result.history, full_result.history, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-12)
        assert a["val/loss"] == b["val/loss"]


def test_mid_epoch_resume_with_grad_accum_and_ema(tmp_path: Path) -> None:
    # one optimizer step = 2 micro-batches; the state falls after micro-batch 4 of epoch 1
    opts = dict(batch_size=2, grad_accum=2, save_every_steps=2, ema_decay=0.9)
    full, _ = run(tmp_path / "full", 1, task=_noisy_task(), **opts)
    with pytest.raises(_Killed):
        run(tmp_path / "cut", 1, task=_noisy_task(kill_after=5), **opts)
    saved = load_state(tmp_path / "cut/checkpoints/state.safetensors")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (0, 2, 4)
    resumed, _ = run(tmp_path / "cut", 1, task=_noisy_task(), **opts)
    _assert_same_weights(resumed, full)


def test_save_every_steps_is_validated_and_recorded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="save_every_steps=0"):
        FitConfig(epochs=1, batch_size=1, lr=1e-3, save_every_steps=0)
    run(tmp_path, 1, save_every_steps=None)
    assert RunDirectory(tmp_path).read_config()["fit"]["save_every_steps"] is None
    assert FitConfig(epochs=1, batch_size=1, lr=1e-3).save_every_steps >= 1
