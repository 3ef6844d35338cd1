"""DiffusionUNet: shapes at odd sizes, conditioning, init, checkpointing, presets, errors.

Parity with diffusers (the independent reference) lives in tests/formats/test_diffusers.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import unetkit
from unetkit import registry
from unetkit.errors import ConfigError, InputSizeError
from unetkit.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig
from unetkit.nn.conditioning import ConditionalSequential
from unetkit.nn.resblock import TimestepResBlock
from unetkit.nn.timestep import timestep_embedding
from unetkit.nn.transformer import Attention, SpatialTransformer

TINY = dict(
    channels=(16, 32),
    num_res_blocks=1,
    attention_levels=(True, True),
    num_heads=2,
    cross_attention_dim=8,
    norm_groups=8,
)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Zero-init makes a fresh model output zeros; give every parameter a value."""
    for p in model.parameters():
        p.data.normal_(0.0, 0.2)
    return model


def test_forward_odd_sizes_and_timestep_forms() -> None:
    model = _randomize(DiffusionUNet(DiffusionUNetConfig(**TINY))).eval()
    x, ctx = torch.randn(2, 4, 13, 10), torch.randn(2, 3, 8)
    with torch.no_grad():
        y = model(x, torch.tensor([7, 7]), ctx)
        assert y.shape == x.shape
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7])):
            torch.testing.assert_close(model(x, t, ctx), y, rtol=0, atol=0)
        # each sample sees its own timestep
        y2 = model(x, torch.tensor([7, 500]), ctx)
        torch.testing.assert_close(y2[0], y[0])
        assert not torch.allclose(y2[1], y[1])


def test_timestep_embedding_matches_float64_formula() -> None:
    t = np.array([0.0, 3.0, 999.0])
    dim, half = 10, 5
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    ref = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = timestep_embedding(torch.tensor(t), dim, flip_sin_to_cos=True, freq_shift=0)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-4)
    shifted = timestep_embedding(torch.tensor(t), 11, flip_sin_to_cos=False, freq_shift=1)
    freqs1 = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    ref1 = np.concatenate([np.sin(t[:, None] * freqs1), np.cos(t[:, None] * freqs1)], axis=1)
    np.testing.assert_allclose(shifted[:, :10].numpy(), ref1, rtol=1e-5, atol=1e-4)
    assert torch.all(shifted[:, 10] == 0)


def test_attention_matches_float64_reference() -> None:
    attn = Attention(8, context_dim=6, heads=2, head_dim=4).double()
    x, ctx = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    q = (x @ attn.to_q.weight.T).view(2, 5, 2, 4).transpose(1, 2)
    k = (ctx @ attn.to_k.weight.T).view(2, 3, 2, 4).transpose(1, 2)
    v = (ctx @ attn.to_v.weight.T).view(2, 3, 2, 4).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # 1/sqrt(head_dim=4)
    ref = (w @ v).transpose(1, 2).reshape(2, 5, 8) @ attn.to_out[0].weight.T + attn.to_out[0].bias
    torch.testing.assert_close(attn(x, ctx), ref)


def test_zero_init_of_output_projections() -> None:
    model = DiffusionUNet(DiffusionUNetConfig(**TINY))
    zeros = [n for n, p in model.named_parameters() if not p.any()]
    assert "conv_out.weight" in zeros and "conv_out.bias" in zeros
    assert "down_blocks.0.resnets.0.conv2.weight" in zeros
    assert "down_blocks.0.attentions.0.proj_out.weight" in zeros
    assert "down_blocks.0.resnets.0.conv1.weight" not in zeros
    x = torch.randn(1, 4, 8, 8)
    assert not model(x, 3, torch.randn(1, 2, 8)).any()  # conv_out = 0 at init


def test_gradient_checkpointing_gives_equal_grads() -> None:
    model = _randomize(DiffusionUNet(DiffusionUNetConfig(**TINY)))
    x, ctx = torch.randn(2, 4, 9, 8), torch.randn(2, 3, 8, requires_grad=True)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        ctx.grad = None
        model(x, torch.tensor([1, 900]), ctx).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()] + [ctx.grad.clone()]

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _randomize(unetkit.create_model("diffusion-unet", preset="tiny", num_class_embeds=3))
    path = unetkit.save(model.eval(), tmp_path / "unet.safetensors")
    loaded = unetkit.load(path)
    assert loaded.config == model.config and type(loaded) is DiffusionUNet
    x, ctx, labels = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, 10, ctx, class_labels=labels),
            model(x, 10, ctx, class_labels=labels),
            rtol=0,
            atol=0,
        )


