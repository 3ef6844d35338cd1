"""Dense regression (depth estimation, image restoration): target files, data sets, losses,
metrics. See :mod:`unetkit.regression.losses` for how raw outputs become predictions."""

from __future__ import annotations

from unetkit.regression.datasets import (
    FolderRegressionDataset,
    SyntheticDenoiseDataset,
    SyntheticDepthDataset,
)
from unetkit.regression.io import read_pfm, read_target, validity_mask, write_pfm, write_target
from unetkit.regression.losses import (
    LOSSES,
    OUTPUTS,
    RegressionLoss,
    build_regression_loss,
    l1_loss,
    l2_loss,
    scale_invariant_log_loss,
    to_depth,
    to_prediction,
)
from unetkit.regression.metrics import RegressionMetrics, depth_metrics, psnr

__all__ = [
    "LOSSES",
    "OUTPUTS",
    "FolderRegressionDataset",
    "RegressionLoss",
    "RegressionMetrics",
    "SyntheticDenoiseDataset",
    "SyntheticDepthDataset",
    "build_regression_loss",
    "depth_metrics",
    "l1_loss",
    "l2_loss",
    "psnr",
    "read_pfm",
    "read_target",
    "scale_invariant_log_loss",
    "to_depth",
    "to_prediction",
    "validity_mask",
    "write_pfm",
    "write_target",
]
