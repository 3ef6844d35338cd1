"""What the round-2 sweep fixed still works for good inputs (the refusals themselves are
in ``test_bad_inputs_sweep.py``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import badinputs as B
import numpy as np
import pytest
from PIL import Image

from unetkit.cli.main import main
from unetkit.data.io import read_image


def _lively_diffusion(zoo: B.Zoo, folder: Path) -> tuple[Path, Path]:
    """The zoo's diffusion checkpoint with every weight random (its zero-initialised
    attention outputs would hide any adapter) and an adapter on all its attention layers."""
    import torch

    from unetkit.formats import checkpoint
    from unetkit.formats.loading import user_metadata
    from unetkit.formats.lora_files import save_adapter
    from unetkit.nn.lora_inject import inject_lora

    torch.manual_seed(1)
    model = checkpoint.load(zoo.diff)
    for p in model.parameters():
        p.data.normal_(0.0, 0.1)
    extra = user_metadata(checkpoint.read_metadata(zoo.diff))
    checkpoint.save(model, folder / "base.safetensors", extra=extra)
    inject_lora(model, ["attn"], r=2)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, 0.3)
    save_adapter(model, folder / "lora.safetensors", targets=["attn"])
    return folder / "base.safetensors", folder / "lora.safetensors"


def test_inpaint_with_a_run_applies_lora_as_the_pipeline_api_does(zoo: B.Zoo, tmp_path: Path):
    """`inpaint RUN --lora F:S` once ignored the adapter; now its pixels are those of
    DiffusionPipeline.inpaint with the adapter loaded through the library."""
    from unetkit.cli.sd_common import read_rgb
    from unetkit.formats.lora_files import load_adapter
    from unetkit.workflows.diffuse import DiffusionPipeline, to_uint8

    base, adapter = _lively_diffusion(zoo, tmp_path)
    argv = ["inpaint", str(base), str(zoo.grey), str(zoo.mask), "a digit", "--steps", "2"]
    argv += ["--precision", "fp32"]
    assert main([*argv, "--output", str(tmp_path / "plain.png")]) == 0
    lora = [*argv, "--output", str(tmp_path / "lora.png"), "--lora", f"{adapter}:0.7"]
    assert main(lora) == 0
    plain, adapted = (read_image(tmp_path / f"{n}.png") for n in ("plain", "lora"))
    assert not np.array_equal(plain, adapted)  # the adapter changed the picture

    pipe = DiffusionPipeline.from_checkpoint(str(base), precision="fp32")
    load_adapter(pipe.model, adapter, adapter_name="lora0", scale=0.7)
    image, _ = read_rgb(str(zoo.grey), (pipe.size, pipe.size))
    mask, _ = read_rgb(str(zoo.mask), (pipe.size, pipe.size), mask=True)
    out = pipe.inpaint(image.mean(0, keepdim=True), mask, "a digit", steps=2, guidance=3.0, seed=0)
    np.testing.assert_array_equal(np.squeeze(to_uint8(out)[0]), adapted)


def test_predict_overwrite_replaces_a_users_file_that_is_refused_without_it(
    zoo: B.Zoo, tmp_path: Path, capsys
):
    folder = tmp_path / "in"
    B.grey_png(folder / "a.png")
    truth = B.grey_png(folder / "a_mask.png", (4, 4))
    argv = ["predict", str(zoo.seg), str(folder / "a.png"), "--out", str(folder)]
    assert main(argv) == 2
    assert "a_mask.png: exists" in capsys.readouterr().err
    assert read_image(truth).shape == (4, 4)
    assert main([*argv, "--overwrite"]) == 0
    assert read_image(truth).shape == (16, 16)  # replaced, as asked
    assert main(argv) == 0  # the folder now holds a predict run: a rerun resumes it


def test_predict_rescales_within_bounds_and_names_the_flag_beyond(zoo, tmp_path, capsys):
    ck = B.edited(zoo.seg, tmp_path / "px.safetensors", pixel_size="0.5")
    argv = ["predict", str(ck), str(zoo.grey), "--out", str(tmp_path / "o")]
    assert main([*argv, "--pixel-size", "0.6"]) == 0  # zoom 1.2: resampled
    assert "scale" in (tmp_path / "o" / "counts.csv").read_text().splitlines()[0]
    capsys.readouterr()
    argv[-1] = str(tmp_path / "o2")
    assert main([*argv, "--pixel-size", "325"]) == 2  # nm given for µm: a zoom of 650
    err = capsys.readouterr().err.strip()
    assert err.startswith("unetkit predict: error: --pixel-size 325:") and "\n" not in err


def test_predict_reads_and_records_a_file_name_that_is_not_utf8(zoo, tmp_path, capsys, caplog):
    """POSIX file names are bytes: one that is not UTF-8 is read, predicted, listed in
    counts.csv and printed (escaped), and a rerun resumes it."""
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    name = os.fsdecode(raw)
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(name)
    argv = ["predict", str(zoo.seg), str(folder), "--out", str(tmp_path / "o"), "--geojson"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "caf\\udce9.png" in out  # the undecodable byte, escaped
    assert b"caf\xe9.png" in (tmp_path / "o" / "counts.csv").read_bytes()
    assert (tmp_path / "o" / os.fsdecode(b"caf\xe9_mask.png")).is_file()
    assert main(argv) == 0
    assert "1 image(s) finished by an earlier run were skipped" in caplog.text


def test_serve_address_check_accepts_a_free_port_and_refuses_a_busy_one():
    pytest.importorskip("fastapi")
    from unetkit.cli.serve import check_address
    from unetkit.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}"):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", port)  # closed: free again
    check_address("localhost", port)


def test_block_chunks_never_exceed_the_image(tmp_path):
    """`predict --block-size 100000` on a 64² image once made 100000² chunks: every write
    allocated a 9 GiB buffer and the kernel killed the process."""
    pytest.importorskip("zarr")
    from unetkit.formats.ome_zarr import create_prediction

    arrays = create_prediction(tmp_path / "p.zarr", (64, 48), chunk=100_000, probabilities=True)
    assert [a.chunks for a in arrays["mask"]] == [(64, 48)]
    assert arrays["probabilities"][0].chunks == (1, 64, 48)
    tall = create_prediction(tmp_path / "t.zarr", (5000, 3), chunk=1024)
    assert tall["instances"][0].chunks == (1024, 3)  # clipped per axis, blocks still align