def test_class_labels_change_the_output() -> None:
    model = _randomize(DiffusionUNet(DiffusionUNetConfig(**TINY, num_class_embeds=4))).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8)
    with torch.no_grad():
        a = model(x, 5, ctx, class_labels=torch.tensor([0]))
        b = model(x, 5, ctx, class_labels=torch.tensor([1]))
    assert not torch.allclose(a, b)
    with pytest.raises(InputSizeError, match="class_labels"):
        model(x, 5, ctx)


def test_presets_and_registry() -> None:
    assert "diffusion-unet" in registry.list_models(task="diffusion")
    assert "diffusion-unet" not in registry.list_models(task="segmentation")
    sd15 = registry.model_info("diffusion-unet", preset="sd15")
    assert sd15["parameters"] == 859_520_964  # Stable Diffusion 1.x U-Net
    digits = registry.model_info("diffusion-unet", preset="digits")
    assert 3e6 <= digits["parameters"] <= 10e6  # small enough for ~20 min of CPU training
    tiny = unetkit.create_model("diffusion-unet", preset="tiny")
    assert tiny(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 3, 32)).shape == (1, 4, 8, 8)
    d = unetkit.create_model("diffusion-unet", preset="digits")
    assert d.config.heads_per_level() == (1, 2, 4)  # head_dim 32
    y = d(torch.randn(1, 1, 28, 28), 1, torch.randn(1, 4, 384))
    assert y.shape == (1, 1, 28, 28)


@pytest.mark.parametrize("dims", [1, 3])
def test_other_dims(dims: int) -> None:
    model = _randomize(DiffusionUNet(DiffusionUNetConfig(**TINY, dims=dims, in_channels=2)))
    x = torch.randn(1, 2, *((5,) * dims))
    assert model(x, 3, torch.randn(1, 2, 8)).shape == (1, 4, *((5,) * dims))


def test_self_attention_only_model_has_no_attn2() -> None:
    model = DiffusionUNet(DiffusionUNetConfig(**{**TINY, "cross_attention_dim": None}))
    assert not any(".attn2." in k for k in model.state_dict())
    assert model(torch.randn(1, 4, 8, 8), 3).shape == (1, 4, 8, 8)


def test_config_and_input_errors() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        DiffusionUNetConfig(**{**TINY, "head_dim": 8})
    with pytest.raises(ConfigError, match="attention_levels"):
        DiffusionUNetConfig(**{**TINY, "attention_levels": (True,)})
    with pytest.raises(ConfigError, match="norm_groups"):
        DiffusionUNetConfig(**{**TINY, "channels": (12, 32)})
    with pytest.raises(ConfigError, match="heads"):
        DiffusionUNetConfig(**{**TINY, "num_heads": 3})
    model = DiffusionUNet(DiffusionUNetConfig(**TINY))
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(InputSizeError, match="cross_attention_dim"):
        model(x, 1, torch.randn(2, 3, 7))
    with pytest.raises(InputSizeError, match="cross_attention_dim"):
        model(x, 1)
    with pytest.raises(InputSizeError, match="timestep"):
        model(x, torch.tensor([1, 2, 3]), torch.randn(2, 3, 8))
    with pytest.raises(InputSizeError, match="sample"):
        model(torch.randn(2, 3, 8, 8), 1, torch.randn(2, 3, 8))


def test_conditional_sequential_routes_by_declaration() -> None:
    res = TimestepResBlock(8, 8, 6, groups=4)
    st = SpatialTransformer(8, heads=2, context_dim=5, groups=4)
    plain = torch.nn.Identity()
    _randomize(res), _randomize(st)
    x, emb, ctx = torch.randn(1, 8, 3, 3), torch.randn(1, 6), torch.randn(1, 2, 5)
    step = ConditionalSequential(res, plain, st)
    torch.testing.assert_close(step(x, emb, ctx), st(res(x, emb), ctx))
