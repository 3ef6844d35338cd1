"""Depth and restoration metrics: the standard monocular-depth set, and PSNR.

Definitions (Eigen, Puhrsch & Fergus, NeurIPS 2014, section 4; the KITTI depth benchmark),
over the n valid pixels of an image, prediction p, ground truth t:

- ``abs_rel`` = mean |p − t| / t;  ``sq_rel`` = mean (p − t)² / t;
- ``rmse`` = sqrt(mean (p − t)²);  ``rmse_log`` = sqrt(mean (log p − log t)²);
- ``log10`` = mean |log10 p − log10 t|;
- ``silog`` = 100 · sqrt(mean d² − (mean d)²), d = log p − log t (KITTI's ranking metric);
- ``delta1/2/3`` = fraction of pixels with max(p/t, t/p) < 1.25, 1.25², 1.25³.

Valid pixels: the ``valid`` mask (if given), a finite target with ``min_depth < t``
(and ``t < max_depth`` if given); predictions are clipped to [min_depth, max_depth] as in the
usual evaluation code. Data sets are scored by averaging the per-image values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from unetkit.errors import DataError
from unetkit.regression.losses import _check_output, regression_inputs, to_prediction

__all__ = ["DEPTH_METRICS", "RegressionMetrics", "depth_metrics", "psnr"]

DEPTH_METRICS = (
    "abs_rel",
    "sq_rel",
    "rmse",
    "rmse_log",
    "log10",
    "silog",
    "delta1",
    "delta2",
    "delta3",
)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _valid_pixels(target: np.ndarray, valid: Any) -> np.ndarray:
    ok = np.isfinite(target)
    if valid is not None:
        v = _numpy(valid).astype(bool)
        if v.ndim > target.ndim or v.shape != target.shape[target.ndim - v.ndim :]:
            raise DataError(f"valid mask of shape {v.shape} does not fit target {target.shape}")
        ok &= np.broadcast_to(v, target.shape)
    return ok


def depth_metrics(
    pred: Any,
    target: Any,
    valid: Any = None,
    *,
    min_depth: float = 1e-3,
    max_depth: float | None = None,
) -> dict[str, float]:
    """The standard depth metrics of one image (see the module docstring), in float64.

    Args:
        pred: predicted depth, any shape (H×W, 1×H×W), numpy or torch.
        target: ground truth, same shape; non-finite or ≤ ``min_depth`` = missing.
        valid: optional bool mask, the target's shape or its trailing (spatial) axes.
        min_depth, max_depth: evaluation range (KITTI: 1e-3 and 80 m).

    Returns:
        {name: value} for ``DEPTH_METRICS``; all NaN when no pixel is valid.

    Example:
        >>> t = np.linspace(1, 10, 12).reshape(3, 4)
        >>> m = depth_metrics(1.1 * t, t)
        >>> round(m["abs_rel"], 6), m["delta1"]
        (0.1, 1.0)
    """
    p = _numpy(pred).astype(np.float64)
    t = _numpy(target).astype(np.float64)
    if p.shape != t.shape:
        raise DataError(f"prediction {p.shape} and target {t.shape} differ in shape")
    ok = _valid_pixels(t, valid) & (t > min_depth)
    if max_depth is not None:
        ok &= t < max_depth
    if not ok.any():
        return dict.fromkeys(DEPTH_METRICS, math.nan)
    t = t[ok]
    p = np.clip(np.nan_to_num(p[ok], nan=min_depth), min_depth, max_depth)
    ratio = np.maximum(p / t, t / p)
    d = np.log(p) - np.log(t)
    return {
        "abs_rel": float(np.mean(np.abs(p - t) / t)),
        "sq_rel": float(np.mean((p - t) ** 2 / t)),
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "rmse_log": float(np.sqrt(np.mean(d**2))),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(t)))),
        "silog": float(100.0 * np.sqrt(max(np.mean(d**2) - np.mean(d) ** 2, 0.0))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


def psnr(pred: Any, target: Any, *, data_range: float = 1.0, valid: Any = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range² / MSE)`` in dB, over valid pixels.

    Args:
        pred, target: same shape (C×H×W or H×W), numpy or torch.
        data_range: the signal's peak-to-peak range (1 for images in [0, 1], 255 for 8-bit).
        valid: optional bool mask (target shape or its trailing axes).

    Returns:
        PSNR in dB; inf for identical inputs, NaN when no pixel is valid.

    Example:
        >>> round(psnr(np.full((4, 4), 0.1), np.zeros((4, 4))), 6)   # MSE 0.01
        20.0
    """
    p = _numpy(pred).astype(np.float64)
    t = _numpy(target).astype(np.float64)
    if p.shape != t.shape:
        raise DataError(f"prediction {p.shape} and target {t.shape} differ in shape")
    ok = _valid_pixels(t, valid)
    if not ok.any():
        return math.nan
    mse = float(np.mean((p[ok] - t[ok]) ** 2))
    return math.inf if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


