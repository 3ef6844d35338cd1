"""Seeded, label-aware augmentations on sample dicts.

A sample is a dict of numpy arrays: ``"image"`` C×H×W (or C×D×H×W) float, and optionally
``"mask"`` (class indices), ``"instances"`` (instance labels) and ``"weight"`` (pixel weights),
each H×W (or D×H×W), and for dense regression ``"target"`` (float K×H×W, channels first) with
``"valid"`` (bool H×W, False where the target is missing); other keys (``"name"``) pass
through. Every geometric transform applies the same operation to all of these
(``SPATIAL_KEYS``), so image and targets stay aligned; labels are never interpolated. Padding
(``RandomCrop``) fills targets with 0 and ``"valid"`` with False, so padded pixels drop out of
the loss. A transform is called as ``transform(sample, rng)`` with a ``np.random.Generator``,
so an augmentation is reproducible from its seed.

Example:
    >>> aug = Compose([RandomCrop(64), RandomFlip(), RandomRot90(), ElasticDeform()])
    >>> sample = {"image": np.zeros((1, 80, 80), np.float32), "mask": np.zeros((80, 80), int)}
    >>> aug(sample, np.random.default_rng(0))["image"].shape
    (1, 64, 64)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from unetkit.data.elastic import displacement_field, elastic_deform, resample
from unetkit.data.intensity import DEFAULT_PERCENTILES, IntensityJitter, Normalize
from unetkit.errors import ConfigError

__all__ = [
    "DEFAULT_PERCENTILES",
    "LABEL_KEYS",
    "REGRESSION_KEYS",
    "SPATIAL_KEYS",
    "Compose",
    "ElasticDeform",
    "IntensityJitter",
    "Normalize",
    "RandomCrop",
    "RandomFlip",
    "CenterCrop",
    "RandomRot90",
    "RandomSpatial",
    "Transform",
]

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]
LABEL_KEYS = ("mask", "instances", "weight")  # spatial arrays without a channel axis
REGRESSION_KEYS = ("target", "valid")  # target K×H×W (channels first), valid H×W bool
SPATIAL_KEYS = ("image", *LABEL_KEYS, *REGRESSION_KEYS)  # what geometric transforms move
# interpolation order per key when resampling: labels nearest, maps linear, image cubic
ORDERS = {"image": 3, "weight": 1, "mask": 0, "instances": 0, "target": 1, "valid": 1}


def _spatial_dims(sample: Sample) -> int:
    return sample["image"].ndim - 1


def _apply_spatial(sample: Sample, op: Callable[[np.ndarray, str], np.ndarray]) -> Sample:
    """Return a copy of ``sample`` with ``op(array, key)`` applied to every spatial array."""
    out = dict(sample)
    for key in SPATIAL_KEYS:
        if key in out:
            out[key] = op(out[key], key)
    return out


def _axis(axis: int, spatial_dims: int) -> int:
    """A spatial axis (0-based over spatial dims, or negative from the end) as a negative
    array axis, valid for both the image (channel first) and the label arrays."""
    if not -spatial_dims <= axis < spatial_dims:
        raise ConfigError(f"axis {axis} out of range for {spatial_dims} spatial dims")
    return axis - spatial_dims if axis >= 0 else axis


class Compose:
    """Apply transforms in order, with one generator.

    Args:
        transforms: callables ``(sample, rng) -> sample``.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for transform in self.transforms:
            sample = transform(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomCrop:
    """Crop a random window; pad first where the sample is smaller than the window.

    Args:
        size: window size; an int for every spatial axis, or a tuple for the last
            ``len(size)`` axes (e.g. (H, W) crops only the plane of a volume).
        label_pad: value for padded ``"mask"`` pixels (0, or the loss's ignore index).
            The image is padded by reflection; instances and weights by 0 (no object, no
            loss).
    """

    def __init__(self, size: int | Sequence[int], *, label_pad: int = 0) -> None:
        self.size = (int(size),) if isinstance(size, int) else tuple(int(s) for s in size)
        if min(self.size) < 1:
            raise ConfigError(f"RandomCrop size={size}: must be ≥ 1")
        self.label_pad = label_pad

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        nd = _spatial_dims(sample)
        spatial = sample["image"].shape[1:]
        sizes = self.size * nd if len(self.size) == 1 else self.size
        if len(sizes) > nd:
            raise ConfigError(f"RandomCrop size={self.size} has more axes than the sample ({nd})")
        sizes = spatial[: nd - len(sizes)] + tuple(sizes)
        pads, starts = [], []
        for n, size in zip(spatial, sizes, strict=True):
            total = max(size - n, 0)
            before = int(rng.integers(0, total + 1))
            pads.append((before, total - before))
            starts.append(int(rng.integers(0, n + total - size + 1)))
        window = tuple(slice(s, s + size) for s, size in zip(starts, sizes, strict=True))

        def crop(a: np.ndarray, key: str) -> np.ndarray:
            if any(p != (0, 0) for p in pads):
                width = [(0, 0)] * (a.ndim - nd) + pads
                if key == "image":
                    a = np.pad(a, width, mode="reflect")
                else:
                    a = np.pad(a, width, constant_values=self.label_pad if key == "mask" else 0)
            return a[(Ellipsis, *window)]

        return _apply_spatial(sample, crop)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, label_pad={self.label_pad})"


