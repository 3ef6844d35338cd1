"""Losses for dense regression: L1, L2 and the scale-invariant log loss, all mask-aware.

How a network's raw output becomes a prediction is the ``output`` mapping, decided in one
place (:func:`to_prediction`):

- ``"depth"``: the network predicts **log-depth**; ``to_depth(o) = exp(o)`` (with ``o``
  clamped to ±``LOG_DEPTH_LIMIT`` so exp cannot overflow). Exp rather than softplus because a
  freshly initialised network outputs values near 0, i.e. depths near 1, and the log
  parameterisation makes relative errors, which depth metrics measure, equally easy to learn
  at 1 m and at 10 m (Eigen et al. 2014 predict log-depth too).
- ``"linear"``: the output is the prediction (image restoration, signed targets).

Every loss reads ``batch["target"]`` (B×K×H×W) and, when present, ``batch["valid"]``
(bool B×H×W); pixels that are not valid — or whose target is non-finite, or ≤ 0 for depth —
never reach the loss, so missing lidar points or sky contribute neither value nor gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from unetkit.errors import ConfigError, DataError, did_you_mean
from unetkit.nn.sampling import center_crop

__all__ = [
    "LOG_DEPTH_LIMIT",
    "LOSSES",
    "OUTPUTS",
    "RegressionLoss",
    "build_regression_loss",
    "l1_loss",
    "l2_loss",
    "regression_inputs",
    "scale_invariant_log_loss",
    "to_depth",
    "to_prediction",
]

LOSSES = ("l1", "l2", "silog")
OUTPUTS = ("depth", "linear")
LOG_DEPTH_LIMIT = 20.0  # exp(±20): 2e-9 .. 5e8 target units, well inside float32/bf16 range


def to_depth(outputs: torch.Tensor) -> torch.Tensor:
    """Positive depth from raw network outputs: ``exp(clamp(o, ±LOG_DEPTH_LIMIT))``.

    Args:
        outputs: B×K×H×W (or K×H×W) raw outputs, read as log-depth.

    Returns:
        float32 tensor of the same shape, > 0.

    Example:
        >>> to_depth(torch.zeros(1, 1, 2, 2)).flatten().tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    return torch.exp(outputs.float().clamp(-LOG_DEPTH_LIMIT, LOG_DEPTH_LIMIT))


def to_prediction(outputs: torch.Tensor, output: str = "depth") -> torch.Tensor:
    """Raw network outputs → predictions in target units (``"depth"``: :func:`to_depth`;
    ``"linear"``: as they are, in float32). Pass it as ``activation=`` to the tiling engine
    so overlapping tiles are blended as predictions."""
    _check_output(output)
    return to_depth(outputs) if output == "depth" else outputs.float()


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ConfigError(
            f"regression output={output!r}{did_you_mean(output, OUTPUTS)}: use one of "
            f"{', '.join(OUTPUTS)} ('depth': exp of the output, > 0; 'linear': as is)"
        )


