"""Segmentation losses by name (``build_loss``), and deep supervision over several heads.

The loss functions themselves (cross-entropy, soft Dice, Dice+CE: shapes, ignore_index, the
empty-mask rule) are :mod:`unetkit.segmentation.loss_functions`; they are importable from
here too.

Example:
    >>> import torch
    >>> loss = build_loss("dice_ce")
    >>> value = loss(torch.randn(2, 3, 16, 16), {"mask": torch.randint(0, 3, (2, 16, 16))})
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from unetkit.errors import ConfigError, DataError, did_you_mean
from unetkit.segmentation.loss_functions import cross_entropy, dice_ce_loss, soft_dice_loss

__all__ = [
    "LOSSES",
    "Loss",
    "build_loss",
    "cross_entropy",
    "deep_supervision_loss",
    "dice_ce_loss",
    "soft_dice_loss",
]


def _resize_nearest(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of an N×*spatial tensor (labels stay labels)."""
    if tuple(t.shape[1:]) == tuple(size):
        return t
    # float32 holds integers exactly up to 2**24: enough for class indices and ignore_index.
    out = F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return out.to(t.dtype)


def _head_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        # Halve the weight per resolution level and normalise (nnU-Net's choice).
        raw = [0.5**i for i in range(n)]
    else:
        raw = [float(w) for w in weights]
        if len(raw) != n:
            raise ConfigError(
                f"deep supervision: {len(raw)} weights for {n} outputs; give one per head"
            )
    total = sum(raw)
    if not total > 0 or any(w < 0 or not math.isfinite(w) for w in raw):
        raise ConfigError(f"deep supervision: weights {raw} must be ≥ 0 with a positive sum")
    return [w / total for w in raw]


