"""diffusers UNet2DConditionModel <-> DiffusionUNet, checked against diffusers itself."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats.diffusers import (
    config_from_diffusers,
    config_to_diffusers,
    load_diffusers_unet,
    save_diffusers_unet,
)
from unetkit.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig

SMALL = dict(
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=2,  # diffusers: number of heads
    cross_attention_dim=12,
    norm_num_groups=8,
)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _reference(**overrides: object) -> torch.nn.Module:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    ref = diffusers.UNet2DConditionModel(**{**SMALL, **overrides}).eval()
    for p in ref.parameters():  # diffusers zero-inits nothing, but be sure all weights matter
        p.data.normal_(0.0, 0.1)
    return ref


def _inputs(ctx_dim: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 11, 8), torch.tensor([3, 801]), torch.randn(2, 5, ctx_dim)


def _check_parity(ref: torch.nn.Module, ours: DiffusionUNet, **kw: torch.Tensor) -> None:
    x, t, ctx = _inputs(ref.config.cross_attention_dim)
    with torch.no_grad():
        want = ref(x, t, ctx, **kw).sample
        got = ours(x, t, ctx, **kw)
    assert _rel_err(got, want) < 1e-5


def test_small_model_through_files_both_ways(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    ref = _reference()
    ref.save_pretrained(tmp_path / "ref")
    ours = load_diffusers_unet(tmp_path / "ref")
    assert ours.config.attention_levels == (False, True) and ours.config.num_heads == 2
    _check_parity(ref, ours)
    save_diffusers_unet(ours, tmp_path / "ours")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    _check_parity(back, ours)
    assert not list((tmp_path / "ours").glob(".*tmp"))  # atomic writes leave no temp files


def test_pipeline_root_and_per_level_heads(tmp_path: Path) -> None:
    ref = _reference(
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
    )
    ref.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    ours = load_diffusers_unet(tmp_path / "pipe")
    assert ours.config.heads_per_level() == (2, 4, 4)
    assert ours.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 4
    _check_parity(ref, ours)


def test_class_conditional_parity(tmp_path: Path) -> None:
    ref = _reference(num_class_embeds=5)
    ref.save_pretrained(tmp_path / "ref")
    ours = load_diffusers_unet(tmp_path / "ref")
    assert ours.config.num_class_embeds == 5
    _check_parity(ref, ours, class_labels=torch.tensor([4, 1]))


def test_linear_projection_parity(tmp_path: Path) -> None:
    ref = _reference(use_linear_projection=True, upcast_attention=True)
    assert ref.down_blocks[1].attentions[0].proj_in.weight.dim() == 2  # Linear (SD 2.x)
    ref.save_pretrained(tmp_path / "ref")
    ours = load_diffusers_unet(tmp_path / "ref")
    assert ours.config.use_linear_projection and ours.config.upcast_attention
    _check_parity(ref, ours)


def test_config_mapping_round_trip() -> None:
    c = DiffusionUNetConfig(
        channels=(32, 64, 64), num_heads=(1, 2, 4), attention_levels=(True, False, True)
    )
    assert config_from_diffusers(config_to_diffusers(c)) == c
    c2 = DiffusionUNetConfig(num_heads=None, head_dim=64)  # SD 2.x style: fixed head width
    d = config_to_diffusers(c2)
    assert d["attention_head_dim"] == [5, 10, 20, 20]
    assert config_from_diffusers(d).heads_per_level() == c2.heads_per_level()


def test_refuses_pickles_and_unsupported_configs(tmp_path: Path) -> None:
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**SMALL, "_class_name": "x"}))
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_diffusers_unet(folder)
    bad = {**SMALL, "down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D"]}
    with pytest.raises(ConfigError, match="SimpleCrossAttnDownBlock2D"):
        config_from_diffusers(bad)
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        config_from_diffusers({**SMALL, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ConfigError, match="mirror"):
        config_from_diffusers({**SMALL, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_diffusers_unet(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="never unpickles"):  # pipeline root -> unet/
        load_diffusers_unet(tmp_path)


@pytest.mark.slow
def test_full_sd15_parity() -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(cross_attention_dim=768).eval()  # SD 1.x config
    config = config_from_diffusers(dict(ref.config))
    assert config == DiffusionUNetConfig()  # the "sd15" preset
    with torch.device("meta"):
        ours = DiffusionUNet(config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # shares the tensors
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 768)
    with torch.inference_mode():
        want = ref(x, 500, ctx).sample
        got = ours.eval()(x, 500, ctx)
    assert _rel_err(got, want) < 1e-5
    del ref, ours
    gc.collect()


def test_weights_read_straight_into_the_fast_path_dtypes(tmp_path: Path) -> None:
    """``frozen_dtype``: each weight read on its own and cast as the frozen copy keeps it
    (norms float32); the same tensors as loading in float32 and casting, and a sharded
    folder (diffusers' own ``max_shard_size``) reads the same."""
    from unetkit.runtime import fastpath

    ref = _reference()
    ref.save_pretrained(tmp_path / "one")
    ref.save_pretrained(tmp_path / "shards", max_shard_size="60KB")
    assert (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    want = fastpath.cast_weights(load_diffusers_unet(tmp_path / "one"), torch.bfloat16)
    for folder in ("one", "shards"):
        got = load_diffusers_unet(tmp_path / folder, frozen_dtype=torch.bfloat16)
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert got.down_blocks[0].resnets[0].norm1.weight.dtype == torch.float32
    assert got.conv_in.weight.dtype == torch.bfloat16 and not got.conv_in.weight.requires_grad
