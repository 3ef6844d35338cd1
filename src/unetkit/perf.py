"""Performance helpers: allocator tuning, peak-memory measurement, FLOP counting.

* **Allocator.** glibc serves blocks above its mmap threshold (dynamic, capped at 32 MiB
  on 64-bit Linux) with ``mmap`` and unmaps them on ``free``. U-Net activations are larger
  than that, so every forward pass maps them afresh and page-faults each page in again,
  which costs 15-35% of an fp32 U-Net pass on CPU. ``tune_allocator`` keeps them on the
  heap (``mallopt(M_MMAP_MAX, 0)``) and stops glibc from trimming it back, at runtime,
  for the current process. The cost: freed memory is reused rather than returned to the OS,
  so the process keeps its peak resident size.
* **Peak memory.** Torch allocates outside Python (``tracemalloc`` cannot see it), so peaks
  are read from the kernel: ``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux); ``ru_maxrss`` otherwise (not resettable).
* **FLOPs** are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

from unetkit.errors import ConfigError

logger = logging.getLogger(__name__)

ALLOCATOR_ENV = "UNETKIT_ALLOCATOR"
ALLOCATOR_MODES = ("tuned", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter numbers from glibc's malloc.h
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the largest trim threshold it accepts


def tune_allocator(mode: str | None = None) -> bool:
    """Keep large tensors on glibc's heap instead of ``mmap``-ing them per allocation.

    Args:
        mode: "tuned" (apply) or "system" (leave glibc alone); None reads the environment
            variable ``UNETKIT_ALLOCATOR`` and defaults to "tuned".

    Returns:
        True if the setting was applied (glibc Linux only; elsewhere a no-op, False).

    Example:
        >>> tune_allocator("system")
        False
    """
    mode = (mode or os.environ.get(ALLOCATOR_ENV) or "tuned").strip().lower()
    if mode not in ALLOCATOR_MODES:
        raise ConfigError(
            f"{ALLOCATOR_ENV}={mode!r} is not one of {ALLOCATOR_MODES}; "
            "use 'tuned' (default) or 'system' (glibc's own settings)"
        )
    if mode == "system" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or no libc: nothing to tune
        return False
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    logger.debug("allocator tuned (mmap disabled, no trimming): %s", ok)
    return ok


# --- peak memory -------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 where unknown)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident set size in bytes since start or the last ``reset_peak_rss``."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return kib * 1024


@contextlib.contextmanager
def peak_memory() -> contextlib.AbstractContextManager[dict[str, int]]:
    """Measure the peak RSS rise over a block: yields a dict filled on exit with
    ``peak_bytes`` (peak RSS - RSS at entry) and ``hwm_bytes`` (absolute peak).

    Example:
        >>> import torch
        >>> with peak_memory() as mem:
        ...     x = torch.ones(1 << 20)
        >>> mem["peak_bytes"] >= 0
        True
    """
    reset_peak_rss()
    start = rss_bytes()
    stats: dict[str, int] = {}
    try:
        yield stats
    finally:
        hwm = peak_rss_bytes()
        stats.update(peak_bytes=max(hwm - start, 0), hwm_bytes=hwm)


# --- FLOPs -------------------------------------------------------------------------------
def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls and convolutions run by ``fn()``, forward
    and backward, as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Example:
        >>> import torch
        >>> count_flops(lambda: torch.ones(4, 8) @ torch.ones(8, 2))
        128
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())
