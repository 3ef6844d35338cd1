"""U-Net++: nested nodes, deep-supervision outputs and their loss, pruning, parameter count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unetkit
from unetkit.errors import ConfigError
from unetkit.segmentation.losses import build_loss


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tiny(**overrides: object) -> nn.Module:
    opts = dict(channels=(4, 8, 16, 32), norm="none", deep_supervision=True)
    opts.update(overrides)
    return unetkit.create_model("unetpp", **opts)


def test_paper_parameter_count() -> None:
    # Zhou et al., DLMIA 2018, Table 2 ("Params" column): U-Net 7.76M, UNet++ w/o DS 9.04M,
    # UNet++ w/ DS 9.04M, for the official Keras models (MrGiovanni/UNetPlusPlus, model.py
    # Nest_Net / U_Net: widths 32, 64, 128, 256, 512; 3×3 convs with bias, no normalisation;
    # 2×2 transposed convs; 1 input channel, 1 sigmoid output).
    with torch.device("meta"):
        ds = unetkit.create_model("unetpp", preset="paper", in_channels=1, out_channels=1)
        no_ds = unetkit.create_model(
            "unetpp", preset="paper", in_channels=1, out_channels=1, deep_supervision=False
        )
        unet = unetkit.create_model(
            "unet", channels=(32, 64, 128, 256, 512), norm="none", in_channels=1, out_channels=1
        )
    assert abs(_params(ds) - 9.04e6) / 9.04e6 < 0.02
    assert abs(_params(no_ds) - 9.04e6) / 9.04e6 < 0.02
    assert abs(_params(unet) - 7.76e6) / 7.76e6 < 0.02
    assert _params(ds) - _params(no_ds) == 3 * (32 + 1)  # three extra 1×1 heads


def test_nested_node_grid_and_channels() -> None:
    net = _tiny()  # depth L = 3
    assert sorted(net.nodes) == sorted(f"x{i}_{j}" for j in (1, 2, 3) for i in range(4 - j))
    assert sorted(net.heads) == ["x0_1", "x0_2", "x0_3"]
    # X^{i,j} concatenates j same-level nodes (channels[i] each) and the up-sampled node below
    for j in (1, 2, 3):
        for i in range(4 - j):
            node = net.nodes[f"x{i}_{j}"]
            c = (4, 8, 16, 32)[i]
            assert node.block.conv1.conv.in_channels == (j + 1) * c
            assert node.up.op.in_channels == (4, 8, 16, 32)[i + 1]
    resize = _tiny(up="resize")  # keeps the deeper channels: j·c_i + c_{i+1}
    assert resize.nodes["x1_2"].block.conv1.conv.in_channels == 2 * 8 + 16


def _capture_top_nodes(net: nn.Module) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for j in range(1, net.depth + 1):
        node = net.nodes[f"x0_{j}"]
        node.register_forward_hook(lambda m, i, out, j=j: seen.__setitem__(j, out))
    return seen


def test_deep_supervision_list_order_and_eval_tensor() -> None:
    net = _tiny()
    seen = _capture_top_nodes(net)
    x = torch.randn(2, 1, 19, 23)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 3
    for k, j in enumerate((3, 2, 1)):  # [X^{0,L}, ..., X^{0,1}]
        expected = net.heads[f"x0_{j}"](seen[j])[..., :19, :23]
        torch.testing.assert_close(outs[k], expected)
        assert outs[k].shape == (2, 2, 19, 23)
    net.eval()
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, outs[0].detach())  # no norm/dropout: same function


def test_loss_weights_full_depth_head_most() -> None:
    net = _tiny(channels=(4, 8, 16))
    x, mask = torch.randn(2, 1, 12, 10), torch.randint(0, 2, (2, 12, 10))
    outs = net(x)
    loss = build_loss("ce")(outs, {"mask": mask})
    ref = (F.cross_entropy(outs[0], mask) + 0.5 * F.cross_entropy(outs[1], mask)) / 1.5
    torch.testing.assert_close(loss, ref)


def test_gradient_step_reduces_loss() -> None:
    net = unetkit.create_model("unetpp", channels=(4, 8, 16), deep_supervision=True)
    x, mask = torch.randn(2, 1, 16, 16), (torch.randn(2, 16, 16) > 0).long()
    loss_fn = build_loss("dice_ce")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(net(x), {"mask": mask})
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("level", [1, 2, 3])
def test_pruned_eval_uses_column_head_and_matches_full_network(level: int) -> None:
    net = _tiny()
    x = torch.randn(1, 1, 16, 24)  # a multiple of 2^L: same padding for every level
    full = net(x)  # training mode: all heads, [X^{0,3}, X^{0,2}, X^{0,1}]
    net.eval()
    net.prune_level = level
    with torch.no_grad():
        torch.testing.assert_close(net(x), full[3 - level].detach())


def test_pruning_skips_deeper_nodes() -> None:
    net = _tiny().eval()
    calls: list[str] = []
    for name, module in [
        *net.nodes.items(),
        *((f"enc{i}", s) for i, s in enumerate(net.encoder.stages)),
    ]:
        module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    net.prune_level = 1
    assert net(torch.randn(1, 1, 19, 23)).shape == (1, 2, 19, 23)  # odd size: pad 2^1, crop
    assert sorted(calls) == ["enc0", "enc1", "x0_1"]
    calls.clear()
    net.prune_level = 2
    net(torch.randn(1, 1, 8, 8))
    assert sorted(calls) == ["enc0", "enc1", "enc2", "x0_1", "x0_2", "x1_1"]
    calls.clear()
    net.train()  # training ignores pruning: every node and all heads
    assert len(net(torch.randn(2, 1, 8, 8))) == 3 and len(calls) == 4 + 6


def test_prune_level_validation() -> None:
    with pytest.raises(ConfigError, match=r"prune_level=4 must be None .* 1\.\.3"):
        _tiny(prune_level=4)
    with pytest.raises(ConfigError, match="prune_level=0"):
        _tiny(prune_level=0)
    with pytest.raises(ConfigError, match="set deep_supervision=True"):
        _tiny(deep_supervision=False, prune_level=2)
    assert _tiny(deep_supervision=False, prune_level=3).prune_level == 3  # the full head
    net = _tiny(deep_supervision=False)
    with pytest.raises(ConfigError, match="deep_supervision"):
        net.prune_level = 1


def test_save_load_keeps_config_prune_level(tmp_path: Path) -> None:
    net = _tiny(prune_level=2).eval()
    path = unetkit.save(net, tmp_path / "pp.safetensors")
    loaded = unetkit.load(path).eval()
    assert loaded.prune_level == 2 and loaded.config == net.config
    x = torch.randn(1, 1, 13, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize(("dims", "size"), [(1, (21,)), (3, (7, 9, 5))])
def test_other_dims_odd_sizes(dims: int, size: tuple[int, ...]) -> None:
    net = _tiny(dims=dims, channels=(2, 4, 8), norm="batch")
    outs = net(torch.randn(2, 1, *size))
    assert [tuple(o.shape) for o in outs] == [(2, 2, *size)] * 2
    net.eval().prune_level = 1
    assert net(torch.randn(1, 1, *size)).shape == (1, 2, *size)
