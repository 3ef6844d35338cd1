"""diffusion-train -> generate -> inpaint -> convert, end to end on the built-in digits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unetkit.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    assert (
        main(["diffusion-train", "--recipe", "digits-quick", "--out", str(out), "--no-progress"])
        == 0
    )
    return out


def test_training_writes_checkpoints_and_sample_grid(run_dir):
    assert (run_dir / "checkpoints" / "best.safetensors").is_file()
    assert (run_dir / "caption_embeddings.safetensors").is_file()
    grid = np.asarray(Image.open(run_dir / "samples" / "epoch_001.png"))
    assert grid.ndim == 2 and grid.shape[0] > 10 * 32  # a row per digit prompt


def test_generate_writes_grid_and_samples(run_dir, tmp_path, capsys):
    grid = tmp_path / "threes.png"
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "a handwritten digit three",
                "--n",
                "3",
                "--steps",
                "3",
                "--grid",
                str(grid),
                "--out",
                str(tmp_path / "each"),
            ]
        )
        == 0
    )
    assert grid.is_file()
    files = sorted((tmp_path / "each").glob("*.png"))
    assert len(files) == 3 and np.asarray(Image.open(files[0])).shape == (32, 32)


def test_inpaint_keeps_unmasked_pixels_exactly(run_dir, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "filled.png"
    assert (
        main(
            [
                "inpaint",
                str(run_dir),
                str(tmp_path / "img.png"),
                str(tmp_path / "mask.png"),
                "a handwritten digit one",
                "--steps",
                "3",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    filled = np.asarray(Image.open(out))
    keep = mask == 0
    np.testing.assert_array_equal(filled[keep], image[keep])
    assert np.abs(filled[~keep].astype(int) - image[~keep]).mean() > 10


def test_inpaint_resizes_other_sizes_and_rejects_empty_mask(run_dir, tmp_path, capsys):
    Image.fromarray(np.full((20, 24), 128, np.uint8)).save(tmp_path / "small.png")
    mask = np.zeros((20, 24), np.uint8)
    mask[5:15, 5:15] = 255
    Image.fromarray(mask).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    args = ["inpaint", str(run_dir), str(tmp_path / "small.png"), str(tmp_path / "small_mask.png")]
    out = tmp_path / "o.png"
    assert main([*args, "x", "--steps", "2", "--output", str(out), "--no-progress"]) == 0
    assert "small.png resized 24x20 -> 32x32" in capsys.readouterr().out
    assert np.asarray(Image.open(out)).shape == (32, 32)
    assert (
        main(
            ["inpaint", str(run_dir), str(tmp_path / "empty.png"), str(tmp_path / "empty.png"), "x"]
        )
        == 2
    )
    assert "nothing to inpaint" in capsys.readouterr().err


def test_convert_round_trip_through_diffusers_and_ldm(run_dir, tmp_path):
    import torch

    from unetkit.formats.checkpoint import load

    ckpt = run_dir / "checkpoints" / "best.safetensors"
    assert main(["convert", str(ckpt), str(tmp_path / "diffusers"), "--to", "diffusers"]) == 0
    assert (tmp_path / "diffusers" / "config.json").is_file()
    assert (
        main(
            [
                "convert",
                str(tmp_path / "diffusers"),
                str(tmp_path / "back.safetensors"),
                "--to",
                "unetkit",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "convert",
                str(tmp_path / "back.safetensors"),
                str(tmp_path / "ldm.safetensors"),
                "--to",
                "ldm",
            ]
        )
        == 0
    )
    a, b = load(ckpt).state_dict(), load(tmp_path / "back.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_refuses_pickles_and_foreign_files(tmp_path, capsys):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04not really")
    assert (
        main(["convert", str(tmp_path / "model.ckpt"), str(tmp_path / "o"), "--to", "diffusers"])
        == 2
    )
    assert "pickle" in capsys.readouterr().err


def test_lora_train_generate_verify_convert_merge(run_dir, tmp_path, capsys):
    import torch

    from unetkit.workflows.diffuse import DiffusionPipeline

    out = tmp_path / "nine"
    assert (
        main(
            [
                "lora-train",
                str(run_dir),
                "--out",
                str(out),
                "--digits",
                "9",
                "--limit-per-digit",
                "8",
                "--epochs",
                "1",
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--rank",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    adapter = out / "checkpoints" / "best.safetensors"
    base_size = (run_dir / "checkpoints" / "best.safetensors").stat().st_size
    assert adapter.stat().st_size < 0.3 * base_size
    capsys.readouterr()
    assert main(["lora-verify", str(run_dir), str(adapter)]) == 0
    report = capsys.readouterr().out
    assert "layers touched:" in report and "unmatched modules: 0" in report
    kohya = tmp_path / "kohya.safetensors"
    assert main(["lora-convert", str(adapter), str(kohya), "--to", "kohya"]) == 0
    merged = tmp_path / "merged.safetensors"
    assert main(["lora-merge", str(run_dir), str(kohya), "--out", str(merged)]) == 0
    # the adapter run (base + adapter) and the merged checkpoint sample the same images
    a = DiffusionPipeline.from_checkpoint(out).generate(["a handwritten digit nine"], steps=2)
    b = DiffusionPipeline.from_checkpoint(merged).generate(["a handwritten digit nine"], steps=2)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_lora_files_that_match_nothing_are_an_error(run_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    bogus = tmp_path / "bogus.safetensors"
    save_file(
        {"foo.bar.lora_A.weight": torch.zeros(2, 4), "foo.bar.lora_B.weight": torch.zeros(4, 2)},
        str(bogus),
    )
    assert main(["lora-verify", str(run_dir), str(bogus)]) == 2
    assert "foo.bar" in capsys.readouterr().err


def test_lora_on_a_diffusion_base_keeps_the_base_objective(tmp_path):
    import json

    from unetkit.workflows import diffuse_train as R
    from unetkit.workflows.adapt import LoRAOptions, train_lora

    base = R.make_diffusion_recipe("digits-quick", prediction_type="epsilon", beta_end=0.012)
    R.train_diffusion(base, tmp_path / "eps", progress=False)
    train_lora(
        tmp_path / "eps",
        tmp_path / "lora",
        LoRAOptions(r=2),
        progress=False,
        max_steps=1,
        limit_per_digit=2,
        sample_every=9,
    )
    run = json.loads((tmp_path / "lora" / "config.json").read_text())["run"]
    assert run["prediction_type"] == "epsilon" and run["beta_end"] == 0.012
