"""`unetkit predict` switches: --backend onnx (a .onnx file or a cached export of the
checkpoint), --precision, --compile (with its eager fallback)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import unetkit
from unetkit.cli.main import main
from unetkit.data.io import read_image
from unetkit.data.synthetic import write_synthetic_folder

pytest.importorskip("onnxruntime")

META = {"normalize": "zscore", "target": "semantic"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pred")
    write_synthetic_folder(root / "data", 2, shape=(40, 36), seed=3)
    torch.manual_seed(0)
    model = unetkit.create_model("unet", channels=(4, 8), in_channels=1, out_channels=2)
    with torch.no_grad():  # a decisive head: masks with real foreground to compare
        model.head.bias.copy_(torch.tensor([0.0, 0.05]))
    return unetkit.save(model, root / "best.safetensors", extra=META), root / "data" / "images"


def _predict(ck: Path, images: Path, out: Path, *flags: str) -> dict[str, np.ndarray]:
    assert (
        main(["predict", str(ck), str(images), "--out", str(out), "--tile", "24", "--tta", *flags])
        == 0
    )
    return {p.name: read_image(p) for p in sorted(out.glob("*_mask.png"))}


def test_onnx_backend_masks_equal_torch_backend(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ck, images = setup
    torch_masks = _predict(ck, images, tmp_path / "t", "--precision", "fp32")
    onnx_masks = _predict(ck, images, tmp_path / "o", "--backend", "onnx")
    assert len(torch_masks) == 2 and torch_masks.keys() == onnx_masks.keys()
    assert any(m.any() for m in torch_masks.values())
    for k in torch_masks:
        np.testing.assert_array_equal(onnx_masks[k], torch_masks[k])
    cache = ck.with_name(ck.name + ".onnx")
    assert cache.is_file()
    # the exported file itself is accepted as the model (backend inferred from .onnx)
    direct = _predict(cache, images, tmp_path / "d")
    for k in torch_masks:
        np.testing.assert_array_equal(direct[k], torch_masks[k])


def test_precision_bf16_and_auto_run(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ck, images = setup
    fp32 = _predict(ck, images, tmp_path / "f", "--precision", "fp32")
    for p in ("bf16", "auto"):
        got = _predict(ck, images, tmp_path / p, "--precision", p)
        for k in fp32:  # bf16 rounding may flip a few border pixels, no more
            assert (got[k] != fp32[k]).mean() < 0.02


def test_compile_falls_back_when_compilation_fails(
    setup: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from unetkit.inference import backends

    def broken(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        raise RuntimeError("compiler missing")

    torch._dynamo.reset()
    monkeypatch.setattr(backends, "DEFAULT_COMPILE_BACKEND", broken)
    ck, images = setup
    want = _predict(ck, images, tmp_path / "e", "--precision", "fp32")
    with caplog.at_level(logging.WARNING):
        got = _predict(ck, images, tmp_path / "c", "--precision", "fp32", "--compile")
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_predict_switch_errors(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck, images = setup
    out = str(tmp_path / "x")
    assert (
        main(["predict", str(ck), str(images), "--out", out, "--backend", "onnx", "--compile"]) == 2
    )
    assert "--compile applies to --backend torch" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(ck),
                str(images),
                "--out",
                out,
                "--backend",
                "onnx",
                "--precision",
                "bf16",
            ]
        )
        == 2
    )
    assert "bf16 applies to --backend torch" in capsys.readouterr().err
