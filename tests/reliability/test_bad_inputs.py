"""The bad-input corpus: every command, every class of bad input from issue #14.

Each case builds its bad input in its own folder and runs the CLI in-process. For every case:
a non-zero exit, exactly one line on stderr (``unetkit <cmd>: error: ...``) that names the
file or flag at fault, no traceback, every input file byte-identical afterwards, and nothing
written into the working folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import badinputs as B
import pytest

from unetkit.cli.main import main

Case = Callable[[B.Zoo, Path], tuple[list[str], str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(build: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = build
        return build

    return register


def _s(p: Path) -> str:
    return str(p)


# --- predict ---------------------------------------------------------------------------------
@case("predict-pickled-pt")
def _(z, w):
    ck = B.pickled(w / "model.pt")
    return ["predict", _s(ck), _s(z.grey), "--out", _s(w / "out")], "model.pt"


@case("predict-missing-checkpoint")
def _(z, w):
    return ["predict", _s(w / "nope.safetensors"), _s(z.grey), "--out", _s(w / "o")], "nope"


@case("predict-empty-safetensors")
def _(z, w):
    ck = B.empty(w / "empty.safetensors")
    return ["predict", _s(ck), _s(z.grey), "--out", _s(w / "o")], "empty.safetensors"


@case("predict-truncated-safetensors")
def _(z, w):
    ck = B.truncated(z.seg, w / "half.safetensors")
    return ["predict", _s(ck), _s(z.grey), "--out", _s(w / "o")], "half.safetensors"


@case("predict-huge-header")
def _(z, w):
    ck = B.huge_header(w / "huge.safetensors")
    return ["predict", _s(ck), _s(z.grey), "--out", _s(w / "o")], "huge.safetensors"


@case("predict-malformed-config-json")
def _(z, w):
    ck = B.edited(z.seg, w / "badjson.safetensors", config="{not json")
    return ["predict", _s(ck), _s(z.grey), "--out", _s(w / "o")], "badjson.safetensors"


@case("predict-diffusion-checkpoint")
def _(z, w):
    return ["predict", _s(z.diff), _s(z.grey), "--out", _s(w / "o")], "diff.safetensors"


@case("predict-nan-weights")
def _(z, w):
    return ["predict", _s(z.nan_seg), _s(z.grey), "--out", _s(w / "o")], "nan_seg.safetensors"


@case("predict-target-sparkles")
def _(z, w):
    ck = B.edited(z.seg, w / "sparkles.safetensors", target='"sparkles"')
    return ["predict", _s(ck), _s(z.grey), "--out", _s(w / "o")], "sparkles.safetensors"


@case("predict-num-classes-negative")
def _(z, w):
    ck = B.edited(z.seg, w / "neg.safetensors", num_classes="-3")
    return ["predict", _s(ck), _s(z.grey), "--out", _s(w / "o")], "neg.safetensors"


@case("predict-out-is-file")
def _(z, w):
    (w / "taken").write_text("x")
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "taken")], "--out"


@case("predict-out-under-file")
def _(z, w):
    (w / "afile").write_text("x")
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "afile" / "sub")], "--out"


@case("predict-out-is-input-folder")
def _(z, w):
    images = z.data / "images"
    return ["predict", _s(z.seg), _s(images), "--out", _s(images)], "--out"


@case("predict-tile-1")
def _(z, w):
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "o"), "--tile", "1"], "--tile"


@case("predict-tile-not-a-number")
def _(z, w):
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "o"), "--tile", "big"], "--tile"


@case("predict-overlap-nan")
def _(z, w):
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "o"), "--overlap", "nan"], (
        "--overlap"
    )


@case("predict-overlap-1.5")
def _(z, w):
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "o"), "--overlap", "1.5"], (
        "--overlap"
    )


@case("predict-batch-size-0")
def _(z, w):
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "o"), "--batch-size", "0"], (
        "--batch-size"
    )


@case("predict-min-size-negative")
def _(z, w):
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "o"), "--min-size", "-1"], (
        "--min-size"
    )


@case("predict-missing-image")
def _(z, w):
    return ["predict", _s(z.seg), _s(w / "ghost.png"), "--out", _s(w / "o")], "ghost.png"


@case("predict-corrupt-png")
def _(z, w):
    img = B.garbage(w / "broken.png")
    return ["predict", _s(z.seg), _s(img), "--out", _s(w / "o")], "broken.png"


@case("predict-nan-pixels")
def _(z, w):
    img = B.nan_tiff(w / "nan.tif")
    return ["predict", _s(z.seg), _s(img), "--out", _s(w / "o")], "nan.tif"


@case("predict-onnx-bad-metadata")
def _(z, w):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
    )
    proto = helper.make_model(graph)
    for key, value in (("format", "unetkit-checkpoint"), ("model", "unet"), ("config", "{bad")):
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, w / "bad.onnx")
    return ["predict", _s(w / "bad.onnx"), _s(z.grey), "--out", _s(w / "o")], "bad.onnx"


# --- evaluate --------------------------------------------------------------------------------
@case("evaluate-csv-onto-checkpoint")
def _(z, w):
    return ["evaluate", _s(z.seg), "--data", _s(z.data), "--csv", _s(z.seg)], "--csv"


@case("evaluate-csv-is-folder")
def _(z, w):
    return ["evaluate", _s(z.seg), "--data", _s(z.data), "--csv", _s(w)], "--csv"


@case("evaluate-num-classes-300")
def _(z, w):
    return ["evaluate", _s(z.seg), "--data", _s(z.data), "--num-classes", "300"], "--num-classes"


@case("evaluate-num-classes-0")
def _(z, w):
    return ["evaluate", _s(z.seg), "--data", _s(z.data), "--num-classes", "0"], "--num-classes"


@case("evaluate-missing-data")
def _(z, w):
    return ["evaluate", _s(z.seg), "--data", _s(w / "nodata")], "nodata"


@case("evaluate-pickled-ckpt")
def _(z, w):
    ck = B.pickled(w / "model.ckpt")
    return ["evaluate", _s(ck), "--data", _s(z.data)], "model.ckpt"


@case("evaluate-diffusion-checkpoint")
def _(z, w):
    return ["evaluate", _s(z.diff), "--data", _s(z.data)], "diff.safetensors"


# --- train -----------------------------------------------------------------------------------
@case("train-binary-config")
def _(z, w):
    conf = w / "conf.toml"
    conf.write_bytes(b"\xff\xfe\x00binary\x80")
    return ["train", "--config", _s(conf), "--out", _s(w / "run")], "conf.toml"


@case("train-invalid-toml")
def _(z, w):
    conf = w / "bad.toml"
    conf.write_text("epochs = = 3\n")
    return ["train", "--config", _s(conf), "--out", _s(w / "run")], "bad.toml"


@case("train-unknown-config-key")
def _(z, w):
    conf = w / "typo.toml"
    conf.write_text("epoks = 3\n")
    return ["train", "--config", _s(conf), "--out", _s(w / "run")], "epoks"


@case("train-config-epochs-0")
def _(z, w):
    conf = w / "zero.toml"
    conf.write_text("epochs = 0\n")
    return ["train", "--config", _s(conf), "--out", _s(w / "run")], "zero.toml"


@case("train-config-lr-nan")
def _(z, w):
    conf = w / "nan.toml"
    conf.write_text("lr = nan\n")
    return ["train", "--config", _s(conf), "--out", _s(w / "run")], "nan.toml"


@case("train-config-crop-text")
def _(z, w):
    conf = w / "text.toml"
    conf.write_text('crop = "big"\n')
    return ["train", "--config", _s(conf), "--out", _s(w / "run")], "text.toml"


@case("train-malformed-model-option")
def _(z, w):
    return ["train", "--out", _s(w / "run"), "--model-option", "channels=(4,8"], "--model-option"


@case("train-model-option-without-value")
def _(z, w):
    return ["train", "--out", _s(w / "run"), "--model-option", "channels"], "--model-option"


@case("train-epochs-0")
def _(z, w):
    return ["train", "--out", _s(w / "run"), "--epochs", "0"], "--epochs"


@case("train-lr-nan")
def _(z, w):
    return ["train", "--out", _s(w / "run"), "--lr", "nan"], "--lr"


@case("train-lr-negative")
def _(z, w):
    return ["train", "--out", _s(w / "run"), "--lr", "-0.1"], "--lr"


@case("train-crop-0")
def _(z, w):
    return ["train", "--out", _s(w / "run"), "--crop", "0"], "--crop"


@case("train-num-classes-0")
def _(z, w):
    return ["train", "--out", _s(w / "run"), "--num-classes", "0"], "--num-classes"


@case("train-out-is-file")
def _(z, w):
    (w / "run").write_text("not a folder")
    return ["train", "--data", _s(z.data), "--out", _s(w / "run")], "--out"


@case("train-out-is-data")
def _(z, w):
    return ["train", "--data", _s(z.data), "--out", _s(z.data)], "--out"


@case("train-missing-data")
def _(z, w):
    return ["train", "--data", _s(w / "nodata"), "--out", _s(w / "run"), "--no-progress"], "nodata"


@case("train-resume-with-other-data")
def _(z, w):
    run = w / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "state.safetensors").write_bytes(b"placeholder")
    B.json_file(run / "config.json", {"run": {"data": _s(w / "older-data")}})
    return ["train", "--data", _s(z.data), "--out", _s(run)], "--restart"


# --- export ----------------------------------------------------------------------------------
@case("export-onnx-onto-checkpoint")
def _(z, w):
    return ["export", _s(z.seg), "--onnx", _s(z.seg)], "--onnx"


@case("export-nothing-to-write")
def _(z, w):
    return ["export", _s(z.seg)], "--onnx"


@case("export-opset-3")
def _(z, w):
    return ["export", _s(z.seg), "--onnx", _s(w / "m.onnx"), "--opset", "3"], "--opset"


@case("export-diffusion-checkpoint")
def _(z, w):
    return ["export", _s(z.diff), "--onnx", _s(w / "m.onnx")], "diff.safetensors"


@case("export-onnx-is-folder")
def _(z, w):
    return ["export", _s(z.seg), "--onnx", _s(w)], "--onnx"


@case("export-same-file-twice")
def _(z, w):
    out = _s(w / "m.bin")
    return ["export", _s(z.seg), "--onnx", out, "--torch-export", out], "--torch-export"


@case("export-torch-export-onto-checkpoint")
def _(z, w):
    return ["export", _s(z.seg), "--torch-export", _s(z.seg)], "--torch-export"


# --- convert ---------------------------------------------------------------------------------
@case("convert-segmentation-checkpoint")
def _(z, w):
    return ["convert", _s(z.seg), _s(w / "sd"), "--to", "diffusers"], "seg.safetensors"


@case("convert-pickled-ckpt")
def _(z, w):
    ck = B.pickled(w / "sd.ckpt")
    return ["convert", _s(ck), _s(w / "o.safetensors"), "--to", "unetkit"], "sd.ckpt"


@case("convert-missing-source")
def _(z, w):
    return ["convert", _s(w / "none"), _s(w / "o.safetensors"), "--to", "unetkit"], "none"


@case("convert-dest-is-source")
def _(z, w):
    return ["convert", _s(z.diff), _s(z.diff), "--to", "ldm"], "DEST"


@case("convert-diffusers-config-list")
def _(z, w):
    folder = w / "pipe"
    folder.mkdir()
    B.json_file(folder / "config.json", [1, 2, 3])
    return ["convert", _s(folder), _s(w / "o.safetensors"), "--to", "unetkit"], "config.json"


@case("convert-truncated-source")
def _(z, w):
    ck = B.truncated(z.diff, w / "cut.safetensors")
    return ["convert", _s(ck), _s(w / "o.safetensors"), "--to", "ldm"], "cut.safetensors"


@case("convert-ldm-config-not-json")
def _(z, w):
    conf = B.garbage(w / "unet.json")
    args = ["convert", _s(z.diff), _s(w / "o.safetensors"), "--from", "ldm", "--to", "unetkit"]
    return [*args, "--config", _s(conf)], "unet.json"


# --- generate --------------------------------------------------------------------------------
@case("generate-n-0")
def _(z, w):
    return ["generate", _s(z.diff), "a digit", "--n", "0"], "--n"


@case("generate-n-negative")
def _(z, w):
    return ["generate", _s(z.diff), "a digit", "--n", "-1"], "--n"


@case("generate-steps-0")
def _(z, w):
    return ["generate", _s(z.diff), "a digit", "--steps", "0"], "--steps"


@case("generate-guidance-nan")
def _(z, w):
    return ["generate", _s(z.diff), "a digit", "--guidance", "nan"], "--guidance"


@case("generate-guidance-inf")
def _(z, w):
    return ["generate", _s(z.diff), "a digit", "--guidance", "inf"], "--guidance"


@case("generate-segmentation-checkpoint")
def _(z, w):
    return ["generate", _s(z.seg), "a digit", "--grid", _s(w / "g.png")], "seg.safetensors"


@case("generate-grid-is-folder")
def _(z, w):
    return ["generate", _s(z.diff), "a digit", "--grid", _s(w)], "--grid"


@case("generate-out-is-file")
def _(z, w):
    (w / "f").write_text("x")
    return ["generate", _s(z.diff), "a digit", "--grid", _s(w / "g.png"), "--out", _s(w / "f")], (
        "--out"
    )


@case("generate-missing-run")
def _(z, w):
    return ["generate", _s(w / "norun"), "a digit", "--grid", _s(w / "g.png")], "norun"


@case("generate-lora-scale-nan")
def _(z, w):
    return ["generate", _s(z.diff), "a digit", "--lora", f"{z.adapter}:nan"], "--lora"


# --- inpaint ---------------------------------------------------------------------------------
@case("inpaint-nan-pixels")
def _(z, w):
    img = B.nan_tiff(w / "nan.tif", (16, 16))
    return ["inpaint", _s(z.diff), _s(img), _s(z.mask), "a digit", "--steps", "2"], "nan.tif"


@case("inpaint-resample-0")
def _(z, w):
    return ["inpaint", _s(z.diff), _s(z.grey), _s(z.mask), "x", "--resample", "0"], "--resample"


@case("inpaint-guidance-nan")
def _(z, w):
    return ["inpaint", _s(z.diff), _s(z.grey), _s(z.mask), "x", "--guidance", "nan"], "--guidance"


@case("inpaint-output-onto-image")
def _(z, w):
    return ["inpaint", _s(z.diff), _s(z.grey), _s(z.mask), "x", "--output", _s(z.grey)], "--output"


@case("inpaint-missing-mask")
def _(z, w):
    out = _s(w / "o.png")
    return ["inpaint", _s(z.diff), _s(z.grey), _s(w / "nomask.png"), "x", "--output", out], (
        "nomask.png"
    )


# --- lora-train ------------------------------------------------------------------------------
@case("lora-train-alpha-nan")
def _(z, w):
    return ["lora-train", _s(z.diff), "--out", _s(w / "r"), "--alpha", "nan"], "--alpha"


@case("lora-train-rank-0")
def _(z, w):
    return ["lora-train", _s(z.diff), "--out", _s(w / "r"), "--rank", "0"], "--rank"


@case("lora-train-dropout-1.5")
def _(z, w):
    return ["lora-train", _s(z.diff), "--out", _s(w / "r"), "--dropout", "1.5"], "--dropout"


@case("lora-train-lr-0")
def _(z, w):
    return ["lora-train", _s(z.diff), "--out", _s(w / "r"), "--lr", "0"], "--lr"


@case("lora-train-out-is-file")
def _(z, w):
    return ["lora-train", _s(z.diff), "--out", _s(z.grey)], "--out"


@case("lora-train-missing-base")
def _(z, w):
    return ["lora-train", _s(w / "nobase"), "--out", _s(w / "r")], "nobase"


# --- lora-merge ------------------------------------------------------------------------------
@case("lora-merge-scale-nan")
def _(z, w):
    out = _s(w / "m.safetensors")
    return ["lora-merge", _s(z.diff), _s(z.adapter), "--out", out, "--scale", "nan"], "--scale"


@case("lora-merge-nan-adapter")
def _(z, w):
    out = _s(w / "m.safetensors")
    return ["lora-merge", _s(z.diff), _s(z.nan_adapter), "--out", out], "nan_adapter"


@case("lora-merge-out-onto-base")
def _(z, w):
    return ["lora-merge", _s(z.diff), _s(z.adapter), "--out", _s(z.diff)], "--out"


@case("lora-merge-missing-adapter")
def _(z, w):
    out = _s(w / "m.safetensors")
    return ["lora-merge", _s(z.diff), _s(w / "noadapter.safetensors"), "--out", out], "noadapter"


@case("lora-merge-pickled-adapter")
def _(z, w):
    bad = B.pickled(w / "lora.pt")
    return ["lora-merge", _s(z.diff), _s(bad), "--out", _s(w / "m.safetensors")], "lora.pt"


@case("lora-merge-nan-base")
def _(z, w):
    out = _s(w / "m.safetensors")
    return ["lora-merge", _s(z.nan_seg), _s(z.adapter), "--out", out], "nan_seg.safetensors"


@case("lora-merge-scale-overflows")
def _(z, w):
    out = _s(w / "m.safetensors")
    return ["lora-merge", _s(z.diff), _s(z.adapter), "--out", out, "--scale", "1e300"], "--out"


# --- lora-convert ----------------------------------------------------------------------------
@case("lora-convert-dest-is-source")
def _(z, w):
    return ["lora-convert", _s(z.adapter), _s(z.adapter), "--to", "kohya"], "DEST"


@case("lora-convert-truncated")
def _(z, w):
    bad = B.truncated(z.adapter, w / "cut.safetensors")
    return ["lora-convert", _s(bad), _s(w / "k.safetensors"), "--to", "kohya"], "cut.safetensors"


@case("lora-convert-model-checkpoint")
def _(z, w):
    return ["lora-convert", _s(z.seg), _s(w / "k.safetensors"), "--to", "kohya"], "seg.safetensors"


# --- lora-verify -----------------------------------------------------------------------------
@case("lora-verify-nan-adapter")
def _(z, w):
    return ["lora-verify", _s(z.diff), _s(z.nan_adapter)], "nan_adapter"


@case("lora-verify-adapter-for-another-model")
def _(z, w):
    return ["lora-verify", _s(z.seg), _s(z.adapter)], "adapter.safetensors"


@case("lora-verify-size-0")
def _(z, w):
    return ["lora-verify", _s(z.diff), _s(z.adapter), "--size", "0"], "--size"


# --- diffusion-train -------------------------------------------------------------------------
@case("diffusion-train-epochs-0")
def _(z, w):
    return ["diffusion-train", "--out", _s(w / "r"), "--epochs", "0"], "--epochs"


@case("diffusion-train-cond-dropout-2")
def _(z, w):
    return ["diffusion-train", "--out", _s(w / "r"), "--cond-dropout", "2"], "--cond-dropout"


@case("diffusion-train-ema-decay-1")
def _(z, w):
    return ["diffusion-train", "--out", _s(w / "r"), "--ema-decay", "1"], "--ema-decay"


@case("diffusion-train-lr-nan")
def _(z, w):
    return ["diffusion-train", "--out", _s(w / "r"), "--lr", "nan"], "--lr"


@case("diffusion-train-out-is-file")
def _(z, w):
    return ["diffusion-train", "--out", _s(z.grey)], "--out"


def _caption_folder(w: Path, rows: str, name: str = "metadata.csv", raw: bytes | None = None):
    folder = w / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / name).write_bytes(raw if raw is not None else rows.encode())
    return folder


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@case("diffusion-train-caption-parent-path")
def _(z, w):
    (w / "outside").mkdir()
    (w / "outside" / "secret.png").write_bytes(_png())
    folder = _caption_folder(w, "file_name,text\na.png,a\n../outside/secret.png,b\n")
    return ["diffusion-train", "--data", _s(folder), "--out", _s(w / "r")], "metadata.csv"


@case("diffusion-train-caption-absolute-path")
def _(z, w):
    secret = w / "secret.png"
    secret.write_bytes(_png())
    rows = f'{{"file_name": "a.png", "text": "a"}}\n{{"file_name": "{secret}", "text": "b"}}\n'
    folder = _caption_folder(w, rows, name="metadata.jsonl")
    return ["diffusion-train", "--data", _s(folder), "--out", _s(w / "r")], "metadata.jsonl"


@case("diffusion-train-caption-symlink-outside")
def _(z, w):
    (w / "secret.png").write_bytes(_png())
    folder = _caption_folder(w, "file_name,text\na.png,a\nlink.png,b\n")
    (folder / "link.png").symlink_to(w / "secret.png")
    return ["diffusion-train", "--data", _s(folder), "--out", _s(w / "r")], "metadata.csv"


@case("diffusion-train-caption-not-utf8")
def _(z, w):
    raw = "file_name,text\na.png,caf\u00e9\n".encode("latin-1")
    folder = _caption_folder(w, "", raw=raw)
    return ["diffusion-train", "--data", _s(folder), "--out", _s(w / "r")], "metadata.csv"


@case("diffusion-train-resume-with-other-data")
def _(z, w):
    run = w / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "state.safetensors").write_bytes(b"placeholder")
    B.json_file(run / "config.json", {"run": {"data": _s(w / "older"), "size": 32}})
    return ["diffusion-train", "--out", _s(run), "--size", "16"], "--restart"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses before run()
        rc = e.code
    return rc, capsys.readouterr().err


def _params() -> list:
    return sorted(CASES)


@pytest.mark.parametrize("name", _params())
def test_bad_input_is_one_clear_line(
    name: str, zoo: B.Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    work, cwd = tmp_path / "case", tmp_path / "cwd"
    work.mkdir()
    cwd.mkdir()
    argv, needle = CASES[name](zoo, work)
    before = B.snapshot(zoo.root, work)
    monkeypatch.chdir(cwd)
    rc, err = _run(argv, capsys)
    print(err)  # shown with -rP: the corpus doubles as a catalogue of messages
    assert rc not in (0, None), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"unetkit {argv[0]}: error: "), lines[0]
    assert needle in lines[0], lines[0]
    after = B.snapshot(zoo.root, work)
    assert {p: after.get(p) for p in before} == before, "an input file changed"
    assert not any(cwd.iterdir()), "something was written into the working folder"


def test_corpus_covers_every_command() -> None:
    commands = [
        "predict",
        "evaluate",
        "train",
        "export",
        "convert",
        "generate",
        "inpaint",
        "lora-train",
        "lora-merge",
        "lora-convert",
        "lora-verify",
        "diffusion-train",
    ]
    for command in commands:
        assert sum(n.startswith(command + "-") for n in CASES) >= 3, command
    assert len(CASES) >= 60
