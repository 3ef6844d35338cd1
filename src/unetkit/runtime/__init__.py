"""How a model runs: precision, device, autocast, and models prepared for inference.

* ``precision``: ``PRECISIONS``, ``DEFAULT_PRECISION``, ``resolve_precision``,
  ``autocast``, ``model_device``: one source for every precision choice.
* ``prepared``: ``prepared(model, precision)`` -> a ``Runner``, used by every inference path.
* ``fastpath`` (with ``kernels`` and ``fused_blocks``): the frozen bf16 copy behind it.
"""

from unetkit.runtime.precision import (
    DEFAULT_PRECISION,
    PRECISIONS,
    autocast,
    cpu_supports_bf16,
    fast_memory_format,
    model_device,
    resolve_precision,
)
from unetkit.runtime.prepared import Runner, prepared

__all__ = [
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "Runner",
    "autocast",
    "cpu_supports_bf16",
    "fast_memory_format",
    "model_device",
    "prepared",
    "resolve_precision",
]
