"""argparse ``type=`` helpers: every numeric flag is range-checked when it is parsed.

A bad value fails before any work with argparse's one line,
``unetkit <cmd>: error: argument --steps: expected an integer >= 1, got 0``.
NaN and infinity are refused by every float flag (they would silently poison the result).

Example:
    >>> p.add_argument("--steps", type=int_at_least(1))          # doctest: +SKIP
    >>> p.add_argument("--overlap", type=finite_float(0, 1, hi_open=True))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# a tile below this gives the network almost no context (and --tile 1 "works" but finds
# one object instead of fifty); 8 still allows small 3D tiles (8³ voxels); predict caps
# large tiles at the image size
MIN_TILE = 8


def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An int parser accepting ``lo <= value`` (and ``<= hi`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
tile_size = int_at_least(MIN_TILE)


def finite_float(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], float]:
    """A float parser refusing NaN/inf and values outside [lo, hi] (open ends on request).

    Args:
        lo, hi: bounds (None: unbounded on that side).
        lo_open, hi_open: exclude the bound itself (e.g. a learning rate > 0).
    """

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            raise argparse.ArgumentTypeError(
                f"expected a number {_span(lo, hi, lo_open, hi_open)}, got {value:g}"
            )
        return value

    parse.__name__ = "float"
    return parse


def _span(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


any_float = finite_float()
positive_float = finite_float(0, lo_open=True)
nonnegative_float = finite_float(0)
fraction = finite_float(0, 1)  # a probability or dropout rate
