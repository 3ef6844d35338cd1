"""`unetkit export`: ONNX and torch.export files from a checkpoint; one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unetkit
from unetkit.cli.main import main

pytest.importorskip("onnxruntime")

META = {"normalize": "zscore", "target": "semantic"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = unetkit.create_model("unet", channels=(4, 8), in_channels=1, out_channels=2)
    return unetkit.save(model, tmp_path_factory.mktemp("ck") / "m.safetensors", extra=META)


def test_export_writes_onnx_and_torch_export(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unetkit.formats.onnx import OnnxModel, read_onnx_metadata
    from unetkit.formats.torch_export import load_torch_export

    onnx_file, pt2 = tmp_path / "out" / "m.onnx", tmp_path / "m.pt2"
    args = ["export", str(checkpoint), "--onnx", str(onnx_file), "--torch-export", str(pt2)]
    assert main([*args, "--size", "24"]) == 0  # traced at 25: the pad branch must be seen
    out = capsys.readouterr().out
    assert "batch dynamic, size dynamic" in out and "torch.export" in out
    meta = read_onnx_metadata(onnx_file)
    assert meta["model"] == "unet" and meta["normalize"] == "zscore"
    assert meta["onnx"]["size"] == [25, 25] and meta["onnx"]["opset"] == 17
    model = unetkit.load(checkpoint)
    x = torch.randn(2, 1, 30, 21)
    with torch.inference_mode():
        want = model(x)
        assert (OnnxModel(onnx_file)(x) - want).abs().max() <= 1e-4 * want.abs().max()
        y = torch.randn(3, 1, 24, 24)  # the .pt2 program takes the size as given
        torch.testing.assert_close(load_torch_export(pt2)(y), model(y))


def test_static_export_with_opset(checkpoint: Path, tmp_path: Path) -> None:
    from unetkit.formats.onnx import read_onnx_metadata

    target = tmp_path / "s.onnx"
    assert (
        main(
            [
                "export",
                str(checkpoint),
                "--onnx",
                str(target),
                "--static",
                "--size",
                "20",
                "28",
                "--opset",
                "18",
            ]
        )
        == 0
    )
    info = read_onnx_metadata(target)["onnx"]
    assert info == {
        "dynamic_spatial": False,
        "size": [20, 28],
        "opset": 18,
        "exporter": "torchscript",
    }


@pytest.mark.parametrize(
    ("content", "flags", "message"),
    [
        (b"not a checkpoint at all", ["--onnx", "x.onnx"], "not a readable .safetensors file"),
        (None, ["--onnx", "x.onnx"], "no such checkpoint file"),
        (b"", [], "nothing to write"),
    ],
)
def test_errors_are_one_line(
    content: bytes | None,
    flags: list[str],
    message: str,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = checkpoint
    if content is not None or message.startswith("no such"):
        source = tmp_path / "weights.safetensors"
        if content:
            source.write_bytes(content)
    flags = [str(tmp_path / f) if f.endswith(".onnx") else f for f in flags]
    assert main(["export", str(source), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unetkit export: error: ")
    assert message in err
    assert not (tmp_path / "x.onnx").exists()


def test_non_dynamic_family_error_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = unetkit.create_model(
        "swin_unet", patch_size=2, embed_dim=8, depths=(2, 1), num_heads=(1, 2), window_size=3
    )
    ck = unetkit.save(model, tmp_path / "swin.safetensors", extra=META)
    assert main(["export", str(ck), "--onnx", str(tmp_path / "s.onnx"), "--size", "33"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--static --size" in err
