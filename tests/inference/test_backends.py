"""Inference fast paths: bf16 autocast vs fp32, onnxruntime vs torch through the same tiling/
TTA/post-processing path, torch.compile with its eager fallback, the ONNX export cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unetkit
from unetkit.data.synthetic import synth_cells
from unetkit.errors import ConfigError
from unetkit.formats.onnx import OnnxModel, read_onnx_metadata
from unetkit.inference import TileOptions
from unetkit.inference.backends import (
    CompiledModel,
    load_inference_model,
    onnx_cache_path,
    options_for,
)
from unetkit.workflows.segment import InferenceOptions, predict_image

META = {"normalize": "zscore", "target": "semantic"}


def _zscore(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((image - image.mean()) / image.std())


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """A tiny U-Net fitted for 40 steps to one synthetic cell image: confident logits, so
    the bf16 comparison measures rounding, not coin flips of an untrained net."""
    torch.manual_seed(0)
    model = unetkit.create_model("unet", channels=(4, 8, 16), in_channels=1, out_channels=2)
    image, labels = synth_cells((64, 64), seed=1)
    x, y = _zscore(image)[None, None], torch.from_numpy((labels > 0).astype(np.int64))[None]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 4-16 channel convs: thread hand-offs cost more than they save
    try:
        for _ in range(40):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(trained: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unetkit.save(trained, tmp_path_factory.mktemp("ck") / "best.safetensors", extra=META)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_bf16_agrees_with_fp32(trained: torch.nn.Module) -> None:
    """Documented tolerance of --precision bf16: probabilities within 0.05 of fp32 and the
    foreground masks overlap with Dice > 0.98 (tiled, with TTA, on an unseen image)."""
    image, labels = synth_cells((64, 56), seed=2)
    tiles = TileOptions(tile=32, tta=True)
    runs = {
        p: predict_image(trained, image[None], META, InferenceOptions(tiles, precision=p))
        for p in ("fp32", "bf16")
    }
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert np.abs(fp32.probabilities - bf16.probabilities).max() < 0.05
    assert _dice(fp32.labels == 1, bf16.labels == 1) > 0.98
    assert _dice(fp32.labels == 1, labels > 0) > 0.8  # the model did learn the cells
    assert not np.array_equal(fp32.probabilities, bf16.probabilities)  # bf16 really ran


def test_onnx_backend_equals_torch_backend(checkpoint: Path, trained: torch.nn.Module) -> None:
    model, meta = load_inference_model(checkpoint, backend="onnx")
    assert isinstance(model, OnnxModel) and meta["target"] == "semantic"
    image, _ = synth_cells((50, 70), seed=3)
    # onnxruntime runs float32: compare with the exact (fp32) torch path
    opts = InferenceOptions(
        TileOptions(tile=32, overlap=0.5, tta=True, batch_size=3), precision="fp32"
    )
    got = predict_image(model, image[None], meta, options_for(model, opts))
    want = predict_image(trained, image[None], META, opts)
    assert np.abs(got.probabilities - want.probabilities).max() < 1e-4
    np.testing.assert_array_equal(got.instances, want.instances)
    # the one-call API takes the exported file too (backend from the suffix)
    via_file = unetkit.predict(onnx_cache_path(checkpoint), image, tile=32, precision="auto")
    via_ck = unetkit.predict(checkpoint, image, tile=32, precision="fp32")
    assert np.abs(via_file.probabilities - via_ck.probabilities).max() < 1e-4


def test_onnx_cache_is_reused_and_refreshed(checkpoint: Path, tmp_path: Path) -> None:
    ck = tmp_path / checkpoint.name
    ck.write_bytes(checkpoint.read_bytes())
    load_inference_model(ck, backend="onnx")
    cache = onnx_cache_path(ck)
    assert cache.name == "best.safetensors.onnx" and cache.is_file()
    os.utime(cache, (1, 1))  # an old timestamp: a re-export would change it
    load_inference_model(ck, backend="onnx")
    assert cache.stat().st_mtime == 1
    other = unetkit.create_model("unet", channels=(4, 8), in_channels=1, out_channels=2)
    unetkit.save(other, ck, extra=META)  # new weights: the cache must be rebuilt
    model, _ = load_inference_model(ck, backend="onnx")
    assert cache.stat().st_mtime != 1 and model.config.channels == (4, 8)
    assert read_onnx_metadata(cache)["normalize"] == "zscore"


def test_backend_option_errors(checkpoint: Path) -> None:
    model, _ = load_inference_model(checkpoint, backend="onnx")
    with pytest.raises(ConfigError, match="bf16 applies to --backend torch"):
        options_for(model, InferenceOptions(precision="bf16"))
    assert options_for(model, InferenceOptions(precision="auto")).precision == "fp32"
    with pytest.raises(ConfigError, match="--backend onnx"):
        load_inference_model(onnx_cache_path(checkpoint), backend="torch")
    with pytest.raises(ConfigError, match="--compile applies to --backend torch"):
        load_inference_model(checkpoint, backend="onnx", compile=True)
    with pytest.raises(ConfigError, match="backend"):
        load_inference_model(checkpoint, backend="tensorrt")


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list) -> None:
    raise RuntimeError("no compiler here")


def test_compile_falls_back_to_eager_with_a_warning(
    trained: torch.nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    torch._dynamo.reset()
    model = CompiledModel(trained, backend=_failing_backend)
    x = torch.randn(2, 1, 24, 20)
    log = caplog.at_level(logging.WARNING, logger="unetkit.inference.backends")
    with log, torch.inference_mode():
        y = model(x)
        y2 = model(x)  # later calls run eagerly without warning again
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    with torch.inference_mode():
        torch.testing.assert_close(y, trained(x), rtol=0, atol=0)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    assert model.dims == 2 and not model.is_valid_padding  # planner seen through the wrapper


def test_compiled_model_runs_through_tiling(trained: torch.nn.Module) -> None:
    torch._dynamo.reset()
    image, _ = synth_cells((50, 41), seed=4)
    # one batch shape: one compilation; fp32 so that both run the same (exact) arithmetic
    opts = InferenceOptions(TileOptions(tile=32, batch_size=8), precision="fp32")
    got = predict_image(CompiledModel(trained, backend="eager"), image[None], META, opts)
    want = predict_image(trained, image[None], META, opts)
    np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
    with pytest.raises(unetkit.errors.InputSizeError):  # the model's own error, not swallowed
        CompiledModel(trained, backend="eager")(torch.randn(1, 3, 16, 16))
