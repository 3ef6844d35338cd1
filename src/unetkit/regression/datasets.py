"""Dense regression data sets: a folder of images and targets, and built-in synthetic scenes.

Every data set returns dict samples of torch tensors:

- ``"image"``: float32 C×H×W, scaled by dtype (uint8 /255, ...), as for segmentation;
- ``"target"``: float32 K×H×W in the target's unit (metres for depth), 0 where not valid;
- ``"valid"``: bool H×W, False where the target is missing (non-finite, or ≤ 0 for depth;
  see :func:`unetkit.regression.io.validity_mask`) — losses and metrics skip those pixels;
- ``"name"``: the sample's name.

Augmentations from :mod:`unetkit.data.transforms` move ``target`` and ``valid`` together with
the image (flips, rot90, crops, elastic); intensity transforms and ``Normalize`` touch the
image only. That suits depth; for restoration (image → clean image) leave out intensity
jitter and per-image normalisation, which would change the input but not the target.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from unetkit.data.io import list_images, read_image, to_float_image
from unetkit.data.segmentation_base import fmt_size, validate_all
from unetkit.data.transforms import Transform
from unetkit.errors import ConfigError, DataError
from unetkit.regression.io import TARGET_EXTENSIONS, read_target, validity_mask
from unetkit.regression.scenes import luminance, random_scene, render_scene, synth_depth

__all__ = ["FolderRegressionDataset", "SyntheticDenoiseDataset", "SyntheticDepthDataset"]

log = logging.getLogger(__name__)

_MAX_LISTED = 10  # problems listed in one error message


class _RegressionDataset(Dataset):
    """Shared sample pipeline: (image, target) → valid mask → augmentation → tensors."""

    def __init__(self, *, transform: Transform | None, positive: bool, seed: int) -> None:
        self.transform = transform
        self.positive = positive
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream: sample i of epoch e uses rng([seed, i, e])."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        """(name, float32 image C×H×W, float32 target K×H×W with NaN/≤0 where missing)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        name, image, target = self._load(index)
        valid = validity_mask(target, positive=self.positive)
        # zeros, not NaN: a NaN would survive interpolation and masking by multiplication
        target = np.where(valid[None], target, 0.0).astype(np.float32)
        sample: dict[str, Any] = {"image": image, "target": target, "valid": valid, "name": name}
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, index, self.epoch])
            sample = self.transform(sample, rng)
        out = dict(sample)
        for key, dtype in (("image", np.float32), ("target", np.float32), ("valid", bool)):
            # copies: flips and rotations leave negative strides
            out[key] = torch.from_numpy(np.ascontiguousarray(sample[key], dtype=dtype))
        return out


class FolderRegressionDataset(_RegressionDataset):
    """Images and dense targets from two folders, paired by file stem.

    ``root`` holds ``images/`` and ``targets/``; ``images/a.png`` pairs with
    ``targets/a.png`` (or ``a.tif``, ``a.npy``, ``a.pfm``). Files are listed and paired when
    the data set is built; their content is checked when a sample is read, or all at once by
    :meth:`validate`.

    Args:
        root: the folder holding ``images/`` and ``targets/``, or an (images_dir,
            targets_dir) pair.
        transform: augmentation, called as ``transform(sample, rng)``.
        target_scale: multiplies the stored target values, e.g. 1/256 for KITTI depth PNGs,
            1/1000 for millimetre PNGs, 1/255 for 8-bit clean images (see
            :func:`~unetkit.regression.io.read_target`).
        positive: True for depth (values ≤ 0 mark missing pixels); False for signed targets.
        seed: seed of the augmentation stream.

    Example:
        >>> ds = FolderRegressionDataset("data/kitti", target_scale=1 / 256)   # doctest: +SKIP
        >>> ds.validate(); sorted(ds[0])                                        # doctest: +SKIP
        ['image', 'name', 'target', 'valid']
    """

    def __init__(
        self,
        root: str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike],
        *,
        transform: Transform | None = None,
        target_scale: float = 1.0,
        positive: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(transform=transform, positive=positive, seed=seed)
        if not (np.isfinite(target_scale) and target_scale > 0):
            raise ConfigError(f"target_scale={target_scale}: must be a positive number")
        if isinstance(root, (str, os.PathLike)):
            images_dir, targets_dir = Path(root) / "images", Path(root) / "targets"
            for folder in (images_dir, targets_dir):
                if not folder.is_dir():
                    raise DataError(
                        f"{folder}: folder not found; a regression data folder holds images/ "
                        "and targets/ (or pass the pair (images_dir, targets_dir))"
                    )
        else:
            images_dir, targets_dir = (Path(p) for p in root)
            if not targets_dir.is_dir():
                raise DataError(f"{targets_dir}: targets folder not found")
        self.images_dir, self.targets_dir = images_dir, targets_dir
        self.target_scale = float(target_scale)
        self.pairs = _pair_files(images_dir, targets_dir)

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        image_path, target_path = self.pairs[index]
        image = to_float_image(read_image(image_path, palette_to_rgb=True), path=image_path)
        target = read_target(target_path, scale=self.target_scale)
        if target.shape[1:] != image.shape[1:]:
            raise DataError(
                f"{image_path} ({fmt_size(image.shape[1:])}) and its target {target_path} "
                f"({fmt_size(target.shape[1:])}) differ in size; a target must match its "
                "image pixel for pixel"
            )
        return image_path.stem, image, target

    def validate(self) -> None:
        """Read every image and target now; raise one DataError listing every problem."""
        validate_all(self, self.images_dir.parent)


def _list_targets(folder: Path) -> list[Path]:
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TARGET_EXTENSIONS
        ),
        key=lambda p: p.name,
    )