class RegressionMetrics:
    """Validation sums for the trainer: per-image metrics summed over a batch.

    ``output="depth"``: ``abs_rel``, ``rmse``, ``delta1`` (monitor ``val/abs_rel``, min);
    ``output="linear"``: ``mae``, ``rmse``, ``psnr`` (monitor ``val/psnr``, max). Each comes
    with ``<name>/count`` = images with at least one valid pixel, so images without ground
    truth do not dilute the average. Definitions as :func:`depth_metrics` / :func:`psnr`.

    Args:
        output: how raw outputs become predictions (see ``regression.losses.to_prediction``).
        data_range: PSNR peak-to-peak range.
        min_depth, max_depth: depth evaluation range.

    Attributes:
        monitor, mode: the checkpoint-selection metric for ``SupervisedTask``.

    Example:
        >>> m = RegressionMetrics("depth")
        >>> t = torch.full((2, 1, 4, 4), 2.0)
        >>> m(torch.log(1.1 * t), {"target": t})["delta1"]
        2.0
    """

    def __init__(
        self,
        output: str = "depth",
        *,
        data_range: float = 1.0,
        min_depth: float = 1e-3,
        max_depth: float | None = None,
    ) -> None:
        _check_output(output)
        self.output, self.data_range = output, data_range
        self.min_depth, self.max_depth = min_depth, max_depth
        self.monitor, self.mode = (
            ("val/abs_rel", "min") if output == "depth" else ("val/psnr", "max")
        )

    def __call__(self, outputs: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, float]:
        target, valid = regression_inputs(outputs, batch)
        pred = to_prediction(outputs.detach(), self.output).double()
        t = target.double()
        mask = torch.isfinite(t)
        if valid is not None:
            mask &= valid.bool().unsqueeze(1)
        if self.output == "depth":
            mask &= t > self.min_depth
            if self.max_depth is not None:
                mask &= t < self.max_depth
            pred = pred.clamp(self.min_depth, self.max_depth)
        t = torch.where(mask, t, torch.ones_like(t))
        dims = tuple(range(1, t.ndim))
        n = mask.sum(dims).double()
        has = n > 0
        n = n.clamp(min=1)

        def mean(values: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, values, torch.zeros_like(values)).sum(dims) / n

        err = pred - t
        rmse = mean(err**2).sqrt()
        if self.output == "depth":
            ratio = torch.maximum(pred / t, t / pred)
            per = {
                "abs_rel": mean(err.abs() / t),
                "rmse": rmse,
                "delta1": mean((ratio < 1.25).double()),
            }
        else:
            mse = mean(err**2).clamp(min=1e-20)
            per = {
                "mae": mean(err.abs()),
                "rmse": rmse,
                "psnr": 10.0 * torch.log10(self.data_range**2 / mse),
            }
        count = float(has.sum())
        out: dict[str, float] = {}
        for name, values in per.items():
            out[name] = float(torch.where(has, values, torch.zeros_like(values)).sum())
            out[name + "/count"] = count
        return out

    def __repr__(self) -> str:
        return f"RegressionMetrics({self.output!r}, data_range={self.data_range})"
