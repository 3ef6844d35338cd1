"""Intensity transforms on sample dicts: per-image normalisation and random jitter.

They change ``sample["image"]`` only (labels and targets pass through untouched), with the
``transform(sample, rng)`` call of :mod:`unetkit.data.transforms`, which re-exports them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unetkit.errors import ConfigError, did_you_mean

__all__ = ["DEFAULT_PERCENTILES", "IntensityJitter", "Normalize"]

DEFAULT_PERCENTILES = (1.0, 99.0)


class IntensityJitter:
    """Random gamma, gain, bias and Gaussian noise on the image only.

    The gamma curve is applied to the image rescaled to its own [min, max] and mapped back,
    so it works on images that are not in [0, 1] (e.g. after z-scoring).

    Args:
        gain: range of the multiplicative factor.
        bias: range of the additive offset.
        gamma: range of the gamma exponent (sampled log-uniformly).
        noise_std: the noise standard deviation is drawn uniformly from [0, noise_std].
    """

    def __init__(
        self,
        *,
        gain: tuple[float, float] = (0.9, 1.1),
        bias: tuple[float, float] = (-0.05, 0.05),
        gamma: tuple[float, float] = (0.8, 1.25),
        noise_std: float = 0.02,
    ) -> None:
        if gamma[0] <= 0 or noise_std < 0:
            raise ConfigError(f"IntensityJitter: need gamma > 0, noise_std ≥ 0; got {gamma}")
        self.gain, self.bias, self.gamma, self.noise_std = gain, bias, gamma, noise_std

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = sample["image"].astype(np.float32)
        gamma = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))
        gain, bias = rng.uniform(*self.gain), rng.uniform(*self.bias)
        lo, hi = float(image.min()), float(image.max())
        if hi > lo:
            image = lo + (hi - lo) * ((image - lo) / (hi - lo)) ** gamma
        image = image * gain + bias
        std = rng.uniform(0.0, self.noise_std)
        if std > 0:
            image = image + rng.normal(0.0, std, size=image.shape)
        return {**sample, "image": image.astype(np.float32)}

    def __repr__(self) -> str:
        return (
            f"IntensityJitter(gain={self.gain}, bias={self.bias}, gamma={self.gamma}, "
            f"noise_std={self.noise_std})"
        )


class Normalize:
    """Per-image, per-channel intensity normalisation (deterministic).

    Args:
        mode: ``"zscore"`` (zero mean, unit std) or ``"percentile"`` (the ``percentiles``
            map to 0 and 1), robust for 12/16-bit microscopy images.
        percentiles: (low, high) percentiles of ``"percentile"``; (1, 99) by default, as
            checkpoints without recorded percentiles were trained; CSBDeep/StarDist use
            (1, 99.8), which keeps bright nuclei apart from their dimmer neighbours.
    """

    MODES = ("zscore", "percentile")

    def __init__(
        self, mode: str = "zscore", *, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    ) -> None:
        if mode not in self.MODES:
            raise ConfigError(
                f"Normalize mode={mode!r}{did_you_mean(mode, self.MODES)}: use {self.MODES}"
            )
        low, high = (float(v) for v in percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise ConfigError(
                f"--norm-percentiles {low:g} {high:g} (norm_percentiles): need "
                "0 <= low < high <= 100"
            )
        self.mode = mode
        self.percentiles = (low, high)

    def __call__(
        self, sample: dict[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        image = sample["image"].astype(np.float32)
        flat = image.reshape(image.shape[0], -1)
        if self.mode == "zscore":
            centre, scale = flat.mean(axis=1), flat.std(axis=1)
        else:
            low, high = np.percentile(flat, list(self.percentiles), axis=1)
            centre, scale = low, high - low
        shape = (-1,) + (1,) * (image.ndim - 1)
        scale = np.maximum(scale, 1e-6).reshape(shape)  # flat channels: no division by 0
        return {**sample, "image": ((image - centre.reshape(shape)) / scale).astype(np.float32)}

    def __repr__(self) -> str:
        return f"Normalize({self.mode!r}, percentiles={self.percentiles})"
