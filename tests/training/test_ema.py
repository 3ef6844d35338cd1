"""EMA of the trained weights: the update rule, swapping, and its place in fit()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trainer_toy as toy  # registered by conftest.py

import unetkit
from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats.checkpoint import load_state
from unetkit.training.ema import EMA


def test_update_follows_the_recurrence_in_float64() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(list(net.named_parameters()), decay=0.9)
    ref = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    for k in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9, (1 + k) / (10 + k))  # warm-up ramp, then the set decay
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        for n, p in net.named_parameters():
            ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    for n in ref:
        torch.testing.assert_close(ema.shadow[n].double(), ref[n], rtol=0, atol=1e-5)


def test_applied_swaps_in_and_restores_exactly() -> None:
    net = torch.nn.Linear(4, 4)
    ema = EMA(list(net.named_parameters()), decay=0.5, warmup=False)
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    with ema.applied():
        torch.testing.assert_close(net.weight, raw["weight"] + 0.5)
    assert torch.equal(net.weight, raw["weight"] + 1.0)


def test_state_round_trip_and_mismatch_error() -> None:
    net = torch.nn.Linear(2, 2)
    ema = EMA(list(net.named_parameters()), decay=0.99)
    ema.update()
    other = EMA(list(torch.nn.Linear(2, 2).named_parameters()), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    wrong = EMA(list(torch.nn.Linear(2, 3).named_parameters()), decay=0.99)
    with pytest.raises(CheckpointError, match="shape"):
        wrong.load_state_dict(ema.state_dict(), source="state.safetensors")


def test_fit_with_ema_saves_averages_and_resumes_exactly(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model, result = toy.run(tmp_path / "full", 3, ema_decay=0.9)
    saved = unetkit.load(tmp_path / "full/checkpoints/last.safetensors")
    state = load_state(tmp_path / "full/checkpoints/state.safetensors")
    raw, shadow = state["model"], state["ema"]["shadow"]
    assert state["ema"]["updates"] == result.step == 12
    for name, value in saved.state_dict().items():  # the files hold the averages ...
        torch.testing.assert_close(value, shadow[name], rtol=0, atol=0)
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert any(not torch.equal(raw[n], shadow[n]) for n in shadow)  # ... not the raw weights
    meta = unetkit.read_metadata(tmp_path / "full/checkpoints/last.safetensors")
    assert meta["training"]["ema_decay"] == 0.9

    # killed after epoch 1, resumed in a fresh model: the same averages as the whole run
    toy.run(tmp_path / "cut", 3, ema_decay=0.9, on_epoch_end=lambda e, row, m: e == 1)
    resumed, _ = toy.run(tmp_path / "cut", 3, ema_decay=0.9)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_validation_sees_the_averages(tmp_path: Path) -> None:
    seen = []
    toy.run(
        tmp_path,
        1,
        ema_decay=0.5,
        on_epoch_end=lambda e, row, m: seen.append(
            {n: p.detach().clone() for n, p in m.named_parameters()}
        ),
    )
    shadow = load_state(tmp_path / "checkpoints/state.safetensors")["ema"]["shadow"]
    for name, value in seen[0].items():
        assert torch.equal(value, shadow[name]), name


def test_ema_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ema_decay"):
        toy.run(tmp_path / "bad", 1, ema_decay=1.0)
    toy.run(tmp_path / "plain", 1)
    with pytest.raises(CheckpointError, match="without EMA"):
        toy.run(tmp_path / "plain", 2, ema_decay=0.9)
