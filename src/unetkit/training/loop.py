"""The training loop of ``fit``: epochs of optimizer steps, validation, the state commits.

``Run`` holds one ``fit`` call's objects and progress; ``run_epochs`` drives it. The state
file (``checkpoints/state.safetensors``) is the commit point. It is written at each epoch's
end, and every ``save_every_steps`` optimizer steps inside an epoch, with the position in
the epoch (micro-batches done), the epoch's partial loss sums and the RNG state, so a
resumed run skips the batches already seen and continues as if never stopped (bit for bit
in one process with ``num_workers=0``; under DDP or with workers the data order is the
same, the augmentation randomness of the resumed part may differ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from unetkit import config as cfg
from unetkit._version import __version__
from unetkit.errors import CheckpointError, ConfigError, UnetkitError
from unetkit.formats.checkpoint import load_state_dict_strict
from unetkit.runtime import autocast
from unetkit.training import distributed
from unetkit.training.ema import EMA
from unetkit.training.fit_config import FitConfig, FitResult
from unetkit.training.logging import ModelSaver, RunDirectory
from unetkit.training.optim import current_lr, freeze_frozen_norms
from unetkit.training.tasks import Task, batch_size_of, reduce_sums, to_device

logger = logging.getLogger(__name__)
# 1: epoch-end states; 2: adds "batch" and "partial" (mid-epoch states). Both load.
STATE_VERSION = 2
_PLOT_INTERVAL_S = 30.0  # redraw curves.png every this many seconds, and at the end
EpochCallback = Callable[[int, dict[str, float], nn.Module], bool | None]


class ResumableSampler(Sampler[int]):
    """A sampler that can start its next pass part-way: ``skip`` indices are left out once
    (a mid-epoch resume), without touching any random generator. ``len`` stays the full
    epoch's, so the epoch's batch count and the LR horizon do not change."""

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(list(self.inner)[skip:])

    def __len__(self) -> int:
        return len(self.inner)


@dataclasses.dataclass
class Run:
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
    batch: int = 0  # micro-batches of epoch ``epoch + 1`` done (a mid-epoch state)
    partial: tuple[float, int] = (0.0, 0)  # that epoch's loss sum and sample count so far
    rng: Any = None  # RNG state to restore once the resumed epoch's batches are set up
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def train_epoch(self, loader: DataLoader) -> float:
        """One pass over ``loader`` (from ``self.batch`` on, after a mid-epoch resume);
        returns the sample-weighted mean loss over all ranks."""
        self.ddp.train()
        freeze_frozen_norms(self.model)  # a frozen base keeps its BatchNorm statistics
        self.optimizer.zero_grad(set_to_none=True)  # nothing stale joins the first step
        n_micro, fc = len(loader), self.fc
        start = self.batch
        loader.sampler.skip = start * fc.batch_size  # type: ignore[union-attr]
        loss_sum = torch.tensor(self.partial[0], dtype=torch.float64)
        count = self.partial[1]
        show = self.progress and distributed.is_main()
        desc = f"epoch {self.epoch + 1}/{fc.epochs}"
        batches = iter(loader)  # creating it draws a seed: before the RNG restore below
        bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=not show,
                   initial=start, total=n_micro)  # fmt: skip
        if self.rng is not None:
            distributed.restore_rng_state(self.rng)
            self.rng = None
        for i, batch in enumerate(bar, start=start):
            loss, sync = self._micro_step(batch, i, n_micro)
            n = batch_size_of(batch)
            loss_sum += loss.detach().double().cpu() * n
            count += n
            if sync:
                self._optimizer_step()
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
                if fc.max_steps is not None and self.step >= fc.max_steps:
                    break
                every = fc.save_every_steps
                if every is not None and self.step % every == 0 and i + 1 < n_micro:
                    self.save_progress(i + 1, float(loss_sum), count)
        self.batch, self.partial = 0, (0.0, 0)
        distributed.sync_buffers(self.model)
        sums = distributed.all_reduce_sums({"loss": loss_sum, "count": count})
        return sums["loss"] / sums["count"]

    def _micro_step(self, batch: Any, i: int, n_micro: int) -> tuple[torch.Tensor, bool]:
        """Forward and backward of micro-batch ``i``: (its loss, whether it closes an
        accumulation group, i.e. an optimizer step follows). Gradients sync on that one."""
        batch = to_device(batch, self.device)
        accum = self.fc.grad_accum
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
        return loss, sync

    def _optimizer_step(self) -> None:
        if self.fc.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.fc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update()

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

    def state(self, batch: int = 0, partial: tuple[float, int] = (0.0, 0)) -> dict[str, Any]:
        """The training state as saved: at an epoch's end (``batch`` 0) or inside one."""
        return {
            "version": STATE_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batch": batch,
            "partial": {"loss_sum": partial[0], "count": partial[1]},
            "best": {"metric": self.best, "epoch": self.best_epoch, "monitor": self.monitor},
            "history": self.history,
            "rng": distributed.capture_rng_state(),
            "seed": self.fc.seed,
            "world_size": distributed.world_size(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def save_progress(self, batch: int, loss_sum: float, count: int) -> None:
        """A mid-epoch state: ``batch`` micro-batches of the current epoch done."""
        self.run.save_state(self.state(batch, (loss_sum, count)))
        distributed.log_main("saved the training state at step %d", self.step, logger=logger)

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
        self.run.save_state(self.state())
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
        self._restore_schedule(state["scheduler"])
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError(
                    f"{self.run.state_path}: the run was trained without EMA; resume it "
                    f"with ema_decay=None, or use another run_dir"
                )
            self.ema.load_state_dict(state["ema"], source=str(self.run.state_path))
        distributed.restore_rng_state(state["rng"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.batch = int(state.get("batch", 0))  # version-1 states: epoch ends only
        if self.batch:
            partial = state["partial"]
            self.partial = (float(partial["loss_sum"]), int(partial["count"]))
            self.rng = state["rng"]  # again after the epoch's seeding and batch set-up
        self.history = [dict(row) for row in state["history"]]
        self.best, self.best_epoch = state["best"]["metric"], state["best"]["epoch"]
        if state["best"]["monitor"] != self.monitor:  # a best of another metric means nothing
            self.best, self.best_epoch = None, None
        where = f"epoch {self.epoch}" + (f" + {self.batch} batches" if self.batch else "")
        distributed.log_main("resuming %s after %s", self.run.path, where, logger=logger)
        if self.history:  # files written after the state may be an epoch behind: redo them
            self.save_models(self.history[-1], best=self.best_epoch == self.epoch)
            self.run.write_metrics(self.history)

    def _restore_schedule(self, saved: Mapping[str, Any]) -> None:
        sched = dict(saved)
        sched["lr_lambdas"] = [None] * len(self.scheduler.lr_lambdas)  # horizon: this call's
        self.scheduler.load_state_dict(sched)
        lambdas = self.scheduler.lr_lambdas
        for group, base, fn in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, lambdas, strict=True
        ):
            group["lr"] = base * fn(self.scheduler.last_epoch)

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


def run_epochs(
    r: Run,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    on_epoch_end: EpochCallback | None,
) -> FitResult:
    """Train ``r`` to its last epoch (or ``max_steps``, or a stop from ``on_epoch_end``)."""
    fc, rank = r.fc, distributed.rank()
    start, last_plot, plotted = r.epoch, time.monotonic(), len(r.history)
    while r.epoch < fc.epochs and (fc.max_steps is None or r.step < fc.max_steps):
        t0 = time.perf_counter()
        distributed.seed_everything(distributed.epoch_seed(fc.seed, r.epoch, rank))
        train_loader.sampler.set_epoch(r.epoch)  # type: ignore[union-attr]
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
