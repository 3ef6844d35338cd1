"""What the trainer trains: a ``Task`` turns a batch into a loss and into metric sums.

The trainer knows nothing about segmentation, diffusion or LoRA; a task does. Validation
statistics are *additive sums* so that they can be summed over batches and over DDP ranks
before they are turned into averages (``reduce_sums``): an average of per-batch averages
would weight a short last batch (or an uneven rank) wrongly.

Convention for the sums returned by ``validation_metrics``:
    - ``"count"``: number of samples in the batch (the default denominator);
    - ``"<name>"``: the sum of a per-sample quantity (or any additive numerator);
    - ``"<name>/count"`` (optional): a denominator of its own for ``<name>``, e.g. the number
      of samples in which a class occurs.
The trainer reports ``"val/<name>" = sum(<name>) / sum(<name>/count or count)``.

Example:
    >>> import torch.nn.functional as F
    >>> task = SupervisedTask(
    ...     lambda out, b: F.cross_entropy(out, b["mask"]),
    ...     lambda out, b: {"acc": (out.argmax(1) == b["mask"]).float().mean((1, 2)).sum()},
    ...     monitor="val/acc", mode="max")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.diffusion.objectives import diffusion_loss
from unetkit.errors import ConfigError, DataError

Batch = Any  # whatever the DataLoader yields; dict samples by convention ({"image": ...})
COUNT = "count"
COUNT_SUFFIX = "/count"


@runtime_checkable
class Task(Protocol):
    """The trainer's view of a learning problem.

    Attributes:
        monitor: metric that picks the best checkpoint, e.g. "val/loss" or "val/dice".
        mode: "min" or "max": whether a lower or a higher ``monitor`` is better.
    """

    monitor: str
    mode: str

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar loss of one (micro-)batch, a mean over its samples; differentiable.

        Call ``model(...)`` exactly once: under DDP the gradient sync hooks run in forward.
        """
        ...

    def validation_metrics(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Additive statistics of one batch (see the module docstring for the keys)."""
        ...


def batch_size_of(batch: Batch) -> int:
    """Number of samples in a batch: the length of ``batch["image"]`` or its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        image = batch.get("image")
        items = [image] if isinstance(image, torch.Tensor) else list(batch.values())
    else:
        items = list(batch) if isinstance(batch, (list, tuple)) else []
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim > 0:
            return int(item.shape[0])
    raise DataError(f"cannot tell the batch size of a {type(batch).__name__} batch (no tensor)")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested dict/list/tuple) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def reduce_sums(sums: Mapping[str, float], *, prefix: str = "val/") -> dict[str, float]:
    """Turn summed statistics into averages: ``prefix + name -> sum(name) / denominator``.

    The denominator is ``sums[name + "/count"]`` if present, else ``sums["count"]``. An
    average over a zero count is NaN (e.g. a class absent from the whole validation set).

    Example:
        >>> reduce_sums({"count": 4.0, "loss": 2.0, "dice": 1.5, "dice/count": 2.0})
        {'val/loss': 0.5, 'val/dice': 0.75}
    """
    if COUNT not in sums:
        raise ConfigError(
            f"validation_metrics returned keys {sorted(sums)} without {COUNT!r}; add "
            f"'count': <samples in the batch> so the sums can be averaged"
        )
    out = {}
    for name, total in sums.items():
        if name == COUNT or name.endswith(COUNT_SUFFIX):
            continue
        denom = float(sums.get(name + COUNT_SUFFIX, sums[COUNT]))
        out[prefix + name] = float(total) / denom if denom > 0 else math.nan
    return out


def _image(batch: Batch) -> torch.Tensor:
    if not isinstance(batch, Mapping) or "image" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise DataError(
            f"SupervisedTask expects dict batches with an 'image' tensor; got {keys}. "
            f"Make the dataset return {{'image': ..., <targets>}} samples"
        )
    return batch["image"]


