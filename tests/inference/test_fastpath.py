"""The frozen inference copy: BatchNorm folding, prepacked oneDNN kernels, fused post-ops,
agreement with float32 eager, caching, and the inference-only contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unetkit
from unetkit import runtime
from unetkit.errors import ConfigError
from unetkit.inference import TileOptions
from unetkit.inference.tiling import predict_tiled
from unetkit.nn.lora import LoRALayer
from unetkit.nn.lora_inject import inject_lora
from unetkit.runtime import fastpath
from unetkit.runtime.fastpath import (
    FrozenModel,
    PackedConv,
    PackedLinear,
    PairMaxPool,
    can_freeze,
    fold_batchnorm,
    freeze,
    frozen_for,
)

packed_only = pytest.mark.skipif(
    not fastpath.packing_available(torch.bfloat16), reason="no oneDNN bf16 kernels here"
)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_batchnorm_matches_conv_then_bn_in_float64(dims: int) -> None:
    conv = CONV[dims](6, 5, 3, padding=1).double()
    bn = _randomise_norms(BN[dims](5)).double()
    x = torch.randn(2, 6, *(7,) * dims, dtype=torch.float64)
    with torch.no_grad():
        want = bn(conv(x))
        fold_batchnorm(conv, bn)
        got = conv(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@packed_only
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_packed_conv_equals_the_plain_bf16_conv(dims: int) -> None:
    conv = CONV[dims](8, 12, 3, stride=2, padding=2, dilation=2, groups=4).bfloat16().eval()
    x = torch.randn(2, 8, *(11,) * dims).bfloat16()
    with torch.no_grad():
        got, want = PackedConv(conv)(x), conv(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@packed_only
@pytest.mark.parametrize(
    "act",
    [nn.ReLU(), nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.LeakyReLU(0.1), nn.Sigmoid()],
    ids=lambda a: repr(a),
)
def test_fused_post_op_equals_the_activation_module(act: nn.Module) -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1).bfloat16().eval()
    x = torch.randn(2, 8, 9, 9).bfloat16()
    with torch.no_grad():
        got = PackedConv(conv, fastpath.post_op(act))(x).float()
        want = act(conv(x).float())
    # one bf16 rounding of the fused result vs two of conv then activation
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@packed_only
def test_packed_linear_takes_any_leading_dims() -> None:
    lin = nn.Linear(24, 40).bfloat16().eval()
    packed = PackedLinear.of(lin)
    for shape in [(5, 24), (2, 77, 24), (2, 3, 4, 24)]:
        x = torch.randn(shape).bfloat16()
        with torch.no_grad():
            torch.testing.assert_close(packed(x).float(), lin(x).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dims", [2, 3])
def test_frozen_unet_agrees_with_float32_as_well_as_autocast(dims: int) -> None:
    torch.manual_seed(0)
    net = _randomise_norms(
        unetkit.create_model("unet", dims=dims, channels=(8, 16, 32), norm="batch")
    )
    x = torch.rand(2, 1, *(32 if dims == 2 else 16,) * dims)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = net(x).float()
        fast = freeze(net)(x)
        exact = freeze(net, torch.float32)(x)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert _rel(exact, ref) < 1e-5  # folding and fusing alone change nothing but rounding
    assert _rel(fast, ref) < 3e-2
    assert _rel(fast, ref) <= 2 * _rel(auto, ref) + 1e-3


def test_frozen_diffusion_unet_agrees_with_float32() -> None:
    torch.manual_seed(0)
    net = unetkit.create_model("diffusion-unet", preset="tiny").eval()
    with torch.no_grad():  # zero-initialised output layers would make the test vacuous
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    t = torch.tensor([10.0, 777.5])
    with torch.no_grad():
        ref = net(x, t, ctx)
        fast = freeze(net)(x, t, ctx)
    assert fast.dtype == torch.float32
    assert _rel(fast, ref) < 3e-2


def test_only_the_first_input_is_cast() -> None:
    """Timesteps and labels reach the model as given: bf16 would round 777.5 to 776."""
    seen = {}

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(
            self, x: torch.Tensor, t: torch.Tensor, *, labels: torch.Tensor
        ) -> torch.Tensor:
            seen.update(x=x.dtype, t=t, labels=labels)
            return self.conv(x)

    out = freeze(Probe())(torch.randn(1, 2, 4, 4), torch.tensor([777.5]), labels=torch.tensor([3]))
    assert seen["x"] == torch.bfloat16 and out.dtype == torch.float32
    assert seen["t"].dtype == torch.float32 and seen["t"].item() == 777.5
    assert seen["labels"].item() == 3


def test_freeze_leaves_the_original_alone() -> None:
    net = _randomise_norms(unetkit.create_model("unet", channels=(4, 8), norm="batch")).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    freeze(net)
    assert net.training
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in net.parameters())


def test_frozen_model_is_inference_only() -> None:
    frozen = freeze(unetkit.create_model("unet", channels=(4, 8)))
    assert isinstance(frozen, FrozenModel) and not frozen.training
    with pytest.raises(ConfigError, match="inference only"):
        frozen.train()
    with pytest.raises(ConfigError, match="no gradients"):
        frozen(torch.rand(1, 1, 16, 16, requires_grad=True))
    assert frozen.dims == 2  # attributes of the model are still there


def test_lora_is_merged_into_the_frozen_copy() -> None:
    torch.manual_seed(0)
    net = unetkit.create_model("diffusion-unet", preset="tiny").eval()
    inject_lora(net, targets="attn", r=4)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: make the adapter matter
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    frozen = freeze(net, torch.float32)
    assert not any(isinstance(m, LoRALayer) for m in frozen.modules())
    with torch.no_grad():
        torch.testing.assert_close(frozen(x, 50, ctx), net(x, 50, ctx), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, LoRALayer) for m in net.modules())  # the original keeps it


def test_frozen_for_caches_until_the_weights_change() -> None:
    net = unetkit.create_model("unet", channels=(4, 8), norm="batch").eval()
    first = frozen_for(net)
    assert frozen_for(net) is first
    with torch.no_grad():
        net.head.weight.add_(1.0)
    second = frozen_for(net)
    assert second is not first
    x = torch.rand(1, 1, 16, 16)
    assert not torch.equal(first(x), second(x))


def test_can_freeze_only_eager_cpu_bf16_modules() -> None:
    from unetkit.inference.backends import CompiledModel

    net = unetkit.create_model("unet", channels=(4, 8))
    assert not can_freeze(net, None) and not can_freeze(net, torch.float32)
    assert not can_freeze(CompiledModel(net, backend="eager"), torch.bfloat16)
    assert not can_freeze(freeze(net), torch.bfloat16)
    assert can_freeze(net, torch.bfloat16) == fastpath.packing_available(torch.bfloat16)


@packed_only
def test_predict_tiled_bf16_runs_the_frozen_copy() -> None:
    torch.manual_seed(0)
    net = _randomise_norms(unetkit.create_model("unet", channels=(8, 16), norm="batch"))
    image = torch.rand(1, 70, 50)
    exact = predict_tiled(net, image, TileOptions(tile=32))
    with runtime.prepared(net, "bf16") as runner:
        fast = predict_tiled(net, image, TileOptions(tile=32), runner=runner)
    assert isinstance(fastpath._CACHE.get(net)[1], FrozenModel)
    assert (fast - exact).abs().max() < 0.05
    assert F.mse_loss(fast, exact) < 1e-4


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("size", [8, 7])
def test_pair_max_pool_equals_max_pool(dims: int, size: int) -> None:
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn(2, 5, *(size,) * dims).bfloat16().contiguous(memory_format=fmt)
    want = getattr(F, f"max_pool{dims}d")(x, 2)
    got = PairMaxPool(dims)(x)
    assert torch.equal(got, want)
    assert torch.equal(PairMaxPool(dims)(x.contiguous()), want)  # other layouts: max_pool


@packed_only
def test_frozen_unet_uses_the_fast_layers() -> None:
    net = unetkit.create_model("unet", channels=(4, 8, 16), norm="batch")
    kinds = {type(m) for m in freeze(net).modules()}
    assert {PackedConv, PairMaxPool} <= kinds
    assert not kinds & {nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU}