def _pair_files(images_dir: Path, targets_dir: Path) -> list[tuple[Path, Path]]:
    images, targets = list_images(images_dir), _list_targets(targets_dir)
    if not images:
        raise DataError(f"{images_dir}: no images found (.png .tif .tiff .jpg .jpeg)")
    by_stem: dict[str, Path] = {}
    for target in targets:
        if target.stem in by_stem:
            raise DataError(
                f"{targets_dir}: two targets for one image: {by_stem[target.stem].name} and "
                f"{target.name}; keep one"
            )
        by_stem[target.stem] = target
    missing = [p for p in images if p.stem not in by_stem]
    if missing:
        names = ", ".join(str(p) for p in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{len(missing)} image(s) without a target: {names}{more}; expected a target with "
            f"the same name (any of {' '.join(TARGET_EXTENSIONS)}) in {targets_dir}"
        )
    stems = {p.stem for p in images}
    orphans = [t.name for t in targets if t.stem not in stems]
    if orphans:
        log.warning(
            "%s: %d target(s) without an image, ignored: %s", targets_dir, len(orphans), orphans[:5]
        )
    return [(p, by_stem[p.stem]) for p in images]


class SyntheticDepthDataset(_RegressionDataset):
    """Procedurally rendered 3-D scenes with exact depth (see :mod:`unetkit.regression.scenes`).

    Sample i is always the same scene (``synth_depth(shape, seed=(seed, i))``): spheres and
    boxes on a checkered ground, a back wall or sky, Lambertian shading with shadows. Depth
    is in metres (about 1–10), NaN → invalid for the sky and beyond 10 m.

    Args:
        n: number of samples.
        shape: (H, W) of each image.
        seed: seed of the scenes and of the augmentation stream.
        channels: 3 (RGB) or 1 (grey) images.
        transform: augmentation, called as ``transform(sample, rng)``.

    Example:
        >>> ds = SyntheticDepthDataset(4, shape=(64, 64))
        >>> s = ds[0]
        >>> s["image"].shape, s["target"].shape, s["valid"].dtype
        (torch.Size([3, 64, 64]), torch.Size([1, 64, 64]), torch.bool)
    """

    def __init__(
        self,
        n: int,
        *,
        shape: Sequence[int] = (128, 128),
        seed: int = 0,
        channels: int = 3,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform=transform, positive=True, seed=seed)
        if n < 1:
            raise ConfigError(f"SyntheticDepthDataset n={n}: need at least 1 sample")
        if channels not in (1, 3):
            raise ConfigError(f"SyntheticDepthDataset channels={channels}: use 1 or 3")
        self.n, self.shape, self.channels = int(n), tuple(int(s) for s in shape), channels
        if len(self.shape) != 2 or min(self.shape) < 8:
            raise ConfigError(f"SyntheticDepthDataset shape={shape}: need (H, W), H, W ≥ 8")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def _load(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        if index not in self._cache:  # rendering costs more than the rest of a sample
            self._cache[index] = synth_depth(
                self.shape, seed=(self.seed, index), channels=self.channels
            )
        image, depth = self._cache[index]
        return f"scene_{index:05d}", image.copy(), depth[None].copy()


class SyntheticDenoiseDataset(_RegressionDataset):
    """Image restoration demo: a noisy render in, the noise-free render as the target.

    The clean image is a synthetic scene (as :class:`SyntheticDepthDataset`, without sensor
    noise); the input adds Gaussian noise whose standard deviation is drawn per sample from
    ``noise`` (fixed per index, so validation is reproducible). Targets are intensities in
    [0, 1]; every pixel is valid. Train with ``output="linear"`` and an
    ``l1``/``l2`` loss, without intensity jitter or per-image normalisation.

    Args:
        n: number of samples.
        shape: (H, W).
        seed: seed of the scenes, the noise and the augmentation stream.
        channels: 1 (grey) or 3 (RGB).
        noise: range of the noise standard deviation.
        transform: augmentation, called as ``transform(sample, rng)``.

    Example:
        >>> ds = SyntheticDenoiseDataset(2, shape=(32, 32), channels=1)
        >>> ds[0]["image"].shape == ds[0]["target"].shape
        True
    """

    def __init__(
        self,
        n: int,
        *,
        shape: Sequence[int] = (128, 128),
        seed: int = 0,
        channels: int = 1,
        noise: tuple[float, float] = (0.05, 0.2),
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform=transform, positive=False, seed=seed)
        if n < 1:
            raise ConfigError(f"SyntheticDenoiseDataset n={n}: need at least 1 sample")
        if channels not in (1, 3):
            raise ConfigError(f"SyntheticDenoiseDataset channels={channels}: use 1 or 3")
        if not 0 <= noise[0] <= noise[1]:
            raise ConfigError(f"SyntheticDenoiseDataset noise={noise}: need 0 ≤ low ≤ high")
        self.n, self.shape, self.channels = int(n), tuple(int(s) for s in shape), channels
        if len(self.shape) != 2 or min(self.shape) < 8:
            raise ConfigError(f"SyntheticDenoiseDataset shape={shape}: need (H, W), H, W ≥ 8")
        self.noise = (float(noise[0]), float(noise[1]))
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def _load(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        if index not in self._cache:
            rng = np.random.default_rng([self.seed, index])
            clean = np.moveaxis(render_scene(random_scene(self.shape, rng), rng)[0], -1, 0)
            if self.channels == 1:
                clean = luminance(clean)
            std = rng.uniform(*self.noise)
            noisy = clean + rng.normal(0.0, std, size=clean.shape).astype(np.float32)
            self._cache[index] = (noisy.astype(np.float32), clean.astype(np.float32))
        noisy, clean = self._cache[index]
        return f"noisy_{index:05d}", noisy.copy(), clean.copy()