def _number(value: float | torch.Tensor) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class SupervisedTask:
    """Supervised learning ``outputs = model(batch["image"])`` with injected loss and metrics.

    Args:
        loss_fn: ``(outputs, batch) -> scalar tensor``, the mean loss of the batch.
        metric_fn: ``(outputs, batch) -> {name: sum over the batch's samples}`` (floats or
            0-d tensors; optional ``"<name>/count"`` denominators, see ``reduce_sums``).
            None: validation reports the loss only.
        monitor: metric that selects the best checkpoint ("val/loss", "val/<name>").
        mode: "min" or "max".

    ``validation_metrics`` adds ``"loss"`` (the batch loss times its size) and ``"count"``.

    Example:
        >>> task = SupervisedTask(lambda out, b: F.cross_entropy(out, b["mask"]))  # doctest: +SKIP
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Batch], torch.Tensor],
        metric_fn: Callable[[Any, Batch], Mapping[str, float | torch.Tensor]] | None = None,
        *,
        monitor: str = "val/loss",
        mode: str = "min",
    ) -> None:
        check_choice("mode", mode, ("min", "max"))
        self.loss_fn = loss_fn
        self.metric_fn = metric_fn
        self.monitor = monitor
        self.mode = mode

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.loss_fn(model(_image(batch)), batch)

    def validation_metrics(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        outputs = model(_image(batch))
        n = batch_size_of(batch)
        stats = {"loss": _number(self.loss_fn(outputs, batch)) * n, COUNT: float(n)}
        if self.metric_fn is not None:
            for k, v in self.metric_fn(outputs, batch).items():
                if k in stats:
                    raise ConfigError(
                        f"metric_fn returned the reserved key {k!r}; rename it "
                        f"(the task adds 'loss' and 'count' itself)"
                    )
                stats[k] = _number(v)
        return stats

    def __repr__(self) -> str:
        return f"SupervisedTask(monitor={self.monitor!r}, mode={self.mode!r})"


class DiffusionTask:
    """Denoising training of a conditional noise predictor (DDPM objective, ε or v target).

    Batches are dicts with ``"image"`` (B, C, H, W) in [-1, 1] and ``"caption"`` (B strings)
    for text conditioning. Captions become cross-attention context through ``embed``; with
    probability ``cond_dropout`` a sample's context is replaced by ``null_context`` (the
    empty caption), which is what classifier-free guidance needs at sampling time.

    Args:
        schedule: the ``NoiseSchedule`` (prediction type included).
        embed: ``captions -> (B, L, D)`` embeddings (e.g. a ``CaptionEmbeddingCache.get``);
            None for an unconditional model.
        null_context: (1, L, D) embedding of the empty caption.
        cond_dropout: probability of dropping the condition per sample (0.1 in SD practice).
        min_snr_gamma: min-SNR-γ loss weighting (Hang et al. 2023), None = plain MSE.

    Validation reports ``val/loss`` at timesteps and noise drawn from a fixed seed, so the
    numbers of different epochs compare like with like.
    """

    monitor = "val/loss"
    mode = "min"

    def __init__(
        self,
        schedule: Any,
        embed: Callable[[list[str]], torch.Tensor] | None = None,
        null_context: torch.Tensor | None = None,
        *,
        cond_dropout: float = 0.1,
        min_snr_gamma: float | None = None,
    ) -> None:
        if not 0.0 <= cond_dropout < 1.0:
            raise ConfigError(f"cond_dropout={cond_dropout} must be in [0, 1)")
        if embed is not None and cond_dropout > 0 and null_context is None:
            raise ConfigError("cond_dropout > 0 needs null_context (the empty caption)")
        self.schedule = schedule
        self.embed = embed
        self.null_context = null_context
        self.cond_dropout = cond_dropout
        self.min_snr_gamma = min_snr_gamma

    def _context(self, batch: Batch, device: torch.device, drop_some: bool):
        if self.embed is None:
            return None
        if "caption" not in batch:
            raise DataError("text-conditioned diffusion needs 'caption' in each sample")
        ctx = self.embed(list(batch["caption"])).to(device)
        if drop_some and self.cond_dropout > 0:
            drop = torch.rand(ctx.shape[0]) < self.cond_dropout
            null = self.null_context.to(device=device, dtype=ctx.dtype)
            ctx = torch.where(drop.to(device)[:, None, None], null.expand_as(ctx), ctx)
        return ctx

    def _loss(self, model: nn.Module, batch: Batch, gen: torch.Generator | None):
        x0 = _image(batch)
        return diffusion_loss(
            model,
            x0,
            self._context(batch, x0.device, drop_some=gen is None),
            self.schedule,
            generator=gen,
            class_labels=batch.get("class_labels"),
            min_snr_gamma=self.min_snr_gamma,
        )

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self._loss(model, batch, None)

    def validation_metrics(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        n = batch_size_of(batch)
        gen = torch.Generator().manual_seed(1234 + n)  # same t/noise every epoch
        return {"loss": _number(self._loss(model, batch, gen)) * n, COUNT: float(n)}

    def __repr__(self) -> str:
        return f"DiffusionTask(cond_dropout={self.cond_dropout}, schedule={self.schedule!r})"
