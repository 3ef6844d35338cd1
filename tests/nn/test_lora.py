"""LoRA layers and injection, checked against float64 computations done here by hand."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.errors import CheckpointError, ConfigError
from unetkit.nn.lora import LoRAConv, LoRALinear
from unetkit.nn.lora_inject import (
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    set_active_adapters,
    set_lora_scale,
    trainable_summary,
    unmerge_lora,
)
from unetkit.registry import create_model

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_b(module: nn.Module, std: float = 0.3) -> None:
    """B starts at zero; give it values so the adapter matters."""
    for name, p in module.named_parameters():
        if ".lora_B." in f".{name}":
            p.data.normal_(0.0, std)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _conv_reference(layer: LoRAConv, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """base conv + scale · B(A(x)) in float64, groups handled by explicit per-group slicing."""
    base, dims = layer.base_layer, x.dim() - 2
    conv = _F_CONV[dims]
    g, a, b = base.groups, layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
    xd = x.double()
    opts = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
    y = conv(xd, base.weight.double(), base.bias.double(), groups=g, **opts)
    cin, r, cout = base.in_channels // g, a.shape[0] // g, base.out_channels // g
    parts = []
    for j in range(g):  # each input group through its own slice of A, then of B
        h = conv(xd[:, j * cin : (j + 1) * cin], a[j * r : (j + 1) * r], **opts)
        bj = b[j * cout : (j + 1) * cout].reshape(cout, r)
        parts.append(torch.einsum("or,br...->bo...", bj, h))
    return y + layer.scaling(name) * torch.cat(parts, dim=1)


def test_linear_forward_matches_float64_and_starts_as_identity() -> None:
    base = nn.Linear(12, 7)
    x = torch.randn(3, 5, 12)
    layer = LoRALinear(base, r=3, alpha=6.0)
    assert torch.equal(layer(x), base(x))  # B = 0: an injected adapter changes nothing
    _randomise_b(layer)
    layer.set_scale(0.5)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    want = x.double() @ base.weight.double().T + base.bias.double()
    want = want + (6.0 / 3) * 0.5 * (x.double() @ a.T @ b.T)
    assert layer.scaling("default") == 1.0
    assert _rel(layer(x), want) < 1e-6
    assert layer.lora_A["default"].weight.shape == (3, 12)
    assert layer.lora_B["default"].weight.shape == (7, 3)
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(
    ("dims", "groups", "kernel", "stride", "dilation"),
    [(1, 1, 3, 1, 1), (2, 1, 3, 2, 1), (2, 2, 3, 1, 2), (2, 4, 1, 1, 1), (3, 2, 3, 1, 1)],
)
def test_conv_forward_matches_float64(
    dims: int, groups: int, kernel: int, stride: int, dilation: int
) -> None:
    base = _CONV[dims](4, 8, kernel, stride=stride, padding=1, dilation=dilation, groups=groups)
    layer = LoRAConv(base, r=4, alpha=2.0)
    _randomise_b(layer)
    x = torch.randn(2, 4, *([7] * dims))
    assert _rel(layer(x), _conv_reference(layer, x)) < 1e-6


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(10, 6),
        lambda: nn.Conv1d(4, 6, 3, padding=1),
        lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2),
        lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
        lambda: nn.Conv3d(4, 6, 3, padding=1, stride=2, groups=2),
    ],
)
def test_merge_equals_unmerged_and_unmerge_restores_exactly(make) -> None:
    base = make()
    layer = LoRALinear(base, r=4) if isinstance(base, nn.Linear) else LoRAConv(base, r=4, alpha=3)
    _randomise_b(layer)
    x = (
        torch.randn(2, 10)
        if isinstance(base, nn.Linear)
        else torch.randn(2, base.in_channels, *[6] * (base.weight.dim() - 2))
    )
    original = base.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.eval()  # never merges by itself
        assert torch.equal(base.weight, original) and layer.merged_adapters == []
        layer.merge()
        assert layer.merged_adapters == ["default"]
        assert not torch.equal(base.weight, original)
        merged = layer(x)  # adapter skipped in forward, lives in the weight
        assert _rel(merged, unmerged) < 1e-5
        assert _rel(base(x), unmerged) < 1e-5
        layer.unmerge()
        assert (base.weight - original).abs().max() <= 1e-6
        assert torch.equal(base.weight, original)  # in fact bit-exact
        assert torch.equal(layer(x), unmerged)


def test_merge_in_low_precision_is_computed_in_float32_and_unmerges_exactly() -> None:
    base = nn.Linear(16, 8).to(torch.bfloat16)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=2)
    _randomise_b(layer)
    want = (original.float() + layer.delta_weight("default")).to(torch.bfloat16)
    assert layer.delta_weight("default").dtype == torch.float32
    layer.merge()
    assert torch.equal(base.weight, want)
    layer.unmerge()
    assert torch.equal(base.weight, original)


def test_grouped_conv_rank_must_be_multiple_of_groups() -> None:
    with pytest.raises(ConfigError, match="multiple of groups"):
        LoRAConv(nn.Conv2d(8, 8, 3, groups=4), r=6)
    with pytest.raises(ConfigError, match="wraps nn.Linear"):
        LoRALinear(nn.Conv2d(2, 2, 1))


def test_several_adapters_on_one_layer() -> None:
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, adapter_name="a")
    layer.add_adapter("b", r=3, alpha=1.5)
    _randomise_b(layer)
    x = torch.randn(4, 6)

    def term(n: str) -> torch.Tensor:
        a, b = layer.lora_A[n].weight.double(), layer.lora_B[n].weight.double()
        return layer.alpha[n] / layer.r[n] * (x.double() @ a.T @ b.T)

    y0 = base(x).double()
    assert layer.active_adapters == ["a", "b"]
    assert _rel(layer(x), y0 + term("a") + term("b")) < 1e-6
    layer.set_active_adapters("b")
    assert _rel(layer(x), y0 + term("b")) < 1e-6
    layer.set_active_adapters(["a", "b"])
    with torch.no_grad():
        layer.merge(adapter_names=["a"])  # a in the weight, b still computed on the side
        assert layer.merged_adapters == ["a"]
        assert _rel(layer(x), y0 + term("a") + term("b")) < 1e-5
        with pytest.raises(ConfigError, match="unmerge"):
            layer.set_scale(2.0, "a")
        layer.set_scale(0.0, "b")
        assert _rel(layer(x), y0 + term("a")) < 1e-5
        layer.unmerge()  # a is computed on the side again
        assert layer.merged_adapters == []
        assert _rel(layer(x), y0 + term("a")) < 1e-6
    with pytest.raises(ConfigError, match="already exists"):
        layer.add_adapter("a", r=2)
    with pytest.raises(ConfigError, match="did you mean 'b'"):
        layer.set_active_adapters("bb")
    layer.delete_adapter("b")
    assert layer.adapter_names == ["a"] and "b" not in layer.r


def _tiny_diffusion_unet() -> nn.Module:
    return create_model(
        "diffusion-unet", preset="tiny", channels=(8, 16), cross_attention_dim=8, norm_groups=4
    )


def test_presets_on_the_diffusion_unet() -> None:
    net = _tiny_diffusion_unet()
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    attn = [n for n in linears if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    ff = [n for n in linears if n.endswith(("ff.net.0.proj", "ff.net.2"))]
    assert attn and ff and any(n.endswith("resnets.0.conv1") for n in convs)
    assert inject_lora(copy.deepcopy(net), "attn") == attn
    assert inject_lora(copy.deepcopy(net), "attn+ff") == sorted(attn + ff, key=linears.index)
    order = [n for n, _ in net.named_modules()]
    assert inject_lora(copy.deepcopy(net), ["attn+ff+conv"]) == sorted(
        attn + ff + convs, key=order.index
    )
    assert inject_lora(net, ["*.attn2.to_k", "re:.*resnets\\.0\\.conv[12]"]) == sorted(
        [n for n in attn if n.endswith("attn2.to_k")]
        + [n for n in convs if n.endswith(("resnets.0.conv1", "resnets.0.conv2"))],
        key=order.index,
    )


def test_segmentation_unet_all_convs_and_helpful_errors() -> None:
    net = create_model("unet", in_channels=1, out_channels=2, channels=(4, 8, 16))
    convs = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d,))]
    with pytest.raises(ConfigError) as e:
        inject_lora(net, "attn")
    assert "matches no" in str(e.value) and convs[0] in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'attn\\+ff'"):
        inject_lora(net, "attn+f")
    with pytest.raises(ConfigError, match="invalid regular expression"):
        inject_lora(net, "re:(")
    with pytest.raises(ConfigError, match="wraps only nn.Linear"):
        inject_lora(net, convs[0].rsplit(".", 1)[0])  # the ConvNormAct block, not its conv
    x = torch.randn(1, 1, 20, 20)
    y = net(x)
    wrapped = inject_lora(net, "attn+ff+conv", r=2)
    assert len(wrapped) == len(convs) > 4
    assert torch.equal(net(x), y)  # B = 0


def test_freezing_trainable_summary_and_gradients() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    base_params = sum(p.numel() for p in net.parameters())
    assert inject_lora(net, "*", r=2) == ["0", "2"]
    trainable, total, frac = trainable_summary(net)
    assert trainable == 2 * 8 + 16 * 2 + 2 * 16 + 4 * 2
    assert total == base_params + trainable and frac == pytest.approx(trainable / total)
    _randomise_b(net)
    net(torch.randn(3, 8)).sum().backward()
    for name, p in net.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_second_adapter_injection_and_scale_helpers() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(8, 8, 3, padding=1))
    inject_lora(net, "0", r=2, adapter_name="a")
    inject_lora(net, ["0", "1"], r=4, alpha=2, adapter_name="b")
    assert net[0].adapter_names == ["a", "b"] and net[1].adapter_names == ["b"]
    assert not any(p.requires_grad for p in net[0].lora_A["a"].parameters())  # only b trains
    assert all(p.requires_grad for p in net[1].lora_B["b"].parameters())
    set_lora_scale(net, 0.25, "b")
    assert net[0].scales == {"a": 1.0, "b": 0.25} and net[1].scaling("b") == 0.5 * 0.25
    set_active_adapters(net, "a")
    assert net[0].active_adapters == ["a"] and net[1].active_adapters == []
    with pytest.raises(ConfigError, match="no LoRA adapter 'c'"):
        set_active_adapters(net, "c")


def test_state_dict_round_trip_merge_and_unload() -> None:
    torch.manual_seed(3)
    src = _tiny_diffusion_unet()
    dst = _tiny_diffusion_unet()
    dst.load_state_dict(src.state_dict())
    inject_lora(src, "attn+ff+conv", r=2, alpha=3.0)
    _randomise_b(src, 0.05)
    sd = lora_state_dict(src)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
    loaded = load_lora_state_dict(dst, sd, alphas={k.rsplit(".lora_", 1)[0]: 3.0 for k in sd})
    assert len(loaded) == len(sd) // 2
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 3, 8)
    with torch.no_grad():
        want = src(x, t, ctx)
        assert torch.equal(dst(x, t, ctx), want)
        assert merge_lora(dst) == len(loaded)
        assert _rel(dst(x, t, ctx), want) < 1e-5
        unmerge_lora(dst)
        assert torch.equal(dst(x, t, ctx), want)
        plain = merge_and_unload(dst)
        assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
        assert set(plain.state_dict()) == set(_tiny_diffusion_unet().state_dict())
        assert _rel(plain(x, t, ctx), want) < 1e-5


def test_load_state_dict_errors_name_the_keys(caplog: pytest.LogCaptureFixture) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    good = {"0.lora_A.weight": torch.randn(2, 4), "0.lora_B.weight": torch.randn(4, 2)}
    stray = {"9.lora_A.weight": torch.randn(2, 4), "9.lora_B.weight": torch.randn(4, 2)}
    with pytest.raises(CheckpointError, match=r"9\.lora_A\.weight"):
        load_lora_state_dict(net, stray, strict=False)  # nothing matches: never a silent no-op
    with pytest.raises(CheckpointError, match=r"1 of 2 .*9\.lora_B\.weight"):
        load_lora_state_dict(net, {**good, **stray})
    assert isinstance(net[0], nn.Linear)  # nothing was changed
    with caplog.at_level(logging.WARNING):
        assert load_lora_state_dict(net, {**good, **stray}, strict=False) == ["0"]
    assert "9.lora_A.weight" in caplog.text
    with pytest.raises(CheckpointError, match="shapes"):
        load_lora_state_dict(
            net, {"1.lora_A.weight": torch.randn(2, 5), "1.lora_B.weight": torch.randn(2, 2)}
        )
    with pytest.raises(CheckpointError, match="lacking A or B"):
        load_lora_state_dict(net, {"1.lora_A.weight": torch.randn(2, 4)})


class _Standardize(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (w - w.mean()) / w.std()


def test_parametrized_weight_is_adapted_unmerged_and_refuses_to_merge() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    torch.nn.utils.parametrize.register_parametrization(net[0], "weight", _Standardize())
    inject_lora(net, "*", r=2)
    _randomise_b(net)
    x = torch.randn(1, 3, 6, 6)
    layer = net[0]
    h = _conv_reference(layer, x)  # the reference reads the standardised weight, as forward does
    assert _rel(net[0](x), h) < 1e-6
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match="parametrized"):
        merge_lora(net)
    assert net[1].merged_adapters == []  # all or nothing
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_inject_checks_every_layer_before_touching_the_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Linear(3, 3))
    with pytest.raises(ConfigError, match="groups=4: r=2"):
        inject_lora(net, "*", r=2)
    assert not lora_layers_of(net)
    with caplog.at_level(logging.INFO):
        assert inject_lora(net, "attn+ff+conv", r=2) == ["0"]  # a preset skips it, logged
    assert "skipping 1" in caplog.text
    with pytest.raises(ConfigError, match="already holds adapter 'default'"):
        inject_lora(net, ["2", "0"], r=2)
    assert isinstance(net[2], nn.Linear)


def lora_layers_of(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, LoRAConv | LoRALinear)]
