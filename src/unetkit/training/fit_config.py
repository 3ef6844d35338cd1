"""``FitConfig``: everything ``fit`` is told about a run, as one JSON-able value; and
``FitResult``, what it answers.

A recipe builds one ``FitConfig`` and passes it whole (``fit(model, task, train, val,
config)``); the run's config.json records it as it is.

Example:
    >>> FitConfig(epochs=10, batch_size=4, lr=1e-3).save_every_steps
    50
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from unetkit import config as cfg
from unetkit.errors import ConfigError
from unetkit.runtime import DEFAULT_PRECISION, PRECISIONS
from unetkit.training.ema import check_decay as check_ema_decay
from unetkit.training.optim import OPTIMIZERS, SCHEDULERS

# a mid-epoch training state every this many optimiser steps: a killed run loses at most
# that much work (minutes on a CPU, where a diffusion epoch of ~125 steps takes 15 min on a
# busy machine), and a state write (weights + optimiser) stays rare next to the steps
DEFAULT_SAVE_EVERY_STEPS = 50


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """The options of a training run; validated on construction.

    Args:
        epochs: total epochs of the run (a resumed run continues up to this number).
        batch_size: samples per micro-batch per process.
        lr, optimizer, weight_decay, momentum: see ``optim.build_optimizer`` ("sgd":
            momentum 0.99; weight decay None = the optimiser's default, skipping biases and
            norm scales).
        scheduler, warmup_steps: see ``optim.build_scheduler``; the horizon is the run's
            optimizer steps, ``min(epochs * ceil(batches / grad_accum), max_steps)``.
        precision: one of ``runtime.PRECISIONS``; "auto" (default) is bf16 autocast on CUDA
            and bf16-capable CPUs, else fp32.
        grad_accum: micro-batches per optimizer step (with mean losses this equals a batch
            ``grad_accum`` times larger).
        grad_clip: max global L2 norm of the gradients (None: no clipping).
        num_workers: DataLoader worker processes.
        seed: run seed; epoch ``e`` on rank ``r`` is seeded from ``(seed, e, r)``.
        max_steps: stop after this many optimizer steps (the epoch in progress is closed
            with validation and a checkpoint).
        ema_decay: keep an exponential moving average of the weights (e.g. 0.999); the
            validation, last/best files and ``on_epoch_end`` use the averages.
        save_every_steps: write the training state every this many optimizer steps within
            an epoch as well as at its end, so a killed run resumes mid-epoch (None: at
            epoch ends only).
    """

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float | None = None
    momentum: float | None = None
    scheduler: str = "cosine"
    warmup_steps: int = 0
    precision: str = DEFAULT_PRECISION
    grad_accum: int = 1
    grad_clip: float | None = None
    num_workers: int = 0
    seed: int = 0
    max_steps: int | None = None
    ema_decay: float | None = None
    save_every_steps: int | None = DEFAULT_SAVE_EVERY_STEPS

    def __post_init__(self) -> None:
        check_ema_decay(self.ema_decay)
        cfg.check_choice("optimizer", self.optimizer, OPTIMIZERS)
        cfg.check_choice("scheduler", self.scheduler, SCHEDULERS)
        cfg.check_choice("precision", self.precision, PRECISIONS)
        minimums = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "num_workers": 0, "seed": 0}
        for name, low in {**minimums, "warmup_steps": 0}.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip={self.grad_clip} must be > 0 (or None: no clipping)")
        for name in ("max_steps", "save_every_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be an integer >= 1 (or None)")


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns.

    Attributes:
        best_metric: best value of ``monitor`` (None if no epoch produced a finite value).
        best_epoch: 1-based epoch of ``best_metric``.
        epochs_run: epochs completed by the run in total (resumed ones included).
        run_dir: the run folder.
        history: one dict per completed epoch (the rows of metrics.csv).
        monitor: the metric that picked the best checkpoint.
        resumed_from: epochs already completed when this call started (0: a fresh run).
        step: optimizer steps taken in total.
    """

    best_metric: float | None
    best_epoch: int | None
    epochs_run: int
    run_dir: Path
    history: list[dict[str, Any]]
    monitor: str
    resumed_from: int
    step: int
