"""Optimiser and LR-schedule builders against hand-computed float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from unetkit.errors import ConfigError
from unetkit.training.optim import (
    build_optimizer,
    build_scheduler,
    parameter_groups,
    trainable_parameters,
)


def _lrs(name: str, total: int, warmup: int, base: float = 0.1, **kw: float) -> list[float]:
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=base)
    sched = build_scheduler(opt, name, total_steps=total, warmup_steps=warmup, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_sgd_uses_paper_momentum_and_updates_like_heavy_ball() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = build_optimizer([p], "sgd", lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0.99
    assert opt.param_groups[0]["weight_decay"] == 0.0
    g = torch.tensor([0.5, 0.25], dtype=torch.float64)
    expected, velocity = p.detach().clone(), torch.zeros(2, dtype=torch.float64)
    for _ in range(3):
        p.grad = g.clone()
        opt.step()
        velocity = 0.99 * velocity + g  # v_t = mu v_{t-1} + g, p -= lr v_t
        expected -= 0.1 * velocity
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_adamw_defaults_and_momentum_rejected() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], "adamw", lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match="momentum"):
        build_optimizer([p], "adamw", lr=1e-3, momentum=0.9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="adamv", lr=1e-3), "did you mean 'adamw'"),
        (dict(name="sgd", lr=0.0), "lr=0.0"),
        (dict(name="sgd", lr=0.1, momentum=1.0), "momentum"),
        (dict(name="sgd", lr=0.1, weight_decay=-1.0), "weight_decay"),
    ],
)
def test_build_optimizer_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_optimizer([nn.Parameter(torch.zeros(1))], **kwargs)


def test_warmup_cosine_matches_float64_formula() -> None:
    total, warmup, base = 50, 7, 0.1
    got = _lrs("warmup_cosine", total, warmup, base)
    for k, lr in enumerate(got):
        if k < warmup:
            want = base * (k + 1) / warmup
        else:
            want = base * 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), k
    assert got[warmup - 1] == pytest.approx(base)  # warm-up ends at the base rate


def test_warmup_cosine_default_warmup_is_five_percent() -> None:
    got = _lrs("warmup_cosine", 100, 0, 1.0)
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_cosine_poly_constant_values() -> None:
    total = 20
    cos = _lrs("cosine", total, 0, 1.0, min_lr_ratio=0.1)
    poly = _lrs("poly", total, 0, 1.0)
    const = _lrs("constant", total, 3, 1.0)
    for k in range(total):
        p = k / total
        assert cos[k] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-12)
        assert poly[k] == pytest.approx((1 - p) ** 0.9, rel=1e-12)
    assert const == pytest.approx([1 / 3, 2 / 3] + [1.0] * (total - 2))


def test_scheduler_state_is_plain_data() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    lam = sched.state_dict()["lr_lambdas"][0]
    assert lam == {
        "kind": "cosine",
        "total_steps": 10,
        "warmup_steps": 2,
        "min_lr_ratio": 0.0,
        "power": 0.9,
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="cosin", total_steps=10), "did you mean 'cosine'"),
        (dict(name="cosine", total_steps=0), "total_steps"),
        (dict(name="cosine", total_steps=10, warmup_steps=11), "warmup_steps"),
    ],
)
def test_build_scheduler_errors(kwargs: dict, match: str) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match=match):
        build_scheduler(opt, **kwargs)


def test_parameter_groups_skip_decay_on_biases() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2))
    groups = parameter_groups(net.named_parameters(), 0.05)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


def test_trainable_parameters_selects_and_freezes() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    chosen = trainable_parameters(net, lambda name, p: name.startswith("1."))
    assert [n for n, _ in chosen] == ["1.weight", "1.bias"]
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]
    chosen = trainable_parameters(net, ["0.bias"])
    assert [n for n, _ in chosen] == ["0.bias"]
    with pytest.raises(ConfigError, match="not parameters"):
        trainable_parameters(net, ["2.weight"])
    with pytest.raises(ConfigError, match="no trainable"):
        trainable_parameters(net, lambda name, p: False)