class RandomSpatial:
    """Crop, zoom, rotate and elastically deform in one resampling (nnU-Net's spatial
    augmentation, with the U-Net paper's elastic field).

    A crop centre is drawn uniformly where the (unscaled) window fits; with probability
    ``p_affine`` the window is scaled by a log-uniform factor in ``scale`` (> 1 shows more
    of the image, so objects look smaller) and rotated by an angle uniform in
    ±``rotate`` degrees in the last two axes; with probability ``p_elastic`` a displacement
    field (3×3 control grid, ``elastic_sigma`` pixels) is added. Every spatial array is then
    sampled once at the resulting points, mirrored beyond the image edges (labels too, so
    they stay aligned): the image cubically, weights and regression targets linearly, masks
    and instances by nearest neighbour. Only the touched window is read, so a crop of a
    large image costs what a crop of a small one does.

    Args:
        size: output size; an int for every spatial axis or a tuple for the last axes.
        scale: (min, max) zoom factor of the window.
        rotate: maximal rotation in degrees (180: any angle).
        p_affine: probability of zoom and rotation.
        elastic_sigma: displacement standard deviation in pixels (0: no elastic field).
        p_elastic: probability of the elastic field.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        scale: tuple[float, float] = (0.8, 1.25),
        rotate: float = 180.0,
        p_affine: float = 0.5,
        elastic_sigma: float = 10.0,
        p_elastic: float = 0.5,
    ) -> None:
        self.size = (int(size),) if isinstance(size, int) else tuple(int(s) for s in size)
        if min(self.size) < 1 or not 0 < scale[0] <= scale[1]:
            raise ConfigError(
                f"RandomSpatial size={size}, scale={scale}: need size >= 1, 0 < min <= max"
            )
        self.scale, self.rotate = (float(scale[0]), float(scale[1])), float(rotate)
        self.p_affine, self.elastic_sigma, self.p_elastic = p_affine, elastic_sigma, p_elastic

    def coordinates(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """(dims, *size) sampling positions in an image of spatial ``shape``."""
        nd = len(shape)
        sizes = self.size * nd if len(self.size) == 1 else self.size
        sizes = tuple(shape[: nd - len(sizes)]) + tuple(sizes)
        # whole-pixel window starts: without zoom or warp the crop is exact, not resampled
        centre = [
            int(rng.integers(0, n - s + 1)) + (s - 1) / 2 if n > s else (n - 1) / 2
            for n, s in zip(shape, sizes, strict=True)
        ]
        grid = np.indices(sizes, dtype=np.float64)
        grid -= (np.asarray(sizes, np.float64) - 1).reshape((nd,) + (1,) * nd) / 2
        if rng.random() < self.p_affine:
            zoom = float(np.exp(rng.uniform(np.log(self.scale[0]), np.log(self.scale[1]))))
            angle = np.deg2rad(rng.uniform(-self.rotate, self.rotate))
            grid *= zoom
            y, x = grid[-2].copy(), grid[-1].copy()  # rotate in the (H, W) plane
            grid[-2] = np.cos(angle) * y - np.sin(angle) * x
            grid[-1] = np.sin(angle) * y + np.cos(angle) * x
        if self.elastic_sigma > 0 and rng.random() < self.p_elastic:
            grid += displacement_field(sizes, rng=rng, sigma=self.elastic_sigma)
        return grid + np.asarray(centre).reshape((nd,) + (1,) * nd)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        coords = self.coordinates(sample["image"].shape[1:], rng)
        out = _apply_spatial(
            sample,
            lambda a, key: resample(
                a.astype(np.float32) if key == "valid" else a, coords, order=ORDERS[key]
            ),
        )
        if "valid" in out:  # valid only where every pixel interpolated from was valid
            out["valid"] = out["valid"] >= 1.0 - 1e-6
        return out

    def __repr__(self) -> str:
        return (
            f"RandomSpatial({self.size}, scale={self.scale}, rotate={self.rotate}, "
            f"p_affine={self.p_affine}, elastic_sigma={self.elastic_sigma}, "
            f"p_elastic={self.p_elastic})"
        )


class CenterCrop:
    """Deterministic centre crop of every spatial array to ``size_fn(spatial_shape)``.

    ``size_fn`` maps the sample's spatial shape to the wanted one (e.g. the largest input a
    valid-padding model accepts); axes already small enough are left alone.
    """

    def __init__(self, size_fn: Callable[[tuple[int, ...]], Sequence[int]]) -> None:
        self.size_fn = size_fn

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        shape = sample["image"].shape[1:]
        want = [min(w, s) for w, s in zip(self.size_fn(tuple(shape)), shape, strict=True)]
        box = tuple(slice((s - w) // 2, (s - w) // 2 + w) for s, w in zip(shape, want, strict=True))
        return _apply_spatial(sample, lambda a, key: a[(..., *box)])

    def __repr__(self) -> str:
        return f"CenterCrop({self.size_fn!r})"


class RandomFlip:
    """Flip each chosen spatial axis independently with probability ``p``.

    Args:
        axes: spatial axes (0 = first spatial axis; negative from the end); default all.
        p: flip probability per axis.
    """

    def __init__(self, axes: Sequence[int] | None = None, *, p: float = 0.5) -> None:
        self.axes = None if axes is None else tuple(axes)
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        nd = _spatial_dims(sample)
        axes = range(nd) if self.axes is None else self.axes
        flips = tuple(_axis(ax, nd) for ax in axes if rng.random() < self.p)
        if not flips:
            return sample
        return _apply_spatial(sample, lambda a, _: np.flip(a, flips))

    def __repr__(self) -> str:
        return f"RandomFlip(axes={self.axes}, p={self.p})"


class RandomRot90:
    """Rotate by a random multiple of 90° (k uniform in 0..3) in one plane.

    Args:
        axes: the two spatial axes of the plane; default the last two (H, W).
    """

    def __init__(self, axes: tuple[int, int] = (-2, -1)) -> None:
        self.axes = tuple(axes)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        nd = _spatial_dims(sample)
        plane = tuple(_axis(ax, nd) for ax in self.axes)
        k = int(rng.integers(4))
        if k == 0:
            return sample
        return _apply_spatial(sample, lambda a, _: np.rot90(a, k, axes=plane))

    def __repr__(self) -> str:
        return f"RandomRot90(axes={self.axes})"


class ElasticDeform:
    """The U-Net paper's elastic deformation (see :mod:`unetkit.data.elastic`).

    One displacement field warps everything: the image cubically, the weight map linearly
    (stays non-negative), mask and instances by nearest neighbour (no new label values).
    A regression ``"target"`` is warped linearly (cubic splines overshoot at depth edges,
    inventing depths found nowhere in the scene); ``"valid"`` is warped linearly as 0/1 and
    kept only where it stays 1, so a warped target value never mixes in a missing pixel.

    Args:
        grid: control points per axis (paper: 3).
        sigma: displacement standard deviation in pixels (paper: 10).
        p: probability of deforming a sample.
    """

    ORDERS = ORDERS

    def __init__(self, *, grid: int = 3, sigma: float = 10.0, p: float = 1.0) -> None:
        self.grid, self.sigma, self.p = grid, sigma, p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        keys = [k for k in self.ORDERS if k in sample]
        arrays = [sample[k].astype(np.float32) if k == "valid" else sample[k] for k in keys]
        warped = elastic_deform(
            arrays,
            rng=rng,
            grid=self.grid,
            sigma=self.sigma,
            orders=[self.ORDERS[k] for k in keys],
            spatial_dims=_spatial_dims(sample),
        )
        out = {**sample, **dict(zip(keys, warped, strict=True))}
        if "valid" in out:  # valid only where every pixel interpolated from was valid
            out["valid"] = out["valid"] >= 1.0 - 1e-6
        return out

    def __repr__(self) -> str:
        return f"ElasticDeform(grid={self.grid}, sigma={self.sigma}, p={self.p})"
