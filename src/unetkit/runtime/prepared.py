"""``prepared(model, precision)``: the one place a precision becomes a way to run a model.

Every inference path (tiled prediction, the diffusion pipeline, distributed prediction,
the front-ends through them) decides precision here, once, and passes the decision on as
a ``Runner``: engines call the runner and never see the word "precision". What it runs:

* bf16 on a CPU whose oneDNN has bf16 kernels: a frozen copy with prepacked weights
  (``fastpath.frozen_for``, cached per model while its weights stay the same);
* bf16 elsewhere (CUDA, CPUs without prepacking): the model itself under bf16 autocast,
  its 2-D/3-D conv weights in channels-last for the call;
* fp32: the model itself, in eval mode.

The model's train/eval flag and weight layout are restored when the block ends.

Example:
    >>> net = unetkit.create_model("unet", channels=(4, 8))
    >>> with prepared(net, "fp32") as run:
    ...     run(torch.rand(1, 1, 32, 32)).shape
    torch.Size([1, 2, 32, 32])
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from unetkit.runtime import fastpath
from unetkit.runtime.precision import (
    DEFAULT_PRECISION,
    autocast,
    fast_memory_format,
    model_device,
    resolve_precision,
)


@dataclasses.dataclass(frozen=True)
class Runner:
    """A model prepared for inference: call it like the model (``runner(x, *args)``).

    Attributes:
        module: what runs (the frozen copy, or the model itself).
        runs_on: the device inputs must be on.
        input_dtype: the dtype to hand it inputs in (float32 for a frozen copy, which casts
            them itself; the weights' dtype otherwise).
        memory_format: the layout inputs should have (channels-last on the bf16 paths), or
            None for any.
        autocast_dtype: the dtype of the autocast each call runs under (None: none).
    """

    module: nn.Module
    runs_on: torch.device
    input_dtype: torch.dtype
    memory_format: torch.memory_format | None
    autocast_dtype: torch.dtype | None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.runs_on, self.autocast_dtype):
            return self.module(*args, **kwargs)

    @property
    def frozen(self) -> bool:
        """True when the runner is a frozen copy (the CPU bf16 fast path)."""
        return isinstance(self.module, fastpath.FrozenModel)


def _weights_dtype(model: nn.Module) -> torch.dtype:
    param = next(iter(model.parameters()), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


def _has_format(model: nn.Module, fmt: torch.memory_format) -> bool:
    convs = (m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d))
    first = next(convs, None)
    return first is not None and first.weight.is_contiguous(memory_format=fmt)


@contextlib.contextmanager
def prepared(model: nn.Module, precision: str = DEFAULT_PRECISION) -> Iterator[Runner]:
    """The model ready to run inference at ``precision``, for the ``with`` block.

    Args:
        model: any ``nn.Module`` (or a module-like wrapper such as an onnxruntime model,
            which runs as it is).
        precision: one of ``runtime.PRECISIONS`` (default ``DEFAULT_PRECISION``, "auto":
            bf16 where the hardware computes it natively, else fp32).

    Yields:
        A ``Runner``. The block runs under ``torch.inference_mode``.
    """
    device = model_device(model)
    dtype = resolve_precision(precision, device)
    if fastpath.can_freeze(model, dtype):
        frozen = fastpath.frozen_for(model, dtype)
        with torch.inference_mode():
            yield Runner(frozen, device, torch.float32, frozen.memory_format, None)
        return
    is_module = isinstance(model, nn.Module)
    fmt = fast_memory_format(model) if dtype is not None and is_module else None
    convert = fmt is not None and not _has_format(model, fmt)
    was_training = getattr(model, "training", False)
    if is_module:
        model.eval()
    if convert:
        model.to(memory_format=fmt)
    try:
        in_dtype = _weights_dtype(model) if is_module else torch.float32
        with torch.inference_mode():
            yield Runner(model, device, in_dtype, fmt, dtype)
    finally:
        if is_module:
            model.train(was_training)
        if convert:
            model.to(memory_format=torch.contiguous_format)
