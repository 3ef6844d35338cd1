"""Optimiser and learning-rate schedule builders.

Two recipes: the U-Net paper's SGD with momentum 0.99 (Ronneberger et al. 2015, sec. 3:
"a high momentum (0.99) such that a large number of the previously seen training samples
determine the update in the current optimization step") and the modern AdamW
(Loshchilov & Hutter 2019) with a (warm-up) cosine schedule (Loshchilov & Hutter 2017).
Schedules are per optimizer step and built on ``LambdaLR``, so their state is plain numbers.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> opt = build_optimizer([w], "sgd", lr=0.01)
    >>> opt.param_groups[0]["momentum"]
    0.99
    >>> sched = build_scheduler(opt, "warmup_cosine", total_steps=100, warmup_steps=10)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from unetkit.config import check_choice
from unetkit.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "warmup_cosine", "poly")
PAPER_MOMENTUM = 0.99  # U-Net paper, section 3
DEFAULT_WEIGHT_DECAY = {"adamw": 0.01, "sgd": 0.0}
WARMUP_FRACTION = 0.05  # warmup_cosine's warm-up when warmup_steps is 0
MAX_WARMUP_FRACTION = 0.25  # decaying schedules warm up over at most this part of the run
logger = logging.getLogger(__name__)


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Weight decay applies to weight matrices and kernels (``ndim >= 2``) only; biases and
    normalisation scales (``ndim <= 1``) are not decayed, as is usual for AdamW.
    Parameters with ``requires_grad=False`` are left out. Empty groups are dropped.
    """
    decay, no_decay = [], []
    for _, p in named_parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    name: str = "adamw",
    *,
    lr: float,
    weight_decay: float | None = None,
    momentum: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """Build an optimiser by short name.

    Args:
        params: parameters or torch-style parameter groups (e.g. from ``parameter_groups``);
            a group's own ``weight_decay`` wins over the argument.
        name: "adamw" or "sgd".
        lr: learning rate (> 0).
        weight_decay: default 0.01 for adamw, 0 for sgd.
        momentum: sgd only; default 0.99, the U-Net paper's value.
        betas: adamw only.
        nesterov: sgd only.

    Example:
        >>> opt = build_optimizer(model.parameters(), "adamw", lr=1e-3)   # doctest: +SKIP
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if not lr > 0:
        raise ConfigError(f"lr={lr} must be > 0")
    wd = DEFAULT_WEIGHT_DECAY[name] if weight_decay is None else float(weight_decay)
    if wd < 0:
        raise ConfigError(f"weight_decay={weight_decay} must be >= 0")
    params = list(params)
    if not params:
        raise ConfigError("the optimizer got no trainable parameters; check `trainable`")
    if name == "sgd":
        m = PAPER_MOMENTUM if momentum is None else float(momentum)
        if not 0.0 <= m < 1.0:
            raise ConfigError(f"momentum={momentum} must be in [0, 1)")
        return torch.optim.SGD(params, lr=lr, momentum=m, weight_decay=wd, nesterov=nesterov)
    if momentum is not None:
        raise ConfigError(
            f"momentum={momentum} applies to optimizer='sgd' only; for 'adamw' use betas "
            f"or drop momentum"
        )
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)


@dataclasses.dataclass
class LRSchedule:
    """The learning-rate factor at optimizer step ``step`` (0-based): ``lr = base_lr * f``.

    Linear warm-up ``f = (step + 1) / warmup_steps`` for ``step < warmup_steps``; then, with
    ``p = (step - warmup_steps) / max(1, total_steps - warmup_steps)`` clipped to [0, 1]:
    constant ``1``; cosine ``m + (1 - m)(1 + cos(pi p)) / 2``; poly ``m + (1 - m)(1 - p)^power``
    (power 0.9 as in nnU-Net), where ``m = min_lr_ratio``.

    A dataclass, not a closure, so ``LambdaLR.state_dict`` stores its fields as numbers.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    power: float = 0.9

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        p = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        m = self.min_lr_ratio
        if self.kind == "poly":
            return m + (1.0 - m) * (1.0 - p) ** self.power
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "cosine",
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    power: float = 0.9,
) -> LambdaLR:
    """A per-optimizer-step schedule (call ``scheduler.step()`` after ``optimizer.step()``).

    Args:
        optimizer: the optimiser whose groups' ``lr`` are the base rates.
        name: constant | cosine | warmup_cosine | poly. Every schedule honours
            ``warmup_steps``; "warmup_cosine" with ``warmup_steps=0`` warms up over 5% of
            ``total_steps`` (at least 1 step). A decaying schedule warms up over at most a
            quarter of ``total_steps`` (longer warm-ups are shortened, with a warning), so a
            short run still decays instead of ending at its peak rate.
        total_steps: optimizer steps of the whole run (the decay horizon).
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
        min_lr_ratio: floor of the decay as a fraction of ``lr``.
        power: exponent of "poly".

    Example:
        >>> s = build_scheduler(opt, "cosine", total_steps=1000)   # doctest: +SKIP
    """
    check_choice("scheduler", name, SCHEDULERS)
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps} must be >= 1")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    kind = name
    if name == "warmup_cosine":
        kind = "cosine"
        if warmup_steps == 0:
            warmup_steps = max(1, round(WARMUP_FRACTION * total_steps))
    longest = math.floor(MAX_WARMUP_FRACTION * total_steps)
    if kind != "constant" and warmup_steps > longest:
        # a warm-up as long as the run never decays: short runs would end at the peak rate
        log = logger.info if name == "warmup_cosine" and longest == 0 else logger.warning
        log(
            "warmup_steps=%d in a run of %d steps: warming up over %d steps so the rate decays",
            warmup_steps,
            total_steps,
            longest,
        )
        warmup_steps = longest
    schedule = LRSchedule(kind, int(total_steps), int(warmup_steps), float(min_lr_ratio), power)
    return LambdaLR(optimizer, schedule)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first parameter group's learning rate (what the next step will use)."""
    return float(optimizer.param_groups[0]["lr"])


