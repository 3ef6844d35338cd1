"""The guards one by one: output paths, flag parsers, resume identity, tile capping,
skipped folder entries, and lora-verify's exit status."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from unetkit.cli import flags as F
from unetkit.cli.main import main
from unetkit.data.io import list_images
from unetkit.errors import ConfigError, OutputError
from unetkit.inference import TileOptions
from unetkit.inference.tiling import predict_tiled
from unetkit.outputs import output_file, output_folder
from unetkit.registry import create_model
from unetkit.runlock import check_same_run


def test_output_that_is_a_hard_link_to_an_input_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "ck.safetensors"
    src.write_bytes(b"weights")
    os.link(src, tmp_path / "alias.onnx")
    with pytest.raises(OutputError, match="--onnx .*alias.onnx: is an input"):
        output_file(tmp_path / "alias.onnx", flag="--onnx", inputs=[src])


def test_output_through_a_symlink_to_an_input_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(OutputError, match="is an input"):
        output_folder(tmp_path / "link", flag="--out", inputs=[data])


def test_new_nested_output_folders_are_fine_and_not_created(tmp_path: Path) -> None:
    out = output_folder(tmp_path / "a" / "b", flag="--out", inputs=[tmp_path / "in.png"])
    assert out == tmp_path / "a" / "b" and not (tmp_path / "a").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write in"):
            output_file(locked / "x.csv", flag="--csv")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("parser", "text", "ok"),
    [
        (F.positive_int, "1", True),
        (F.positive_int, "0", False),
        (F.positive_int, "1.5", False),
        (F.nonnegative_int, "0", True),
        (F.tile_size, str(F.MIN_TILE - 1), False),
        (F.finite_float(0, 1, hi_open=True), "0.999", True),
        (F.finite_float(0, 1, hi_open=True), "1", False),
        (F.positive_float, "0", False),
        (F.positive_float, "1e-9", True),
        (F.any_float, "-inf", False),
        (F.any_float, "NaN", False),
        (F.any_float, "-3", True),
        (F.int_at_least(1, 65535), "65536", False),
    ],
)
def test_flag_parsers(parser, text: str, ok: bool) -> None:
    if ok:
        parser(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parser(text)


def _fake_run(run: Path, saved: dict) -> None:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "state.safetensors").write_bytes(b"x")
    (run / "config.json").write_text(__import__("json").dumps({"run": saved}))


def test_resume_identity_compares_paths_by_what_they_name(tmp_path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    _fake_run(tmp_path / "run", {"data": str(tmp_path / "data"), "model_options": {"c": [4, 8]}})
    monkeypatch.chdir(tmp_path)
    check_same_run(tmp_path / "run", {"data": "data", "model_options": {"c": (4, 8)}})  # same
    with pytest.raises(ConfigError, match=r"model_options .* -> \{'c': \(4, 16\)\}"):
        check_same_run(tmp_path / "run", {"data": "data", "model_options": {"c": (4, 16)}})


def test_resume_identity_looks_into_nested_settings(tmp_path: Path) -> None:
    _fake_run(tmp_path / "run", {"lora": {"r": 4, "targets": ["attn"]}})
    check_same_run(tmp_path / "run", {"lora.r": 4, "lora.targets": ["attn"], "lora.x": 1})
    with pytest.raises(ConfigError, match="lora.r 4 -> 8"):
        check_same_run(tmp_path / "run", {"lora.r": 8})


def test_a_huge_tile_is_capped_at_the_image_and_predicts_the_same() -> None:
    torch.manual_seed(0)
    net = create_model("unet", channels=(4, 8)).eval()
    image = torch.rand(1, 40, 36)
    whole = predict_tiled(net, image, TileOptions(tile=(40, 36)))
    huge = predict_tiled(net, image, TileOptions(tile=100_000))  # padded, this would ask for 80 GB
    assert torch.equal(huge, whole)


def test_folders_and_loops_named_like_images_are_named_in_a_warning(tmp_path, caplog) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "x.png").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "gone.tif").symlink_to(tmp_path / "missing.tif")
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in list_images(tmp_path)] == ["a.png"]
    text = caplog.text
    assert "skipped 3 entries" in text
    assert all(name in text for name in ("gone.tif", "loop.png", "x.png"))


def test_lora_verify_fails_on_partly_unmatched_adapters_after_reporting(zoo, tmp_path, capsys):
    tensors = safetensors.torch.load_file(str(zoo.adapter))
    with safetensors.safe_open(str(zoo.adapter), framework="pt") as f:
        meta = f.metadata()
    tensors["mid_block.nowhere.to_q.lora_A.weight"] = torch.zeros(2, 8)
    tensors["mid_block.nowhere.to_q.lora_B.weight"] = torch.zeros(8, 2)
    odd = tmp_path / "odd.safetensors"
    safetensors.torch.save_file(tensors, str(odd), metadata=meta)
    assert main(["lora-verify", str(zoo.diff), str(odd)]) == 2
    out, err = capsys.readouterr()
    assert "layers touched: 32" in out  # the report comes first
    assert err.startswith(f"unetkit lora-verify: error: {odd}: 1 of 33 adapter modules match")


def test_a_model_too_large_for_memory_is_one_line_and_leaves_no_run_folder(
    zoo, tmp_path, capsys
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", str(zoo.data), "--out", str(run), "--no-progress"]
    assert main([*argv, "--model-option", "channels=(200000,400000)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unetkit train: error: out of memory (asked for ")
    assert err.count("\n") == 1
    assert not run.exists()


def test_verbose_shows_the_traceback_before_the_line(zoo, tmp_path, capsys) -> None:
    missing = tmp_path / "none.safetensors"
    assert main(["-v", "predict", str(missing), str(zoo.grey), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith(
        f"unetkit predict: error: {missing}"
    )


def test_an_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys) -> None:
    def broken(args):
        raise TypeError("'<' not supported between\ninstances of 'str' and 'int'")

    import unetkit.cli.main as cli

    monkeypatch.setattr(cli, "build_parser", _with_run(cli.build_parser, "models", broken))
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "unetkit models: error: unexpected TypeError: '<' not supported between; instances of "
        "'str' and 'int' (rerun with -v for the traceback)\n"
    )


def _with_run(build, command: str, run):
    def patched(*args, **kwargs):
        parser = build(*args, **kwargs)
        for action in parser._subparsers._group_actions:
            action.choices[command].set_defaults(run=run)
        return parser

    return patched


def test_a_real_process_prints_exactly_one_line(zoo, tmp_path: Path) -> None:
    import subprocess
    import sys

    import unetkit

    env = {**os.environ, "PYTHONPATH": str(Path(unetkit.__file__).parents[1])}
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    cmd = [sys.executable, "-m", "unetkit.cli.main", "predict", str(pickled), str(zoo.grey)]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        f"unetkit predict: error: {pickled}: a pickled .pt file"
    )
