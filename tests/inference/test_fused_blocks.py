"""Each fused diffusion block computes what the block it was built from computes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import unetkit
from unetkit.nn.resblock import TimestepResBlock
from unetkit.nn.transformer import SpatialTransformer
from unetkit.runtime import fastpath
from unetkit.runtime.fastpath import PackedConv, freeze
from unetkit.runtime.fused_blocks import (
    FusedResBlock,
    FusedSpatialTransformer,
    fuse_blocks,
)

pytestmark = pytest.mark.skipif(
    not fastpath.packing_available(torch.bfloat16), reason="no oneDNN bf16 kernels here"
)
CL = torch.channels_last


def _nonzero(module: nn.Module) -> nn.Module:
    """Zero-initialised output projections would make a residual block the identity."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return module.eval()


def _bf16(module: nn.Module) -> nn.Module:
    out = copy.deepcopy(module)
    fastpath.cast_weights(out, torch.bfloat16)
    return out


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert got.shape == want.shape and err < 2e-2, float(err)


@pytest.mark.parametrize("linear_projection", [False, True])
@pytest.mark.parametrize("context_dim", [None, 24])
def test_fused_spatial_transformer(linear_projection: bool, context_dim: int | None) -> None:
    st = _nonzero(
        SpatialTransformer(
            32,
            heads=4,
            context_dim=context_dim,
            depth=2,
            groups=8,
            linear_projection=linear_projection,
        )  # fmt: skip
    )
    x = torch.randn(2, 32, 6, 10)
    ctx = torch.randn(2, 5, 24) if context_dim else None
    with torch.no_grad():
        want = st(x, ctx)
        ref = _bf16(st)
        fused = FusedSpatialTransformer(ref)
        got = fused(
            x.bfloat16().contiguous(memory_format=CL), None if ctx is None else ctx.bfloat16()
        )
    assert got.is_contiguous(memory_format=CL)  # stays channels-last for the next conv
    _close(got, want)


@pytest.mark.parametrize("shortcut", [False, True])
def test_fused_resblock(shortcut: bool) -> None:
    block = _nonzero(TimestepResBlock(16, 32 if shortcut else 16, 40, groups=8))
    x, emb = torch.randn(2, 16, 9, 7), torch.randn(2, 40)
    with torch.no_grad():
        want = block(x, emb)
        got = FusedResBlock(_bf16(block), PackedConv)(
            x.bfloat16().contiguous(memory_format=CL), emb.bfloat16()
        )
    _close(got, want)


def test_fuse_blocks_swaps_the_diffusion_unet_blocks() -> None:
    net = _bf16(unetkit.create_model("diffusion-unet", preset="tiny"))
    n_st = sum(isinstance(m, SpatialTransformer) for m in net.modules())
    n_res = sum(isinstance(m, TimestepResBlock) for m in net.modules())
    assert fuse_blocks(net, PackedConv) == n_st + n_res > 0
    assert not any(isinstance(m, SpatialTransformer | TimestepResBlock) for m in net.modules())


def test_blocks_with_active_dropout_are_left_alone() -> None:
    block = TimestepResBlock(8, 8, 16, groups=4, dropout=0.1).train()
    holder = nn.Sequential(block)
    assert fuse_blocks(holder, PackedConv) == 0 and holder[0] is block


def test_frozen_lora_model_with_unmerged_adapter_keeps_eager_attention() -> None:
    """A LoRA wrapper that cannot be merged (parametrized base) must still run exactly."""
    from torch.nn.utils import parametrize

    from unetkit.nn.lora_inject import inject_lora

    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 1.0

    net = _nonzero(unetkit.create_model("diffusion-unet", preset="tiny"))
    inject_lora(net, targets="attn", r=2)
    for m in net.modules():
        if hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Linear):
            parametrize.register_parametrization(m.base_layer, "weight", Scale())
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 3, 32)
    with torch.no_grad():
        want = net(x, 10, ctx)
        got = freeze(net)(x, 10, ctx)
    _close(got, want)