def _mask(valid: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """Valid mask broadcast to the target's B×K×H×W shape, non-finite targets excluded."""
    ok = torch.isfinite(target)
    if valid is not None:
        if valid.shape != target.shape[:1] + target.shape[2:]:
            raise DataError(
                f"valid mask of shape {tuple(valid.shape)} does not match target "
                f"{tuple(target.shape)}; expected B×H×W"
            )
        ok = ok & valid.bool().unsqueeze(1)
    return ok


def l1_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean absolute error over the valid elements of the whole batch.

    Args:
        pred, target: B×K×H×W.
        valid: bool B×H×W (None: every finite target).

    Returns:
        scalar; 0 (with a graph) when no element is valid.

    Example:
        >>> l1_loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item()
        1.0
    """
    return _masked_mean((pred.float() - target.float()).abs(), _mask(valid, target))


def l2_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over the valid elements of the whole batch (shapes as ``l1_loss``).

    Example:
        >>> l2_loss(torch.full((1, 1, 2, 2), 3.0), torch.ones(1, 1, 2, 2)).item()
        4.0
    """
    return _masked_mean((pred.float() - target.float()) ** 2, _mask(valid, target))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where(), not multiplication: a NaN target times 0 would still be NaN
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def scale_invariant_log_loss(
    pred: torch.Tensor | None,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    lam: float = 0.5,
    log_pred: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale-invariant log loss of Eigen, Puhrsch & Fergus (NeurIPS 2014), eq. 4.

    Per image, over its n valid pixels (all channels), with d = log ŷ − log y:
    ``L = (1/n) Σ d² − λ (1/n²) (Σ d)²``; the batch loss is the mean over images that have
    at least one valid pixel. λ = 1 is fully scale invariant, λ = 0 is the plain log-L2; the
    paper trains with λ = 0.5.

    Args:
        pred: B×K×H×W positive predictions (ignored where ``log_pred`` is given).
        target: B×K×H×W; pixels with target ≤ 0 or non-finite are excluded.
        valid: bool B×H×W.
        lam: λ in [0, 1].
        log_pred: log ŷ directly (the raw output of a log-depth network: exact, no exp/log
            round trip).

    Returns:
        scalar.

    Example:
        >>> t = torch.rand(2, 1, 4, 4) + 1
        >>> float(scale_invariant_log_loss(3 * t, t, lam=1.0)) < 1e-6   # a global scale is free
        True
    """
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"silog lam={lam}: must be in [0, 1] (Eigen et al. use 0.5)")
    target = target.float()
    mask = _mask(valid, target) & (target > 0)
    safe = torch.where(mask, target, torch.ones_like(target))  # log(0) never computed
    if log_pred is None and pred is None:
        raise ConfigError("scale_invariant_log_loss: pass pred or log_pred")
    lp = log_pred.float() if log_pred is not None else torch.log(pred.float().clamp(min=1e-12))
    d = torch.where(mask, lp - torch.log(safe), torch.zeros_like(lp))
    dims = tuple(range(1, d.ndim))
    n = mask.sum(dims).float()
    has = n > 0
    n = n.clamp(min=1)
    per_image = (d**2).sum(dims) / n - lam * d.sum(dims) ** 2 / n**2
    return (per_image * has).sum() / has.sum().clamp(min=1)


def regression_inputs(
    outputs: torch.Tensor, batch: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(target, valid) from a batch, centre-cropped to a valid-padding model's smaller output."""
    if "target" not in batch:
        raise DataError(
            f"regression batch without a 'target' tensor (keys: {sorted(batch)}); use a "
            "regression data set (FolderRegressionDataset, SyntheticDepthDataset)"
        )
    target, valid = batch["target"], batch.get("valid")
    size = tuple(outputs.shape[2:])
    if tuple(target.shape[2:]) != size:
        if any(t < s for t, s in zip(target.shape[2:], size, strict=True)):
            raise DataError(
                f"model output {size} is larger than the target {tuple(target.shape[2:])}"
            )
        target = center_crop(target, size)
        valid = None if valid is None else center_crop(valid[:, None], size)[:, 0]
    if outputs.shape[1] != target.shape[1]:
        raise DataError(
            f"model has {outputs.shape[1]} output channel(s) but the target has "
            f"{target.shape[1]}; build the model with out_channels={target.shape[1]}"
        )
    return target, valid


class RegressionLoss:
    """A regression loss on (raw outputs, batch), mask- and valid-padding aware.

    Args:
        name: ``"l1"``, ``"l2"`` or ``"silog"`` (scale-invariant log; needs ``output="depth"``).
        output: ``"depth"`` (outputs are log-depth) or ``"linear"``.
        lam: λ of the silog loss.
    """

    def __init__(self, name: str = "silog", *, output: str = "depth", lam: float = 0.5) -> None:
        if name not in LOSSES:
            raise ConfigError(
                f"regression loss {name!r}{did_you_mean(name, LOSSES)}: use one of "
                f"{', '.join(LOSSES)}"
            )
        _check_output(output)
        if name == "silog" and output != "depth":
            raise ConfigError(
                "loss 'silog' compares logarithms and needs positive predictions: use "
                "output='depth' (or loss 'l1'/'l2' for signed targets)"
            )
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"silog lam={lam}: must be in [0, 1] (Eigen et al. use 0.5)")
        self.name, self.output, self.lam = name, output, lam

    def __call__(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        target, valid = regression_inputs(outputs, batch)
        if self.output == "depth":  # depth ≤ 0 means "not measured"
            positive = target > 0
            valid = positive.all(1) if valid is None else valid & positive.all(1)
        if self.name == "silog":
            log_pred = outputs.float().clamp(-LOG_DEPTH_LIMIT, LOG_DEPTH_LIMIT)
            return scale_invariant_log_loss(None, target, valid, lam=self.lam, log_pred=log_pred)
        fn = l1_loss if self.name == "l1" else l2_loss
        return fn(to_prediction(outputs, self.output), target, valid)

    def __repr__(self) -> str:
        return f"RegressionLoss({self.name!r}, output={self.output!r}, lam={self.lam})"


def build_regression_loss(
    name: str, *, output: str = "depth", lam: float = 0.5
) -> Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]:
    """The loss ``(outputs, batch) -> scalar`` named ``name`` (l1 | l2 | silog).

    Example:
        >>> loss = build_regression_loss("silog")
        >>> batch = {"target": torch.full((1, 1, 4, 4), 2.0)}
        >>> round(float(loss(torch.zeros(1, 1, 4, 4), batch)), 4)  # d = -log 2 everywhere
        0.2402
    """
    return RegressionLoss(name, output=output, lam=lam)