def deep_supervision_loss(
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted sum of ``loss_fn`` over several output heads (deep supervision).

    The target is resized by nearest neighbour to each head's spatial size, as in
    U-Net++ (Zhou et al. 2018) and nnU-Net. Weights are normalised to sum to 1; the default
    is 1, 1/2, 1/4, … from the first (full-resolution) head on.

    Args:
        outputs: list of N×C×*spatial logits, full resolution first.
        target: N×*spatial target at full resolution.
        loss_fn: ``(logits, target) -> scalar``, e.g. :func:`dice_ce_loss`.
        weights: one non-negative weight per head.

    Example:
        >>> outs = [torch.randn(1, 2, 16, 16), torch.randn(1, 2, 8, 8)]
        >>> loss = deep_supervision_loss(outs, torch.randint(0, 2, (1, 16, 16)), dice_ce_loss)
    """
    if len(outputs) == 0:
        raise ConfigError("deep_supervision_loss: outputs is empty; pass at least one head")
    ws = _head_weights(weights, len(outputs))
    if target.ndim == outputs[0].ndim and target.shape[1] == 1:
        target = target[:, 0]
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for w, out in zip(ws, outputs, strict=True):
        if w:
            total = total + w * loss_fn(out, _resize_nearest(target, out.shape[2:]))
    return total


# name -> (function, whether it reads batch["weight"])
_LOSSES: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "ce": (cross_entropy, False),
    "dice": (soft_dice_loss, False),
    "dice_ce": (dice_ce_loss, False),
    "weighted_ce": (cross_entropy, True),  # the U-Net paper's loss
}
LOSSES = tuple(_LOSSES)  # the segmentation loss names build_loss takes


class Loss:
    """A configured loss: ``loss(logits, batch) -> scalar``; build it with :func:`build_loss`.

    Reads ``batch["mask"]`` (N×*spatial) and, for ``"weighted_ce"`` only, ``batch["weight"]``
    (N×*spatial pixel weight map). ``logits`` may be a list of heads (deep supervision): the
    mask and weight map are then resized per head (nearest) and the head losses summed with
    ``deep_supervision_weights`` (default 1, 1/2, 1/4, … normalised).

    Attributes:
        name: the loss name. options: its keyword options. needs_weight: whether batches
        must carry a ``"weight"`` map (tells the data pipeline to compute one).
    """

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        deep_supervision_weights: Sequence[float] | None = None,
    ) -> None:
        self.name = name
        self.options = dict(options)
        self.deep_supervision_weights = deep_supervision_weights
        self._fn, self.needs_weight = _LOSSES[name]

    def __repr__(self) -> str:
        return f"Loss({self.name!r}, {self.options})"

    def _one(self, logits: torch.Tensor, mask: torch.Tensor, weight) -> torch.Tensor:
        if self.needs_weight:
            return self._fn(logits, mask, weight=weight, **self.options)
        return self._fn(logits, mask, **self.options)

    def __call__(
        self, logits: torch.Tensor | Sequence[torch.Tensor], batch: Mapping[str, Any]
    ) -> torch.Tensor:
        if "mask" not in batch:
            raise DataError(
                f"loss {self.name!r}: the batch has no 'mask' (keys: {sorted(batch)}); "
                f"segmentation batches must carry the target as batch['mask']"
            )
        mask, weight = batch["mask"], batch.get("weight")
        if self.needs_weight and weight is None:
            raise ConfigError(
                f"loss {self.name!r} needs batch['weight'], the N×*spatial pixel weight map, "
                f"but the batch has only keys {sorted(batch)}; enable weight maps in the data "
                f"pipeline (unetkit.data.weightmaps) or use loss 'ce'"
            )
        if isinstance(logits, torch.Tensor):
            return self._one(logits, mask, weight)
        heads = list(logits)
        if len(heads) == 0:
            raise ConfigError(f"loss {self.name!r}: got an empty list of outputs")
        ws = _head_weights(self.deep_supervision_weights, len(heads))
        if mask.ndim == heads[0].ndim and mask.shape[1] == 1:
            mask = mask[:, 0]
        if weight is not None and weight.ndim == heads[0].ndim and weight.shape[1] == 1:
            weight = weight[:, 0]
        total = heads[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(ws, heads, strict=True):
            if w:
                size = out.shape[2:]
                wmap = None if weight is None else _resize_nearest(weight, size)
                total = total + w * self._one(out, _resize_nearest(mask, size), wmap)
        return total


def build_loss(
    name: str, *, deep_supervision_weights: Sequence[float] | None = None, **options: Any
) -> Loss:
    """Build a :class:`Loss` by name: ``"ce"``, ``"dice"``, ``"dice_ce"`` or ``"weighted_ce"``.

    ``options`` are the keyword options of the matching function (:func:`cross_entropy`,
    :func:`soft_dice_loss`, :func:`dice_ce_loss`; ``"weighted_ce"`` is :func:`cross_entropy`
    with ``weight=batch["weight"]``, the U-Net paper's loss), except ``reduction``: a
    :class:`Loss` always returns a scalar. ``"ce"`` and ``"dice_ce"`` do not read a weight
    map even when the batch has one. ``deep_supervision_weights``: see :class:`Loss`.

    Example:
        >>> loss = build_loss("dice_ce", dice_weight=0.5)
        >>> batch = {"mask": torch.randint(0, 2, (1, 8, 8))}
        >>> value = loss(torch.randn(1, 2, 8, 8), batch)
    """
    if name not in _LOSSES:
        raise ConfigError(
            f"unknown loss {name!r}{did_you_mean(name, _LOSSES)}; choose one of "
            f"{', '.join(_LOSSES)}"
        )
    allowed = [
        p.name
        for p in inspect.signature(_LOSSES[name][0]).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in ("weight", "reduction")
    ]
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"loss {name!r}: unknown option {key!r}{did_you_mean(key, allowed)}; "
                f"valid options: {', '.join(allowed)}"
                + ("; the weight map comes from batch['weight']" if key == "weight" else "")
            )
    return Loss(name, options, deep_supervision_weights)