def trainable_parameters(model: nn.Module, trainable: Any = None) -> list[tuple[str, nn.Parameter]]:
    """Select the trainable parameters of ``model`` and set ``requires_grad`` to match.

    Args:
        trainable: None (every parameter that already requires grad), a predicate
            ``(name, param) -> bool``, or a sequence of parameter names and/or parameters.
            With a predicate or a sequence, ``requires_grad`` is set on every parameter
            (so DDP sees frozen parameters as frozen).

    Returns:
        ``(name, param)`` pairs of the trainable parameters, in model order.
    """
    named = list(model.named_parameters())
    if trainable is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(trainable):
        chosen = [(n, p) for n, p in named if trainable(n, p)]
    elif isinstance(trainable, (str, bytes)) or not isinstance(trainable, (Sequence, set)):
        raise ConfigError(
            f"trainable={trainable!r} must be None, a predicate (name, param) -> bool, or a "
            f"list of parameter names / parameters"
        )
    else:
        names = {t for t in trainable if isinstance(t, str)}
        ids = {id(t) for t in trainable if isinstance(t, torch.Tensor)}
        unknown = sorted(names - {n for n, _ in named})
        if unknown:
            raise ConfigError(
                f"trainable names {unknown[:5]} are not parameters of "
                f"{type(model).__name__} (e.g. {named[0][0] if named else 'none'!r})"
            )
        chosen = [(n, p) for n, p in named if n in names or id(p) in ids]
    if trainable is not None:
        keep = {id(p) for _, p in chosen}
        for _, p in named:
            p.requires_grad_(id(p) in keep)
    if not chosen:
        raise ConfigError(
            f"no trainable parameters in {type(model).__name__}; check `trainable` "
            f"(or parameters frozen with requires_grad=False)"
        )
    return chosen


def freeze_frozen_norms(model: nn.Module) -> int:
    """Put the norm layers of a partly frozen model's frozen part into eval mode.

    A BatchNorm (or tracking InstanceNorm) updates its running statistics in train mode
    even when its parameters are frozen. When only part of a model trains (LoRA adapters,
    a fine-tuned head), those statistics belong to the frozen base: updating them would
    change the base silently, and an adapter file (which does not hold them) would no
    longer reproduce the trained model. Call after ``model.train()``; returns the number
    of layers kept in eval mode (0 when every parameter trains).
    """
    if all(p.requires_grad for p in model.parameters()):
        return 0
    frozen = 0
    for m in model.modules():
        norm = isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats
        )
        if norm and not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()
            frozen += 1
    return frozen
