"""Shared behaviour of segmentation models: input checks and the size planner.

A model declares how one spatial axis changes (``_output_length``); this base turns that
into ``output_size_for``, ``nearest_valid_input`` and ``input_size_for`` and into errors
that name the nearest valid sizes (DESIGN.md principle 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from unetkit.config import check_choice
from unetkit.errors import ConfigError, InputSizeError
from unetkit.nn.dims import check_dims

_SEARCH = 4096  # how far the planner looks for a valid size on either side


def check_conv_config(config: object) -> None:
    """Checks shared by the conv U-Net configs (dims, init, channels, dropout)."""
    check_dims(config.dims)
    check_choice("init", config.init, ("he", "default"))
    if len(config.channels) < 2 or any(c <= 0 for c in config.channels):
        raise ConfigError(f"channels={config.channels} needs at least two positive widths")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"dropout={config.dropout} must be in [0, 1)")


class SegmentationModel(nn.Module):
    """Base of every dense-prediction model: ``forward(x) -> logits`` of ``out_channels``."""

    config: object
    in_channels: int
    out_channels: int
    dims: int

    # --- size planner -------------------------------------------------------------------
    def _output_length(self, n: int) -> int | None:
        """Output length along one axis for input length ``n``; None if ``n`` is invalid."""
        return n  # same-padding models: any size, same size out

    @property
    def is_valid_padding(self) -> bool:
        return self._output_length(1024) != 1024

    def output_size_for(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for a spatial ``input_size``; InputSizeError naming valid sizes."""
        out = []
        for n in input_size:
            m = self._output_length(int(n))
            if m is None or m <= 0:
                lo, hi = self._nearest_valid_lengths(int(n))
                raise InputSizeError(
                    f"input size {tuple(input_size)} does not fit {type(self).__name__} "
                    f"(valid padding): axis length {n} is invalid; nearest valid lengths are "
                    f"{lo} and {hi} (see model.input_size_for(output) to plan sizes)"
                )
            out.append(m)
        return tuple(out)

    def _nearest_valid_lengths(self, n: int) -> tuple[int | None, int | None]:
        lo = next((m for m in range(n, 0, -1) if (self._output_length(m) or 0) > 0), None)
        hi = next((m for m in range(n, n + _SEARCH) if (self._output_length(m) or 0) > 0), None)
        return lo, hi

    def nearest_valid_input(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """The nearest valid input size per axis (ties go up)."""
        result = []
        for n in input_size:
            lo, hi = self._nearest_valid_lengths(int(n))
            result.append(hi if lo is None or (hi is not None and hi - n <= n - lo) else lo)
        return tuple(result)

    def input_size_for(self, output_size: Sequence[int]) -> tuple[int, ...]:
        """The smallest valid input size whose output is at least ``output_size``."""
        result = []
        for want in output_size:
            n = next(
                (m for m in range(1, int(want) + _SEARCH) if (self._output_length(m) or 0) >= want),
                None,
            )
            if n is None:
                raise InputSizeError(f"no valid input gives an output of length {want}")
            result.append(n)
        return tuple(result)

    def margin(self) -> tuple[int, ...]:
        """Context lost per side and axis, (input - output) / 2; 0 for same padding."""
        n = self.input_size_for([64])[0]
        return ((n - self._output_length(n)) // 2,) * self.dims

    # --- checks and outputs -------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise InputSizeError early (before compute) for a wrong rank, channels or size."""
        if x.dim() != self.dims + 2:
            raise InputSizeError(
                f"{type(self).__name__} (dims={self.dims}) expects a tensor N×C×"
                f"{'×'.join('DHW'[-self.dims :])}, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise InputSizeError(
                f"{type(self).__name__} expects {self.in_channels} input channel(s), got "
                f"{x.shape[1]} (shape {tuple(x.shape)})"
            )
        self.output_size_for(x.shape[2:])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or sigmoid for a single output channel."""
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
