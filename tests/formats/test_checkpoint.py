from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import unetkit
from unetkit.errors import CheckpointError
from unetkit.formats.checkpoint import load_state, save_state


def _model() -> torch.nn.Module:
    return unetkit.create_model("unet", channels=(4, 8), norm="batch")


def test_metadata_holds_config_and_version(tmp_path: Path) -> None:
    model = _model()
    path = unetkit.save(model, tmp_path / "a.safetensors", extra={"classes": ["bg", "cell"]})
    meta = unetkit.read_metadata(path)
    assert meta["model"] == "unet" and meta["unetkit_version"] == unetkit.__version__
    assert meta["config"]["channels"] == [4, 8] and meta["classes"] == ["bg", "cell"]
    # the file is plain safetensors: readable by the reference library with no unetkit code
    tensors = safetensors.torch.load_file(str(path))
    assert set(tensors) == set(model.state_dict())


def test_load_rebuilds_and_is_eval(tmp_path: Path) -> None:
    model = _model()
    model.encoder.stages[0].block.conv1.norm.running_mean.fill_(0.5)  # buffers survive
    loaded = unetkit.load(unetkit.save(model, tmp_path / "m.safetensors"))
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_atomic_write_keeps_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    unetkit.save(_model(), path)
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        unetkit.save(_model(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp left behind


def test_pickle_and_garbage_are_refused(tmp_path: Path) -> None:
    pt = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointError, match="never unpickles"):
        unetkit.load(pt)
    trunc = tmp_path / "trunc.safetensors"
    full = unetkit.save(_model(), tmp_path / "full.safetensors").read_bytes()
    trunc.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        unetkit.load(trunc)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        unetkit.load(tmp_path / "missing.safetensors")


def test_bare_state_dict_and_mismatch_errors(tmp_path: Path) -> None:
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(CheckpointError, match="no unetkit metadata"):
        unetkit.load(bare)
    # metadata says 4/8 channels but the tensors are of another model
    other = unetkit.create_model("unet", channels=(4, 16))
    meta = {
        "format": "unetkit-checkpoint",
        "model": "unet",
        "unetkit_version": "0",
        "config": json.dumps({"channels": [4, 8]}),
    }
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    safetensors.torch.save_file(state, str(bare), metadata=meta)
    with pytest.raises(CheckpointError, match="shape keys"):
        unetkit.load(bare)


def test_training_state_round_trip(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8)).mean().backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "epoch": 4,
        "best": None,
        "history": [{"loss": 0.5}],
        "shape": (1, 2),
        "rng": torch.get_rng_state(),
    }
    loaded = load_state(save_state(tmp_path / "s.safetensors", state))
    assert loaded["epoch"] == 4 and loaded["best"] is None and loaded["shape"] == (1, 2)
    assert loaded["history"] == [{"loss": 0.5}]
    assert torch.equal(loaded["rng"], state["rng"])
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(opt2.state_dict()["state"][k]["exp_avg"], v["exp_avg"])


def test_written_files_get_the_usual_mode(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        path = unetkit.save(_model(), tmp_path / "m.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
