"""Sampling for training: a fixed number of freshly augmented draws per epoch, and a
spatial train/validation split for data sets too small to split by image."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from unetkit.data.segmentation_base import fmt_size
from unetkit.errors import ConfigError, DataError

__all__ = ["RandomDraws", "spatial_split"]


class RandomDraws(Dataset):
    """A fixed number of samples per epoch, each with an augmentation of its own.

    An epoch of ``n`` draws is ``n / batch_size`` optimiser steps whatever the number of
    images (nnU-Net's fixed-iteration epoch), so one annotated image and a thousand train
    for the same budget. Draw ``i`` of epoch ``e`` is item ``i % len(base)`` (every item is
    drawn equally often; the trainer's sampler shuffles the order) augmented with
    ``rng([seed, e, i])``, a generator no other draw of the run shares: repeats of an image
    get different crops, warps, flips and intensities.

    Args:
        base: a data set with ``sample(index, rng)`` (the segmentation data sets); one with
            only ``set_epoch`` (the regression data sets) gets the stream
            ``e * n + i`` as its epoch, which is unique per draw too.
        n: draws per epoch.
        seed: seed of the augmentation streams.
    """

    def __init__(self, base: Dataset, n: int, *, seed: int = 0) -> None:
        if n < 1:
            raise ConfigError(f"RandomDraws: n={n} draws per epoch, need at least 1")
        if len(base) < 1:  # type: ignore[arg-type]
            raise DataError("no training samples to draw from")
        self.base, self.n, self.seed, self.epoch = base, int(n), int(seed), 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s draws (0-based)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(f"draw {i} out of range for {self.n} draws per epoch")
        item = i % len(self.base)  # type: ignore[arg-type]
        sample: Callable[..., Any] | None = getattr(self.base, "sample", None)
        if sample is not None:
            return sample(item, np.random.default_rng([self.seed, self.epoch, i]))
        self.base.set_epoch(self.epoch * self.n + i)  # type: ignore[attr-defined]
        return self.base[item]


def spatial_split(
    shape: Sequence[int], val_fraction: float
) -> tuple[tuple[slice, ...], tuple[slice, ...], int]:
    """Split one image's spatial extent into a training region and a held-out strip.

    The strip is the last ``val_fraction`` of the longest spatial axis (at least 1 pixel,
    and at least 1 pixel left to train on), so one annotated image can train and validate
    without the two regions sharing a pixel.

    Args:
        shape: spatial shape, (H, W) or (D, H, W).
        val_fraction: fraction of the longest axis held out, in (0, 1).

    Returns:
        (train_region, val_region, axis): tuples of slices over the spatial axes, and the
        axis that was cut.

    Example:
        >>> spatial_split((256, 512), 0.2)[1]
        (slice(None, None, None), slice(410, 512, None))
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: a spatial split needs (0, 1)")
    axis = int(np.argmax(shape))
    n = int(shape[axis])
    if n < 2:
        raise DataError(f"an image of {fmt_size(shape)} pixels is too small to split")
    held = min(max(1, math.ceil(n * val_fraction)), n - 1)
    train = [slice(None)] * len(shape)
    val = [slice(None)] * len(shape)
    train[axis], val[axis] = slice(0, n - held), slice(n - held, n)
    return tuple(train), tuple(val), axis
