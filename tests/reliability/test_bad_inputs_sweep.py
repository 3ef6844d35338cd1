"""The bad-input corpus, round 2: hostile inputs to the code built after round 1.

Same contract as ``test_bad_inputs.py``: a non-zero exit, exactly one line on stderr
(``unetkit <cmd>: error: ...``) naming the file or flag at fault, no traceback, every input
byte-identical afterwards and nothing written into the working folder. Each case here
ended in a traceback, a generic or wrong one-liner, or lost data before the sweep.
Cases marked ``sd`` run on a tiny random Stable Diffusion folder saved by diffusers.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import badinputs as B
import pytest

from unetkit.cli.main import main

Case = Callable[..., tuple[list[str], str]]
CASES: dict[str, tuple[Case, bool]] = {}


def case(name: str, *, sd: bool = False) -> Callable[[Case], Case]:
    def register(build: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = (build, sd)
        return build

    return register


def _s(p: Path) -> str:
    return str(p)


def _sd_copy(sd: Path, w: Path) -> Path:
    shutil.copytree(sd, w / "sd")
    return w / "sd"


def _generate(sd: Path, w: Path, *extra: str) -> list[str]:
    grid = _s(w / "g.png")
    return ["generate", _s(sd), "a cat", "--steps", "1", "--grid", grid, "--no-progress", *extra]


# --- predict: results never replace files the user already had -------------------------------
@case("predict-mask-onto-users-mask-next-to-image")
def _(z, w):
    B.grey_png(w / "in" / "a.png")
    B.grey_png(w / "in" / "a_mask.png")  # hand-drawn ground truth beside the image
    return ["predict", _s(z.seg), _s(w / "in" / "a.png"), "--out", _s(w / "in")], "a_mask.png"


@case("predict-geojson-onto-users-geojson")
def _(z, w):
    B.grey_png(w / "in" / "a.png")
    B.json_file(w / "in" / "a.geojson", {"type": "FeatureCollection", "features": []})
    argv = ["predict", _s(z.seg), _s(w / "in" / "a.png"), "--out", _s(w / "in"), "--geojson"]
    return argv, "a.geojson"


# --- evaluate: --csv / --pictures never into the data set ------------------------------------
@case("evaluate-csv-onto-an-image-of-data")
def _(z, w):
    data = shutil.copytree(z.data, w / "data")
    return [
        "evaluate",
        _s(z.seg),
        "--data",
        _s(data),
        "--csv",
        _s(data / "masks" / "cell_000.png"),
    ], ("--csv")


@case("evaluate-pictures-into-data-images")
def _(z, w):
    data = shutil.copytree(z.data, w / "data")
    return ["evaluate", _s(z.seg), "--data", _s(data), "--pictures", _s(data / "images")], (
        "--pictures"
    )


# --- export --------------------------------------------------------------------------------
@case("export-bioimageio-onto-test-image")
def _(z, w):
    image = B.grey_png(w / "t.png", (32, 32))
    argv = ["export", _s(z.seg), "--bioimageio", _s(image), "--test-image", _s(image)]
    return [*argv, "--authors", "A"], "--bioimageio"


@case("export-onnx-onto-test-image")
def _(z, w):
    image = B.grey_png(w / "t.png", (32, 32))
    argv = ["export", _s(z.seg), "--bioimageio", _s(w / "p.zip"), "--test-image", _s(image)]
    return [*argv, "--authors", "A", "--onnx", _s(image)], "--onnx"


@case("export-bioimageio-and-onnx-same-file")
def _(z, w):
    out = _s(w / "m.zip")
    return ["export", _s(z.seg), "--bioimageio", out, "--onnx", out, "--authors", "A"], "--onnx"


@case("export-run-config-not-json")
def _(z, w):
    (w / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(z.seg, w / "run" / "checkpoints" / "best.safetensors")
    (w / "run" / "config.json").write_text("{broken")
    ck = _s(w / "run" / "checkpoints" / "best.safetensors")
    return ["export", ck, "--bioimageio", _s(w / "m.zip"), "--authors", "A"], "config.json"


# --- serve: an address that cannot be listened on -------------------------------------------
@case("serve-port-in-use")
def _(z, w):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    _OPEN.append(busy)  # closed after the case
    port = str(busy.getsockname()[1])
    return ["serve", _s(z.seg), "--port", port, "--work-dir", _s(w / "work")], "--port"


@case("serve-host-of-another-computer")
def _(z, w):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    argv = ["serve", _s(z.seg), "--host", "192.0.2.1", "--work-dir", _s(w / "work")]  # TEST-NET
    return argv, "--host"


# --- generate / inpaint with a diffusion run: Stable-Diffusion-only flags ---------------------
@case("generate-run-with-image")
def _(z, w):
    grid = _s(w / "g.png")
    return ["generate", _s(z.diff), "x", "--image", _s(z.grey), "--grid", grid], "--image"


@case("generate-run-with-height")
def _(z, w):
    return ["generate", _s(z.diff), "x", "--height", "64", "--grid", _s(w / "g.png")], "--height"


@case("inpaint-run-with-negative")
def _(z, w):
    argv = ["inpaint", _s(z.diff), _s(z.grey), _s(z.mask), "x", "--output", _s(w / "o.png")]
    return [*argv, "--negative", "blurry"], "--negative"


# --- Stable Diffusion pipeline folders ------------------------------------------------------
@case("sd-scheduler-config-not-json", sd=True)
def _(z, w, sd):
    folder = _sd_copy(sd, w)
    (folder / "scheduler" / "scheduler_config.json").write_text("{nope")
    return _generate(folder, w), "scheduler_config.json"


@case("sd-scheduler-config-a-list", sd=True)
def _(z, w, sd):
    folder = _sd_copy(sd, w)
    (folder / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
    return _generate(folder, w), "scheduler_config.json"


@case("sd-scheduler-timesteps-text", sd=True)
def _(z, w, sd):
    folder = _sd_copy(sd, w)
    B.edit_json(folder / "scheduler" / "scheduler_config.json", num_train_timesteps="many")
    return _generate(folder, w), "scheduler_config.json"


@case("sd-scheduler-spacing-unknown", sd=True)
def _(z, w, sd):
    folder = _sd_copy(sd, w)
    B.edit_json(folder / "scheduler" / "scheduler_config.json", timestep_spacing="wobbly")
    return _generate(folder, w), "scheduler_config.json"


@case("sd-tokenizer-json-not-json", sd=True)
def _(z, w, sd):
    folder = _sd_copy(sd, w)
    (folder / "tokenizer" / "tokenizer.json").write_text("{nope")
    return _generate(folder, w), "tokenizer"


@case("sd-vae-config-other-widths", sd=True)
def _(z, w, sd):
    folder = _sd_copy(sd, w)
    B.edit_json(folder / "vae" / "config.json", block_out_channels=[8, 16])
    return _generate(folder, w), "vae"


@case("sd-unet-sample-size-text", sd=True)
def _(z, w, sd):
    folder = _sd_copy(sd, w)
    B.edit_json(folder / "unet" / "config.json", sample_size="big")
    return _generate(folder, w), "sample_size"


@case("sd-height-not-a-multiple", sd=True)
def _(z, w, sd):
    return _generate(sd, w, "--height", "31"), "--height"


# --- predict: checkpoint scale metadata, rescale bounds, argument order --------------------
@case("predict-checkpoint-pixel-size-text")
def _(z, w):
    ck = B.edited(z.seg, w / "px.safetensors", pixel_size='"big"')
    return ["predict", _s(ck), _s(z.grey), "--out", _s(w / "o")], "px.safetensors"


@case("predict-pixel-size-in-nm")
def _(z, w):
    ck = B.edited(z.seg, w / "px.safetensors", pixel_size="0.5")
    argv = ["predict", _s(ck), _s(z.grey), "--out", _s(w / "o"), "--pixel-size", "325"]
    return argv, "--pixel-size 325"


@case("predict-input-after-the-options")
def _(z, w):
    return ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "o"), _s(z.grey)], "unrecognized"


# --- block-wise predict --------------------------------------------------------------------
@case("block-truncated-tiff")
def _(z, w):
    pytest.importorskip("zarr")  # block-wise predict writes OME-Zarr (zarr extra)
    import numpy as np
    import tifffile

    tifffile.imwrite(w / "t.tif", np.zeros((64, 64), np.uint16))
    B.truncated(w / "t.tif", w / "t.tif")
    return ["predict", _s(z.seg), _s(w / "t.tif"), "--out", _s(w / "o"), "--block-size", "64"], (
        "t.tif"
    )


@case("block-empty-tiff")
def _(z, w):
    pytest.importorskip("zarr")  # block-wise predict writes OME-Zarr (zarr extra)
    argv = ["predict", _s(z.seg), _s(B.empty(w / "z.tif")), "--out", _s(w / "o")]
    return [*argv, "--block-size", "64"], "z.tif"


@case("block-cluster-without-port")
def _(z, w):
    pytest.importorskip("zarr")  # block-wise predict writes OME-Zarr (zarr extra)
    pytest.importorskip("distributed")
    argv = ["predict", _s(z.seg), _s(z.grey), "--out", _s(w / "o"), "--block-size", "64"]
    return [*argv, "--cluster", "tcp://", "--scheduler-timeout", "1"], "--cluster"


# --- LoRA outputs onto the weights inside an adapter folder --------------------------------
def _peft_folder(z, w) -> Path:
    from unetkit.formats.lora_files import convert_adapter

    (w / "peft").mkdir()
    convert_adapter(z.adapter, w / "peft" / "adapter_model.safetensors", format="diffusers")
    return w / "peft"


@case("lora-convert-dest-inside-source-folder")
def _(z, w):
    folder = _peft_folder(z, w)
    dest = _s(folder / "adapter_model.safetensors")
    return ["lora-convert", _s(folder), dest, "--to", "unetkit"], "DEST"


@case("lora-merge-out-onto-adapter-in-folder")
def _(z, w):
    folder = _peft_folder(z, w)
    out = _s(folder / "adapter_model.safetensors")
    return ["lora-merge", _s(z.diff), _s(folder), "--out", out], "--out"


@case("lora-convert-peft-config-not-json")
def _(z, w):
    import safetensors.torch

    (w / "peft").mkdir()
    tensors = safetensors.torch.load_file(
        str(_peft_folder(z, w / "peft") / "adapter_model.safetensors")
    )
    safetensors.torch.save_file(
        tensors, str(w / "peft" / "adapter_model.safetensors")
    )  # no metadata
    (w / "peft" / "adapter_config.json").write_text("{nope")
    return ["lora-convert", _s(w / "peft"), _s(w / "k.safetensors"), "--to", "kohya"], (
        "adapter_config.json"
    )


@case("lora-verify-size-huge")
def _(z, w):
    return ["lora-verify", _s(z.diff), _s(z.adapter), "--size", "1000000"], "--size"


# --- export: bioimage.io fields, test image, --size ----------------------------------------
@case("export-bioimageio-licence-unknown")
def _(z, w):
    argv = ["export", _s(z.seg), "--bioimageio", _s(w / "m.zip"), "--authors", "A"]
    return [*argv, "--license", "NOT-A-LICENCE"], "--license"


@case("export-bioimageio-cite-not-a-doi")
def _(z, w):
    argv = ["export", _s(z.seg), "--bioimageio", _s(w / "m.zip"), "--authors", "A"]
    return [*argv, "--cite", "x", "not a doi"], "--cite"


@case("export-bioimageio-test-image-1x1")
def _(z, w):
    argv = ["export", _s(z.seg), "--bioimageio", _s(w / "m.zip"), "--authors", "A"]
    return [*argv, "--test-image", _s(B.grey_png(w / "one.png", (1, 1)))], "--test-image"


@case("export-size-three-numbers-for-2d")
def _(z, w):
    return ["export", _s(z.seg), "--onnx", _s(w / "m.onnx"), "--size", "16", "16", "16"], "--size"


# --- train: a run saved mid-way through its first epoch ------------------------------------
@case("train-resume-state-before-metrics")
def _(z, w):
    (w / "r" / "checkpoints").mkdir(parents=True)
    B.truncated(z.seg, w / "r" / "checkpoints" / "state.safetensors")
    argv = ["train", "--out", _s(w / "r"), "--epochs", "1", "--steps-per-epoch", "1"]
    return [*argv, "--crop", "16", "--model-option", "channels=(4,8)"], "state.safetensors"


# --- generate: --steps beyond the schedule, a VAE scaling factor that is not a number -------
@case("generate-run-steps-beyond-schedule")
def _(z, w):
    return ["generate", _s(z.diff), "x", "--steps", "100000", "--grid", _s(w / "g.png")], "--steps"


@case("sd-vae-scaling-factor-nan", sd=True)
def _(z, w, sd):
    folder = _sd_copy(sd, w)
    B.edit_json(folder / "vae" / "config.json", scaling_factor=float("nan"))
    return _generate(folder, w), "scaling_factor"


# --- images: values beyond float32, a FIFO; an output name taken by a folder ----------------
@case("predict-float64-beyond-float32")
def _(z, w):
    import numpy as np
    import tifffile

    tifffile.imwrite(w / "f.tif", np.random.default_rng(0).random((16, 16)) * 1e300)
    return ["predict", _s(z.seg), _s(w / "f.tif"), "--out", _s(w / "o")], "exceed float32"


@case("predict-fifo-named-png")
def _(z, w):
    import os

    os.mkfifo(w / "pipe.png")  # reading it would wait for a writer for ever
    return ["predict", _s(z.seg), _s(w / "pipe.png"), "--out", _s(w / "o")], "not a regular file"


@case("evaluate-picture-name-taken-by-folder")
def _(z, w):
    (w / "pics" / "cell_000_comparison.png").mkdir(parents=True)
    argv = ["evaluate", _s(z.seg), "--data", _s(z.data), "--pictures", _s(w / "pics")]
    return argv, "cell_000_comparison.png: is a folder"


@case("lora-convert-dest-existing-text-file")
def _(z, w):
    (w / "notes.txt").write_text("keep me")
    return ["lora-convert", _s(z.adapter), _s(w / "notes.txt"), "--to", "kohya"], "DEST"


@case("block-two-inputs-same-stem")
def _(z, w):
    pytest.importorskip("zarr")  # block-wise predict writes OME-Zarr (zarr extra)
    for sub in ("d1", "d2"):
        B.grey_png(w / sub / "a.png", (32, 32))
    argv = ["predict", _s(z.seg), _s(w / "d1" / "a.png"), _s(w / "d2" / "a.png")]
    return [*argv, "--out", _s(w / "o"), "--block-size", "64"], "a.zarr"


# --- train data and config; a symlink loop as an input -----------------------------------
@case("train-config-model-options-a-list")
def _(z, w):
    (w / "c.toml").write_text("model_options = [1, 2]\n")
    argv = ["train", "--out", _s(w / "r"), "--config", _s(w / "c.toml")]
    return [*argv, "--model-option", "channels=(4,8)"], "model_options"


@case("train-images-with-other-channel-counts")
def _(z, w):
    import numpy as np
    from PIL import Image

    data = shutil.copytree(z.data, w / "data")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "images" / "cell_000.png")
    argv = ["train", "--data", _s(data), "--out", _s(w / "r"), "--epochs", "1"]
    return [*argv, "--crop", "16", "--model-option", "channels=(4,8)"], "channel(s)"


@case("predict-input-symlink-loop")
def _(z, w):
    import os

    os.symlink(w / "b.png", w / "a.png")
    os.symlink(w / "a.png", w / "b.png")
    return ["predict", _s(z.seg), _s(w / "a.png"), "--out", _s(w / "o")], "a.png"


_OPEN: list[socket.socket] = []


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return B.tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("serve started although its address was refused")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses before run()
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line(
    name: str, zoo: B.Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, request
) -> None:
    work, cwd = tmp_path / "case", tmp_path / "cwd"
    work.mkdir()
    cwd.mkdir()
    build, needs_sd = CASES[name]
    extra = (request.getfixturevalue("sd_dir"),) if needs_sd else ()
    argv, needle = build(zoo, work, *extra)
    roots = [zoo.root, work, *extra]
    before = B.snapshot(*roots)
    capsys.readouterr()  # what building the case printed (diffusers' writers) is not the CLI's
    monkeypatch.chdir(cwd)
    if argv[0] == "serve":  # a case that got past the checks must not serve for ever
        uvicorn = pytest.importorskip("uvicorn")
        monkeypatch.setattr(uvicorn, "run", _never)
    try:
        rc, err = _run(argv, capsys)
    finally:
        while _OPEN:
            _OPEN.pop().close()
    print(err)
    assert rc not in (0, None), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"unetkit {argv[0]}: error: "), lines[0]
    assert "unexpected" not in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    after = B.snapshot(*roots)
    assert {p: after.get(p) for p in before} == before, "an input file changed"
    assert not any(cwd.iterdir()), "something was written into the working folder"
