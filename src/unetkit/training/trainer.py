"""``fit``: one training loop for every model and task, single process or DDP.

A plain torch loop (in the spirit of nanoGPT's ``train.py``): AdamW or the paper's SGD
(momentum 0.99), a per-step LR schedule, bf16 autocast where the hardware supports it,
gradient accumulation with ``no_sync``, clipping, validation each epoch, best/last
checkpoints, resume, a progress bar, metrics CSV and curves. It runs unchanged under
``torchrun --nproc_per_node N`` (gloo on CPU, nccl on CUDA). The options are one
``FitConfig``; the loop itself is in ``training.loop``.

Reproducibility: all randomness of epoch ``e`` on rank ``r`` (data order, augmentation,
dropout, DataLoader worker seeds) is seeded from ``(seed, e, r)`` when the epoch starts, and
each epoch ends with one atomic ``state.safetensors`` (weights, optimizer, scheduler,
counters, history, RNG), written also every ``save_every_steps`` optimizer steps inside an
epoch. So a run killed at any moment, SIGKILL included, resumes from its last state and
ends with the weights of an uninterrupted run.

Example:
    >>> import torch.nn.functional as F, unetkit
    >>> from unetkit.training.tasks import SupervisedTask
    >>> net = unetkit.create_model("unet", channels=(8, 16), norm="none")
    >>> task = SupervisedTask(lambda out, b: F.cross_entropy(out, b["mask"]))
    >>> config = FitConfig(epochs=10, batch_size=4, lr=1e-3)
    >>> result = fit(net, task, train_set, val_set, config, run_dir="runs/demo")  # doctest: +SKIP
    >>> result.best_metric, result.best_epoch                                   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from unetkit.errors import ConfigError, DataError
from unetkit.runtime import fast_memory_format, resolve_precision
from unetkit.training import distributed
from unetkit.training.ema import EMA
from unetkit.training.fit_config import FitConfig, FitResult
from unetkit.training.logging import ModelSaver, RunDirectory
from unetkit.training.loop import EpochCallback, ResumableSampler, Run, run_epochs
from unetkit.training.optim import (
    DEFAULT_WEIGHT_DECAY,
    build_optimizer,
    build_scheduler,
    parameter_groups,
    trainable_parameters,
)
from unetkit.training.tasks import Task

logger = logging.getLogger(__name__)


def _loaders(
    fc: FitConfig,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    collate_fn: Callable[[list[Any]], Any] | None,
    device: torch.device,
) -> tuple[DataLoader, DataLoader | None]:
    """(train loader over a resumable shuffled sampler, validation loader over this rank's
    shard or None)."""
    loader_kw = dict(batch_size=fc.batch_size, num_workers=fc.num_workers)
    loader_kw.update(collate_fn=collate_fn, pin_memory=device.type == "cuda")
    sampler = ResumableSampler(distributed.train_sampler(train_dataset, seed=fc.seed))
    train_loader = DataLoader(train_dataset, sampler=sampler, **loader_kw)
    if len(train_loader) == 0:
        raise DataError("train_dataset is empty: no sample to train on")
    val_loader = None
    if val_dataset is not None and len(val_dataset) > 0:  # type: ignore[arg-type]
        shards = distributed.ShardSampler(val_dataset)
        val_loader = DataLoader(val_dataset, sampler=shards, **loader_kw)
    return train_loader, val_loader


def fit(
    model: nn.Module,
    task: Task,
    train_dataset: Dataset,
    val_dataset: Dataset | None,
    config: FitConfig,
    *,
    run_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    trainable: Any = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
    run_config: Mapping[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | str | None = None,
    save_model: ModelSaver | None = None,
) -> FitResult:
    """Train ``model`` on ``task`` as ``config`` says; checkpoint, log and resume through
    ``run_dir``.

    Args:
        model: any ``nn.Module``; with the default ``save_model`` a registered unetkit model.
            Trained in place; on return it holds the last epoch's weights (the EMA averages
            with ``config.ema_decay``).
        task: a ``Task`` (e.g. ``SupervisedTask``): batch -> loss, batch -> metric sums.
        train_dataset / val_dataset: map-style datasets of samples the default collate can
            batch (dict samples, e.g. {"image": C×H×W float, "mask": H×W long}); no
            validation set: None.
        config: the run's ``FitConfig`` (epochs, batch size, optimiser, schedule,
            precision, seeds, checkpoint interval).
        run_dir: run folder (layout in ``unetkit.training.logging``).
        resume: continue from ``run_dir/checkpoints/state.safetensors`` if it exists
            (False: start over and overwrite the run).
        progress: tqdm progress bar on rank 0.
        trainable: None (parameters with requires_grad), a predicate ``(name, param) ->
            bool`` or a list of names/parameters; sets ``requires_grad`` to match.
        checkpoint_extra: JSON metadata for last/best files (the trainer adds "training").
        run_config: caller's settings (CLI arguments, data set) stored in config.json "run".
        on_epoch_end: ``(epoch, metrics_row, model) -> stop?`` called on every rank after
            each epoch's checkpoint; rank 0's answer decides (e.g. early stopping).
        collate_fn: DataLoader collate function.
        device: default ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.
        save_model: ``(model, path, extra) -> Any`` for last/best (default ``unetkit.save``).

    Returns:
        ``FitResult``. Without ``val_dataset`` the best checkpoint tracks "train/loss" (min).

    Under ``torchrun`` the process group is set up (and torn down) here when none exists.
    """
    if not isinstance(config, FitConfig):
        raise ConfigError(f"config must be a FitConfig, got {type(config).__name__}")
    if checkpoint_extra is not None and "training" in checkpoint_extra:
        raise ConfigError("checkpoint_extra key 'training' is reserved for the trainer's facts")
    dev = torch.device(device) if device is not None else distributed.default_device()
    created = distributed.init_from_env(dev)
    try:
        outputs = dict(run=RunDirectory(run_dir), extra=checkpoint_extra, saver=save_model)
        r, train_loader, val_loader = _prepare(
            model, task, (train_dataset, val_dataset, collate_fn), config, dev, trainable,
            dict(outputs, progress=progress),
        )  # fmt: skip
        r.run.prepare()
        distributed.barrier()
        if resume and r.run.has_state():
            r.resume()
        elif r.run.has_state():
            distributed.log_main(
                "resume=False: starting %s over", r.run.path, level=logging.WARNING, logger=logger
            )
        r.run.write_config({**r.config(train_dataset, val_dataset), "run": dict(run_config or {})})
        r.ddp = distributed.wrap_ddp(model, dev)
        return run_epochs(r, train_loader, val_loader, on_epoch_end)
    finally:
        if created:
            distributed.destroy()


def _prepare(
    model: nn.Module,
    task: Task,
    data: tuple[Dataset, Dataset | None, Callable[[list[Any]], Any] | None],
    fc: FitConfig,
    dev: torch.device,
    trainable: Any,
    outputs: dict[str, Any],
) -> tuple[Run, DataLoader, DataLoader | None]:
    """The ``Run`` of a ``fit`` call (model on its device, optimiser, LR schedule) and its
    loaders; ``data`` = (train, validation, collate_fn), ``outputs`` = the ``Run`` fields
    run, extra, saver and progress."""
    dtype = resolve_precision(fc.precision, dev)
    distributed.seed_everything(fc.seed + distributed.rank())
    model.to(dev)
    if dtype is not None and fast_memory_format(model) == torch.channels_last:
        # bf16 convolutions are ~1.5x faster in NHWC on CPU (oneDNN); values unchanged
        model.to(memory_format=torch.channels_last)
    named = trainable_parameters(model, trainable)
    wd = DEFAULT_WEIGHT_DECAY[fc.optimizer] if fc.weight_decay is None else fc.weight_decay
    groups = parameter_groups(named, wd)
    opt = build_optimizer(groups, fc.optimizer, lr=fc.lr, weight_decay=wd, momentum=fc.momentum)
    train_loader, val_loader = _loaders(fc, *data, dev)
    total = fc.epochs * math.ceil(len(train_loader) / fc.grad_accum)
    total = min(total, fc.max_steps) if fc.max_steps is not None else total
    warmup = min(fc.warmup_steps, total)
    sched = build_scheduler(opt, fc.scheduler, total_steps=total, warmup_steps=warmup)
    monitor, mode = (task.monitor, task.mode) if val_loader else ("train/loss", "min")
    r = Run(
        fc=fc, model=model, ddp=model, task=task, optimizer=opt, scheduler=sched,
        params=[p for _, p in named], device=dev, dtype=dtype, monitor=monitor, mode=mode,
        ema=EMA(named, fc.ema_decay) if fc.ema_decay is not None else None, **outputs,
    )  # fmt: skip
    return r, train_loader, val_loader
