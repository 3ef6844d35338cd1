"""DiffusionTask: caption embedding, condition dropout, deterministic validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import ConfigError
from unetkit.training.tasks import DiffusionTask


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.contexts: list[torch.Tensor] = []

    def forward(self, x, t, context=None):
        self.contexts.append(context.detach().clone())
        return self.scale * x


def _embed(captions):
    return torch.stack([torch.full((3, 4), float(len(c))) for c in captions])


def _batch(n=64):
    return {"image": torch.randn(n, 1, 4, 4), "caption": ["a digit seven"] * n}


def test_condition_dropout_replaces_about_the_requested_fraction():
    null = torch.full((1, 3, 4), -1.0)
    task = DiffusionTask(NoiseSchedule(), _embed, null, cond_dropout=0.25)
    model = Recorder()
    torch.manual_seed(0)
    for _ in range(10):
        task.training_loss(model, _batch())
    ctx = torch.cat(model.contexts)
    dropped = (ctx[:, 0, 0] == -1).float().mean().item()
    assert 0.18 < dropped < 0.32
    kept = ctx[ctx[:, 0, 0] != -1]
    assert torch.all(kept == len("a digit seven"))


def test_validation_is_deterministic_and_never_drops_the_condition():
    null = torch.zeros(1, 3, 4)
    task = DiffusionTask(NoiseSchedule(), _embed, null, cond_dropout=0.5)
    model = Recorder()
    batch = _batch(8)
    a = task.validation_metrics(model, batch)
    b = task.validation_metrics(model, batch)
    assert a == b and a["count"] == 8
    assert all(torch.all(c != 0) for c in model.contexts)


def test_training_loss_backpropagates_and_dropout_needs_null_context():
    task = DiffusionTask(NoiseSchedule(), _embed, torch.zeros(1, 3, 4))
    model = Recorder()
    task.training_loss(model, _batch(4)).backward()
    assert model.scale.grad is not None
    with pytest.raises(ConfigError, match="null_context"):
        DiffusionTask(NoiseSchedule(), _embed, None, cond_dropout=0.1)
