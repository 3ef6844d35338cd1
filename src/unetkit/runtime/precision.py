"""Precision and device: the allowed precisions, what each means on a device, autocast.

One source for every precision choice in unetkit (library defaults, CLI ``choices``,
training and inference): ``PRECISIONS`` and ``DEFAULT_PRECISION``.

Example:
    >>> resolve_precision("fp32", torch.device("cpu")) is None
    True
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
# "auto": bf16 where the hardware computes it natively, else fp32 (training and inference)
DEFAULT_PRECISION = "auto"


def cpu_supports_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX), per torch.cpu."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if callable(fn) and fn():
            return True
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype for ``precision`` on ``device`` (None: plain fp32).

    Args:
        precision: one of ``PRECISIONS``. "auto" is bf16 on CUDA devices and CPUs with
            native bf16, else fp32; "bf16" forces it (on a CPU without native bf16 it is
            emulated: it works, but slowly); "fp32" is exact.
        device: where the model runs.
    """
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not ok:
            raise ConfigError(f"precision='bf16' but {device} has no bf16; use 'fp32' or 'auto'")
        return torch.bfloat16 if ok else None
    if device.type == "cpu" and (precision == "bf16" or cpu_supports_bf16()):
        return torch.bfloat16
    if precision == "bf16":
        raise ConfigError(f"precision='bf16' is not supported on {device}; use 'fp32'")
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a null context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: Any) -> torch.device:
    """The device of a model's first parameter or buffer (CPU if it has none); a prepared
    ``Runner`` answers with the device it runs on."""
    device = getattr(model, "runs_on", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, nn.Module):
        for t in itertools.chain(model.parameters(), model.buffers()):
            return t.device
    return torch.device("cpu")


def fast_memory_format(model: nn.Module) -> torch.memory_format | None:
    """channels_last(_3d) for a model with 2-D (3-D) convolutions, else None: oneDNN runs
    bf16 convolutions ~1.5x faster on channels-last data (values are unchanged)."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            return torch.channels_last_3d
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            return torch.channels_last
    return None
