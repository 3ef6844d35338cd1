"""`unetkit generate` / `inpaint` on a Stable Diffusion pipeline folder (tiny, built here)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unetkit.cli.main import main

pytestmark = pytest.mark.compare
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

_TINY = Path(__file__).parents[1] / "workflows" / "sd_tiny.py"
if "sd_tiny" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("sd_tiny", _TINY)
    sys.modules["sd_tiny"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["sd_tiny"])
sd_tiny = sys.modules["sd_tiny"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd")
    sd_tiny.save_pipeline(folder)
    return folder


def _lora(sd_dir: Path, path: Path) -> Path:
    """A Kohya-layout LoRA for the tiny U-Net (alpha 1, rank 2)."""
    import safetensors.torch

    from unetkit.formats.diffusers import load_diffusers_unet

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, m in load_diffusers_unet(sd_dir).named_modules():
        if name.endswith(("attn2.to_q", "attn2.to_v")):
            flat = "lora_unet_" + name.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g)
            tensors[f"{flat}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g)
            tensors[f"{flat}.alpha"] = torch.tensor(1.0)
    safetensors.torch.save_file(tensors, str(path))
    return path


def test_generate_with_lora_matches_the_api(sd_dir: Path, tmp_path: Path, capsys) -> None:
    from unetkit.workflows.sd_pipeline import StableDiffusion

    lora = _lora(sd_dir, tmp_path / "style.safetensors")
    grid = tmp_path / "g.png"
    args = ["generate", str(sd_dir), "the cat", "--steps", "3", "--seed", "2", "--grid", str(grid)]
    extra = ["--negative", "bad", "--lora", f"{lora}:0.7", "--precision", "fp32", "--no-progress"]
    assert main(args + extra) == 0
    out = capsys.readouterr().out
    assert f"base {sd_dir}; LoRA style.safetensors:0.7; sampler ddim" in out
    sd = StableDiffusion.from_pretrained(sd_dir, precision="fp32")
    sd.load_lora(lora, 0.7)
    want = sd.txt2img(["the cat"], negative="bad", steps=3, seed=2).clamp(-1, 1)
    want = ((want + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(grid))[2:-2, 2:-2]  # save_grid pads by 2
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_img2img_and_inpaint_resize_any_size(sd_dir: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (31, 33, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((31, 33), np.uint8)
    mask[4:20, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    common = ["--steps", "2", "--precision", "fp32", "--no-progress"]
    grid = tmp_path / "i2i.png"
    cmd = ["generate", str(sd_dir), "a dog", "--image", str(tmp_path / "in.png"), "--grid"]
    assert main([*cmd, str(grid), "--strength", "0.5", *common]) == 0
    assert "in.png resized 33x31 -> 32x32" in capsys.readouterr().out
    out = tmp_path / "filled.png"
    cmd = ["inpaint", str(sd_dir), str(tmp_path / "in.png"), str(tmp_path / "m.png"), "a dog"]
    assert main([*cmd, "--output", str(out), *common]) == 0
    text = capsys.readouterr().out
    assert "m.png resized 33x31 -> 32x32" in text and "pixels repainted" in text
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)


def test_bad_sd_input_is_one_line(sd_dir: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    assert main(["generate", str(broken), "x", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing text_encoder/config.json" in err
    assert main(["generate", str(sd_dir), "x", "--lora", "nofile.safetensors:x2"]) == 2
    assert "FILE:SCALE" in capsys.readouterr().err


def test_generate_names_what_it_used_and_draws_a_progress_bar(sd_dir: Path, tmp_path: Path, capsys):
    """The issue's ask: which base, adapters and sampler, and a bar over the steps (stderr);
    ``--precision auto`` here, the fast path where the CPU has it."""
    grid = tmp_path / "g.png"
    assert main(["generate", str(sd_dir), "the cat", "--steps", "3", "--grid", str(grid)]) == 0
    cap = capsys.readouterr()
    assert f"using base {sd_dir}; LoRA none; sampler ddim" in cap.out
    assert "sampling" in cap.err and "3/3" in cap.err
    assert grid.is_file()
