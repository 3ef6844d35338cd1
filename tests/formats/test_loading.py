"""formats.loading: one opener for checkpoints, run folders, LoRA adapters and ONNX files."""

from __future__ import annotations

import pytest
import torch

import unetkit
from unetkit.errors import CheckpointError
from unetkit.formats.checkpoint import RESERVED_METADATA_KEYS, read_metadata, save
from unetkit.formats.loading import (
    base_checkpoint,
    is_adapter_file,
    load_model_file,
    load_model_or_adapter,
    load_with_metadata,
    user_metadata,
)
from unetkit.formats.lora_files import save_adapter
from unetkit.nn.lora_inject import inject_lora

EXTRA = {"normalize": "zscore", "target": "semantic"}


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(4, 8), norm="none")
    ckpt = tmp_path / "run" / "checkpoints" / "best.safetensors"
    save(net, ckpt, extra=EXTRA)
    return tmp_path / "run", net


def test_reserved_keys_are_what_save_writes_itself(run_dir) -> None:
    _, net = run_dir
    meta = read_metadata(run_dir[0] / "checkpoints" / "best.safetensors")
    assert set(meta) == {*RESERVED_METADATA_KEYS, *EXTRA}
    assert user_metadata(meta) == EXTRA


def test_run_dir_and_file_give_the_same_model(run_dir) -> None:
    folder, net = run_dir
    x = torch.rand(1, 1, 32, 32)
    model, meta = load_model_file(folder)
    assert meta["target"] == "semantic" and meta["model"] == "unet"
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    assert base_checkpoint(folder) == (folder / "checkpoints" / "best.safetensors").resolve()
    assert not is_adapter_file(base_checkpoint(folder))


def test_adapter_file_loads_onto_its_base_with_its_settings(run_dir, tmp_path) -> None:
    folder, _ = run_dir
    base = base_checkpoint(folder)
    net = unetkit.load(base)
    inject_lora(net, ["*conv*"], r=2)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a trained adapter: it changes the output
    adapter = save_adapter(
        net, tmp_path / "a.safetensors", targets=["*conv*"], base_model=str(base)
    )
    assert is_adapter_file(adapter)
    model, meta = load_model_file(adapter)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))
    assert meta["target"] == "semantic"
    assert load_model_or_adapter(adapter)[1] == base


def test_adapter_without_its_base_names_the_base(run_dir, tmp_path) -> None:
    folder, _ = run_dir
    net = unetkit.load(base_checkpoint(folder))
    inject_lora(net, ["*conv*"], r=2)
    gone = tmp_path / "gone.safetensors"
    adapter = save_adapter(net, tmp_path / "a.safetensors", base_model=str(gone))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        load_model_file(adapter)


def test_missing_path_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_model_file(tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints/best"):
        base_checkpoint(tmp_path / "empty")


def test_onnx_file_written_by_the_exporter_runs_like_the_model(run_dir, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from unetkit.formats.onnx import export_onnx

    folder, net = run_dir
    path = export_onnx(net.eval(), tmp_path / "net.onnx", metadata=EXTRA)
    model, meta = load_model_file(path)
    assert meta["target"] == "semantic" and meta["model"] == "unet"
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-4, atol=1e-4)


def test_load_with_metadata_takes_a_run_directory(run_dir) -> None:
    # evaluate and the benchmarks open models this way; predict already took run folders
    folder, _ = run_dir
    model, meta = load_with_metadata(folder)
    assert meta["target"] == "semantic" and isinstance(model, torch.nn.Module)
    same, _ = load_with_metadata(base_checkpoint(folder))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), same.eval()(x))
