"""``fit``: one training loop for every model and task, single process or DDP.

A plain torch loop (in the spirit of nanoGPT's ``train.py``): AdamW or the paper's SGD
(momentum 0.99), a per-step LR schedule, bf16 autocast where the hardware supports it,
gradient accumulation with ``no_sync``, clipping, validation each epoch, best/last
checkpoints, resume, a progress bar, metrics CSV and curves. It runs unchanged under
``torchrun --nproc_per_node N`` (gloo on CPU, nccl on CUDA).

Reproducibility: all randomness of epoch ``e`` on rank ``r`` (data order, augmentation,
dropout, DataLoader worker seeds) is seeded from ``(seed, e, r)`` when the epoch starts, and
each epoch ends with one atomic ``state.safetensors`` (weights, optimizer, scheduler,
counters, history, RNG). So a run killed at any moment, SIGKILL included, resumes from its
last completed epoch and ends with the weights of an uninterrupted run.

Example:
    >>> import torch.nn.functional as F, unetkit
    >>> from unetkit.training.tasks import SupervisedTask
    >>> from unetkit.training.trainer import fit
    >>> net = unetkit.create_model("unet", channels=(8, 16), norm="none")
    >>> task = SupervisedTask(lambda out, b: F.cross_entropy(out, b["mask"]))
    >>> result = fit(net, task, train_set, val_set, run_dir="runs/demo",     # doctest: +SKIP
    ...              epochs=10, batch_size=4, lr=1e-3)
    >>> result.best_metric, result.best_epoch                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from unetkit import config as cfg
from unetkit._version import __version__
from unetkit.errors import CheckpointError, ConfigError, DataError, UnetkitError
from unetkit.formats.checkpoint import load_state_dict_strict
from unetkit.runtime import (
    DEFAULT_PRECISION,
    PRECISIONS,
    autocast,
    fast_memory_format,
    resolve_precision,
)
from unetkit.training import distributed
from unetkit.training.ema import EMA
from unetkit.training.ema import check_decay as check_ema_decay
from unetkit.training.logging import ModelSaver, RunDirectory
from unetkit.training.optim import (
    DEFAULT_WEIGHT_DECAY,
    OPTIMIZERS,
    SCHEDULERS,
    build_optimizer,
    build_scheduler,
    current_lr,
    freeze_frozen_norms,
    parameter_groups,
    trainable_parameters,
)
from unetkit.training.tasks import Task, batch_size_of, reduce_sums, to_device

logger = logging.getLogger(__name__)
STATE_VERSION = 1
_PLOT_INTERVAL_S = 30.0  # redraw curves.png every this many seconds, and at the end
EpochCallback = Callable[[int, dict[str, float], nn.Module], bool | None]


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """The JSON-able options of ``fit`` (see ``fit`` for their meaning); validated here."""

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
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} must be >= 1 (or None)")


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


# --- the loop -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """The objects of one ``fit`` call and the run's progress counters."""

    fc: FitConfig
    run: RunDirectory
    model: nn.Module  # the plain model (validation, checkpoints)
    ddp: nn.Module  # what training forwards through: the model, DDP-wrapped under torchrun
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    params: list[nn.Parameter]
    device: torch.device
    dtype: torch.dtype | None
    monitor: str
    mode: str
    extra: Mapping[str, Any] | None
    saver: ModelSaver | None
    progress: bool
    ema: EMA | None = None  # validation, checkpoints and callbacks see its averages
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def train_epoch(self, loader: DataLoader) -> float:
        """One pass over ``loader``; returns the sample-weighted mean loss over all ranks."""
        self.ddp.train()
        freeze_frozen_norms(self.model)  # a frozen base keeps its BatchNorm statistics
        self.optimizer.zero_grad(set_to_none=True)  # nothing stale joins the first step
        n_micro, accum, fc = len(loader), self.fc.grad_accum, self.fc
        loss_sum, count = torch.zeros((), dtype=torch.float64), 0
        show = self.progress and distributed.is_main()
        desc = f"epoch {self.epoch + 1}/{fc.epochs}"
        bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show)
        for i, batch in enumerate(bar):
            batch = to_device(batch, self.device)
            first = (i // accum) * accum
            group = min(accum, n_micro - first)  # a short last group averages over its size
            sync = i - first == group - 1
            with distributed.maybe_no_sync(self.ddp, not sync):
                with autocast(self.device, self.dtype):
                    loss = self.task.training_loss(self.ddp, batch)
                if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                    found = getattr(loss, "shape", type(loss).__name__)
                    raise ConfigError(
                        f"{type(self.task).__name__}.training_loss must return a scalar tensor "
                        f"(the batch mean); got {found}"
                    )
                (loss.float() / group).backward()
            n = batch_size_of(batch)
            loss_sum += loss.detach().double().cpu() * n
            count += n
            if sync:
                if fc.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.params, fc.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.ema is not None:
                    self.ema.update()
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
                if fc.max_steps is not None and self.step >= fc.max_steps:
                    break
        distributed.sync_buffers(self.model)
        sums = distributed.all_reduce_sums({"loss": loss_sum, "count": count})
        return sums["loss"] / sums["count"]

    def validate(self, loader: DataLoader) -> dict[str, float]:
        """Task metrics over this rank's shard of ``loader``, summed over ranks, averaged."""
        # the plain model: DDP's forward starts collectives that uneven shards would hang
        self.model.eval()
        sums: dict[str, float] = {}
        with self.averaged(), torch.inference_mode(), autocast(self.device, self.dtype):
            for batch in loader:
                stats = self.task.validation_metrics(self.model, to_device(batch, self.device))
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train()
        total = distributed.all_reduce_sums(sums)
        reduce = getattr(self.task, "reduce_metrics", None)
        return dict(reduce(total)) if callable(reduce) else reduce_sums(total)

    def save_models(self, row: Mapping[str, Any], *, best: bool) -> None:
        """last (and best) model files, with the epoch's facts in their metadata."""
        metrics = {k: v for k, v in row.items() if k not in ("epoch", "step")}
        facts = {"epoch": row["epoch"], "step": row["step"], "monitor": self.monitor}
        if self.ema is not None:
            facts["ema_decay"] = self.ema.decay
        extra = {**(self.extra or {}), "training": {**facts, "metrics": metrics}}
        with self.averaged():
            self.run.save_model(self.model, "last", extra=extra, saver=self.saver)
            if best:
                self.run.save_model(self.model, "best", extra=extra, saver=self.saver)

    def averaged(self) -> contextlib.AbstractContextManager:
        """The EMA weights in the model for the block (a null context without EMA)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def commit(self, row: dict[str, Any]) -> None:
        """Close an epoch: best tracking, the state file, then the files derived from it.

        The state file is the commit point: ``resume`` rewrites last/best/metrics from it if
        a kill came between the two.
        """
        if self.monitor not in row:
            raise ConfigError(
                f"monitor={self.monitor!r} is not among the epoch's metrics {sorted(row)}; "
                f"set the task's monitor to one of them"
            )
        self.history.append(row)
        self.epoch = row["epoch"]
        value = float(row[self.monitor])
        improved = math.isfinite(value) and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        )
        if improved:
            self.best, self.best_epoch = value, self.epoch
        self.run.save_state(
            {
                "version": STATE_VERSION,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "best": {"metric": self.best, "epoch": self.best_epoch, "monitor": self.monitor},
                "history": self.history,
                "rng": distributed.capture_rng_state(),
                "seed": self.fc.seed,
                "world_size": distributed.world_size(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            }
        )
        self.save_models(row, best=improved)
        self.run.write_metrics(self.history)

    def resume(self) -> None:
        """Load ``state.safetensors``: weights, optimizer, schedule position, counters."""
        state = self.run.load_state()
        try:
            load_state_dict_strict(self.model, state["model"], source=str(self.run.state_path))
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"{self.run.state_path}: cannot resume ({e}); the model or `trainable` differ "
                f"from the saved run. Use another run_dir, or resume=False to start over"
            ) from None
        sched = dict(state["scheduler"])
        sched["lr_lambdas"] = [None] * len(self.scheduler.lr_lambdas)  # horizon: this call's
        self.scheduler.load_state_dict(sched)
        lambdas = self.scheduler.lr_lambdas
        for group, base, fn in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, lambdas, strict=True
        ):
            group["lr"] = base * fn(self.scheduler.last_epoch)
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError(
                    f"{self.run.state_path}: the run was trained without EMA; resume it "
                    f"with ema_decay=None, or use another run_dir"
                )
            self.ema.load_state_dict(state["ema"], source=str(self.run.state_path))
        distributed.restore_rng_state(state["rng"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = [dict(row) for row in state["history"]]
        self.best, self.best_epoch = state["best"]["metric"], state["best"]["epoch"]
        if state["best"]["monitor"] != self.monitor:  # a best of another metric means nothing
            self.best, self.best_epoch = None, None
        distributed.log_main("resuming %s after epoch %d", self.run.path, self.epoch, logger=logger)
        if self.history:  # files written after the state may be an epoch behind: redo them
            self.save_models(self.history[-1], best=self.best_epoch == self.epoch)
            self.run.write_metrics(self.history)

    def config(self, train_dataset: Dataset, val_dataset: Dataset | None) -> dict[str, Any]:
        """The resolved run configuration written to config.json."""
        model, fc = self.model, self.fc
        model_config = getattr(model, "config", None)
        n_val = len(val_dataset) if val_dataset is not None else 0  # type: ignore[arg-type]
        return {
            "unetkit_version": __version__,
            "fit": {
                **cfg.to_dict(fc),
                "weight_decay": self.optimizer.param_groups[0]["weight_decay"],
                "autocast": "bf16" if self.dtype is not None else "fp32",
                "device": str(self.device),
                "world_size": distributed.world_size(),
                "total_steps": self.scheduler.lr_lambdas[0].total_steps,
            },
            "model": {
                "name": getattr(type(model), "registry_name", type(model).__name__),
                "config": cfg.to_dict(model_config)
                if dataclasses.is_dataclass(model_config)
                else None,
                "parameters": sum(p.numel() for p in model.parameters()),
                "trainable_parameters": sum(p.numel() for p in self.params),
            },
            "task": {"class": type(self.task).__name__, "monitor": self.monitor, "mode": self.mode},
            "data": {"train_samples": len(train_dataset), "val_samples": n_val},  # type: ignore[arg-type]
        }


def fit(
    model: nn.Module,
    task: Task,
    train_dataset: Dataset,
    val_dataset: Dataset | None = None,
    *,
    run_dir: str | Path,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adamw",
    weight_decay: float | None = None,
    momentum: float | None = None,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    precision: str = DEFAULT_PRECISION,
    grad_accum: int = 1,
    grad_clip: float | None = None,
    num_workers: int = 0,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    trainable: Any = None,
    checkpoint_extra: Mapping[str, Any] | None = None,
    run_config: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
    on_epoch_end: EpochCallback | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | str | None = None,
    save_model: ModelSaver | None = None,
    ema_decay: float | None = None,
) -> FitResult:
    """Train ``model`` on ``task``; checkpoint, log and resume through ``run_dir``.

    Args:
        model: any ``nn.Module``; with the default ``save_model`` a registered unetkit model.
            Trained in place; on return it holds the last epoch's weights.
        task: a ``Task`` (e.g. ``SupervisedTask``): batch -> loss, batch -> metric sums.
        train_dataset / val_dataset: map-style datasets of samples the default collate can
            batch (dict samples, e.g. {"image": C×H×W float, "mask": H×W long}).
        run_dir: run folder (layout in ``unetkit.training.logging``).
        epochs: total epochs of the run (a resumed run continues up to this number).
        batch_size: samples per micro-batch per process.
        lr, optimizer, weight_decay, momentum: see ``build_optimizer`` ("sgd": momentum 0.99).
            Weight decay skips biases and norm scales (``parameter_groups``).
        scheduler, warmup_steps: see ``build_scheduler``; the horizon is the run's optimizer
            steps, ``min(epochs * ceil(batches / grad_accum), max_steps)``.
        precision: "auto" (bf16 autocast on CUDA and bf16-capable CPUs, else fp32) | "bf16" |
            "fp32".
        grad_accum: micro-batches per optimizer step (with mean losses this equals a batch
            ``grad_accum`` times larger).
        grad_clip: max global L2 norm of the gradients (None: no clipping).
        num_workers: DataLoader worker processes.
        seed: run seed; epoch ``e`` on rank ``r`` is seeded from ``(seed, e, r)``.
        resume: continue from ``run_dir/checkpoints/state.safetensors`` if it exists
            (False: start over and overwrite the run).
        progress: tqdm progress bar on rank 0.
        trainable: None (parameters with requires_grad), a predicate ``(name, param) ->
            bool`` or a list of names/parameters; sets ``requires_grad`` to match.
        checkpoint_extra: JSON metadata for last/best files (the trainer adds "training").
        run_config: caller's settings (CLI arguments, data set) stored in config.json "run".
        max_steps: stop after this many optimizer steps (the epoch in progress is closed
            with validation and a checkpoint).
        on_epoch_end: ``(epoch, metrics_row, model) -> stop?`` called on every rank after
            each epoch's checkpoint; rank 0's answer decides (e.g. early stopping).
        collate_fn: DataLoader collate function.
        device: default ``cuda:LOCAL_RANK`` if CUDA is available, else CPU.
        save_model: ``(model, path, extra) -> Any`` for last/best (default ``unetkit.save``).
        ema_decay: keep an exponential moving average of the trained weights with this
            decay (e.g. 0.999; see ``unetkit.training.ema``). Validation, the last/best
            files and ``on_epoch_end`` then use the averages, and on return the model holds
            them; the raw weights are in the state file for resuming.

    Returns:
        ``FitResult``. Without ``val_dataset`` the best checkpoint tracks "train/loss" (min).

    Under ``torchrun`` the process group is set up (and torn down) here when none exists.
    """
    fc = FitConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        momentum=momentum,
        scheduler=scheduler,
        warmup_steps=warmup_steps,
        precision=precision,
        grad_accum=grad_accum,
        grad_clip=grad_clip,
        num_workers=num_workers,
        seed=seed,
        max_steps=max_steps,
        ema_decay=ema_decay,
    )
    if checkpoint_extra is not None and "training" in checkpoint_extra:
        raise ConfigError("checkpoint_extra key 'training' is reserved for the trainer's facts")
    dev = torch.device(device) if device is not None else distributed.default_device()
    created = distributed.init_from_env(dev)
    try:
        rank = distributed.rank()
        dtype = resolve_precision(fc.precision, dev)
        distributed.seed_everything(fc.seed + rank)
        model.to(dev)
        if dtype is not None and fast_memory_format(model) == torch.channels_last:
            # bf16 convolutions are ~1.5x faster in NHWC on CPU (oneDNN); values unchanged
            model.to(memory_format=torch.channels_last)
        named = trainable_parameters(model, trainable)
        wd = DEFAULT_WEIGHT_DECAY[fc.optimizer] if fc.weight_decay is None else fc.weight_decay
        groups = parameter_groups(named, wd)
        opt = build_optimizer(groups, fc.optimizer, lr=fc.lr, weight_decay=wd, momentum=momentum)

        loader_kw = dict(batch_size=fc.batch_size, num_workers=fc.num_workers)
        loader_kw.update(collate_fn=collate_fn, pin_memory=dev.type == "cuda")
        sampler = distributed.train_sampler(train_dataset, seed=fc.seed)
        train_loader = DataLoader(train_dataset, sampler=sampler, **loader_kw)
        if len(train_loader) == 0:
            raise DataError("train_dataset is empty: no sample to train on")
        val_loader = None
        if val_dataset is not None and len(val_dataset) > 0:  # type: ignore[arg-type]
            shards = distributed.ShardSampler(val_dataset)
            val_loader = DataLoader(val_dataset, sampler=shards, **loader_kw)
        total = fc.epochs * math.ceil(len(train_loader) / fc.grad_accum)
        total = min(total, fc.max_steps) if fc.max_steps is not None else total
        warmup = min(fc.warmup_steps, total)
        sched = build_scheduler(opt, fc.scheduler, total_steps=total, warmup_steps=warmup)
        monitor, mode = (task.monitor, task.mode) if val_loader else ("train/loss", "min")

        run = RunDirectory(run_dir)
        params = [p for _, p in named]
        state = _Run(
            fc,
            run,
            model,
            model,
            task,
            opt,
            sched,
            params,
            dev,
            dtype,
            monitor,
            mode,
            checkpoint_extra,
            save_model,
            progress,
            EMA(named, fc.ema_decay) if fc.ema_decay is not None else None,
        )
        run.prepare()
        distributed.barrier()
        if resume and run.has_state():
            state.resume()
        elif run.has_state():
            distributed.log_main(
                "resume=False: starting %s over", run.path, level=logging.WARNING, logger=logger
            )
        run.write_config(
            {**state.config(train_dataset, val_dataset), "run": dict(run_config or {})}
        )
        state.ddp = distributed.wrap_ddp(model, dev)
        return _loop(state, train_loader, sampler, val_loader, on_epoch_end)
    finally:
        if created:
            distributed.destroy()


def _loop(
    r: _Run,
    train_loader: DataLoader,
    sampler: DistributedSampler,
    val_loader: DataLoader | None,
    on_epoch_end: EpochCallback | None,
) -> FitResult:
    fc, rank = r.fc, distributed.rank()
    start, last_plot, plotted = r.epoch, time.monotonic(), len(r.history)
    while r.epoch < fc.epochs and (fc.max_steps is None or r.step < fc.max_steps):
        t0 = time.perf_counter()
        distributed.seed_everything(distributed.epoch_seed(fc.seed, r.epoch, rank))
        sampler.set_epoch(r.epoch)
        train_loss = r.train_epoch(train_loader)
        if not math.isfinite(train_loss):
            raise UnetkitError(
                f"training diverged: train/loss={train_loss} in epoch {r.epoch + 1}; lower lr, "
                f"set grad_clip, or use precision='fp32'"
            )
        row = {"epoch": r.epoch + 1, "step": r.step, "train/loss": train_loss}
        row["lr"] = current_lr(r.optimizer)
        if val_loader is not None:
            row.update(r.validate(val_loader))
        row["seconds"] = time.perf_counter() - t0
        r.commit(row)
        if time.monotonic() - last_plot >= _PLOT_INTERVAL_S:
            r.run.plot_curves(r.history)
            last_plot, plotted = time.monotonic(), len(r.history)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step"))
        distributed.log_main("epoch %d/%d  %s", r.epoch, fc.epochs, shown, logger=logger)
        distributed.barrier()
        stop = False
        if on_epoch_end is not None:
            with r.averaged():
                stop = bool(on_epoch_end(r.epoch, dict(row), r.model))
        if distributed.broadcast_flag(stop):
            distributed.log_main("stopped by on_epoch_end after epoch %d", r.epoch, logger=logger)
            break
    if len(r.history) != plotted:
        r.run.plot_curves(r.history)
    if r.ema is not None:
        r.ema.copy_to_params()
    distributed.barrier()
    history = [dict(row) for row in r.history]
    return FitResult(r.best, r.best_epoch, r.epoch, r.run.path, history, r.monitor, start, r.step)
