"""LoRA fine-tuning of a segmentation U-Net through the trainer: only adapters change,
the run's checkpoints are adapter files, and merging reproduces the adapted model."""

from __future__ import annotations

import pytest
import torch

import unetkit
from unetkit.data.synthetic import write_synthetic_folder
from unetkit.errors import ConfigError
from unetkit.formats.loading import load_model_or_adapter
from unetkit.formats.lora_files import load_adapter, read_adapter, write_adapter
from unetkit.nn.lora_inject import merge_and_unload
from unetkit.workflows import segment_train as R
from unetkit.workflows.adapt import LoRAOptions, train_lora


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    write_synthetic_folder(root / "data", 4, shape=(40, 40), seed=1)
    recipe = R.make_recipe(
        "modern",
        data=str(root / "data"),
        model_options={"channels": (4, 8)},
        epochs=1,
        batch_size=2,
        crop=32,
        samples_per_epoch=4,
    )
    R.train(recipe, root / "base", progress=False)
    write_synthetic_folder(root / "shifted", 4, shape=(40, 40), seed=7, style="phase")
    return root


@pytest.fixture(scope="module")
def lora_adapter(base):
    """The adapter file of a one-epoch LoRA run on the shifted images."""
    train_lora(
        base / "base",
        base / "lora",
        LoRAOptions(targets=("attn+ff+conv",), r=2),
        data=str(base / "shifted"),
        epochs=1,
        batch_size=2,
        crop=32,
        samples_per_epoch=4,
        lr=1e-2,
        progress=False,
    )
    return base / "lora" / "checkpoints" / "best.safetensors"


def test_lora_run_trains_only_adapters_and_writes_small_files(base, lora_adapter):
    ckpt = base / "base" / "checkpoints" / "best.safetensors"
    before = unetkit.load(ckpt).state_dict()
    adapter = lora_adapter
    info = read_adapter(adapter).info
    assert info["base_model"] == str(ckpt.resolve())
    adapted, described = load_model_or_adapter(adapter)
    assert described == ckpt.resolve()
    # base weights are untouched by training; the adapters are not zero after it
    merged = merge_and_unload(adapted)
    after = merged.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    fresh = unetkit.load(ckpt)
    load_adapter(fresh, adapter)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), merged.eval()(x), atol=1e-5, rtol=1e-5)


def test_lora_options_are_validated():
    with pytest.raises(ConfigError, match="rank"):
        LoRAOptions(r=0)


def test_predict_and_evaluate_take_a_lora_adapter_file(base, lora_adapter, tmp_path, capsys):
    from unetkit.cli.main import main
    from unetkit.workflows.segment import load_for_inference

    adapter = lora_adapter
    model, meta = load_for_inference(adapter)
    assert (
        meta["target"]
        == unetkit.read_metadata(base / "base/checkpoints/best.safetensors")["target"]
    )
    assert any(".lora_A." in k for k in model.state_dict())
    # the LoRA run calibrates its own seed threshold; predict reads it over the base's
    threshold = read_adapter(adapter).info["inference"]["seed_threshold"]
    assert meta["seed_threshold"] == threshold
    adapter_file = read_adapter(adapter)
    adapter_file.info["inference"]["seed_threshold"] = 0.123
    write_adapter(adapter_file, tmp_path / "moved.safetensors")
    assert load_for_inference(tmp_path / "moved.safetensors")[1]["seed_threshold"] == 0.123
    assert main(["evaluate", str(adapter), "--data", str(base / "shifted")]) == 0
    assert "dice" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert main(["predict", str(adapter), str(base / "shifted" / "images"), "--out", str(out)]) == 0
    assert len(list(out.glob("*_mask.png"))) == 4
