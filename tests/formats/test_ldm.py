"""Original LDM/CompVis U-Net layout <-> DiffusionUNet; diffusers' converter is the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from unetkit.errors import CheckpointError
from unetkit.formats.ldm import (
    PREFIX,
    diffusers_to_ldm,
    key_map,
    ldm_to_diffusers,
    load_ldm_unet,
    save_ldm_unet,
)
from unetkit.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig

CONFIGS = {
    "two-levels": DiffusionUNetConfig(
        channels=(16, 32),
        num_res_blocks=1,
        attention_levels=(False, True),
        num_heads=2,
        cross_attention_dim=8,
        norm_groups=8,
    ),
    "sd-like-classes": DiffusionUNetConfig(
        channels=(16, 32, 32),
        num_res_blocks=2,
        attention_levels=(True, True, False),
        num_heads=2,
        cross_attention_dim=8,
        norm_groups=8,
        num_class_embeds=3,
        use_linear_projection=True,
    ),
}


def _model(config: DiffusionUNetConfig) -> DiffusionUNet:
    model = DiffusionUNet(config)
    for p in model.parameters():
        p.data.normal_()
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_converter(name: str) -> None:
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from unetkit.formats.diffusers import config_to_diffusers

    config = CONFIGS[name]
    sd = _model(config).state_dict()
    ldm = diffusers_to_ldm(sd, config)
    assert all(k.startswith(PREFIX) for k in ldm)
    back = convert_ldm_unet_checkpoint(dict(ldm), config_to_diffusers(config))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    again = ldm_to_diffusers(ldm, config)  # and our own inverse
    assert all(torch.equal(again[k], sd[k]) for k in sd)


def test_sd15_table_has_the_known_landmarks() -> None:
    table = key_map(DiffusionUNetConfig())
    assert table["conv_in.weight"] == "input_blocks.0.0.weight"
    assert table["down_blocks.0.resnets.1.conv1.weight"] == "input_blocks.2.0.in_layers.2.weight"
    assert table["down_blocks.0.attentions.1.proj_in.weight"] == "input_blocks.2.1.proj_in.weight"
    assert table["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.3.0.op.weight"
    assert (
        table["down_blocks.3.resnets.1.time_emb_proj.bias"] == "input_blocks.11.0.emb_layers.1.bias"
    )
    assert table["mid_block.attentions.0.norm.weight"] == "middle_block.1.norm.weight"
    assert table["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert table["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert table["up_blocks.3.resnets.2.conv_shortcut.weight"] == (
        "output_blocks.11.0.skip_connection.weight"
    )
    assert table["conv_out.bias"] == "out.2.bias"
    assert len(table) == 686


def test_file_round_trip(tmp_path: Path) -> None:
    config = CONFIGS["sd-like-classes"]
    model = _model(config)
    path = save_ldm_unet(model, tmp_path / "unet.safetensors")
    loaded = load_ldm_unet(path)  # config from the file's metadata
    assert loaded.config == config
    x, ctx, labels = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, 7, ctx, class_labels=labels), model(x, 7, ctx, class_labels=labels)
        )
    # a full SD file also holds the VAE and text encoder: those keys are ignored
    full = safetensors.torch.load_file(str(path))
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    safetensors.torch.save_file(full, str(tmp_path / "full.safetensors"))
    load_ldm_unet(tmp_path / "full.safetensors", config)


def test_mismatched_keys_are_listed(tmp_path: Path) -> None:
    config = CONFIGS["two-levels"]
    ldm = diffusers_to_ldm(_model(config).state_dict(), config)
    ldm.pop(PREFIX + "out.2.bias")
    ldm[PREFIX + "input_blocks.9.0.in_layers.0.weight"] = torch.zeros(1)
    safetensors.torch.save_file(ldm, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_ldm_unet(tmp_path / "bad.safetensors", config)
    msg = str(err.value)
    assert "missing keys: model.diffusion_model.out.2.bias" in msg
    assert "unexpected keys: model.diffusion_model.input_blocks.9.0.in_layers.0.weight" in msg
    with pytest.raises(CheckpointError, match="missing keys"):  # wrong config for the file
        ldm_to_diffusers(ldm, CONFIGS["sd-like-classes"])


def test_refuses_pickled_checkpoints(tmp_path: Path) -> None:
    ckpt = tmp_path / "sd.ckpt"
    ckpt.write_bytes(b"\x80\x04 pickle that must not be opened")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_ldm_unet(ckpt)
    with pytest.raises(CheckpointError, match=".safetensors only"):
        save_ldm_unet(_model(CONFIGS["two-levels"]), tmp_path / "out.ckpt")
