"""Segmentation data sets: a folder of images and masks, and synthetic cells.

Both return dict samples of torch tensors:

- ``"image"``: float32 C×H×W (C×D×H×W for volumes), scaled by dtype (uint8 /255, ...);
- ``"mask"``: int64 H×W, the training target (class index per pixel);
- ``"instances"``: int32 H×W instance labels, when the data has them;
- ``"weight"``: float32 H×W, the U-Net border weight map, when ``weight_map`` is given;
- ``"name"``: the sample's name (file stem).

Targets (``target=``) built from instance labels (or, lacking them, from the connected
components of the mask):

- ``"semantic"``: the mask's classes (``instances > 0`` for instance label files);
- ``"separated"``: foreground with a 1-pixel background gap where two instances touch — the
  ground truth the U-Net paper trains on, where the border weight map matters most;
- ``"boundary"``: 3 classes, background 0 / interior 1 / instance boundary 2.

Targets and the weight map are computed on the whole image before augmentation (so cells
beyond a later crop still count, as in the paper's precomputed maps); the transform then
crops and warps them together with the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unetkit.data.folder_dataset import FolderSegmentationDataset
from unetkit.data.segmentation_base import (
    TARGETS,
    SegmentationDatasetBase,
    boundary_target,
    fmt_size,
    validate_all,
)
from unetkit.data.synthetic import STYLES, synth_cells
from unetkit.data.transforms import Transform
from unetkit.errors import ConfigError, did_you_mean

__all__ = [
    "TARGETS",
    "FolderSegmentationDataset",
    "SegmentationDatasetBase",
    "SyntheticCellsDataset",
    "boundary_target",
    "fmt_size",
    "split_indices",
    "validate_all",
]


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random train/validation split of ``range(n)``.

    Args:
        n: number of samples.
        val_fraction: fraction for validation, in [0, 1); at least one sample when > 0
            and n ≥ 2, and always at least one training sample.
        seed: the split is a function of (n, val_fraction, seed) only.

    Returns:
        (train_indices, val_indices): sorted int64 arrays; use with ``torch.utils.data.Subset``.

    Example:
        >>> train, val = split_indices(10, 0.2, seed=0)
        >>> len(train), len(val)
        (8, 2)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: must be in [0, 1)")
    if n < 1:
        raise ConfigError(f"split_indices: n={n} samples, need at least 1")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


class SyntheticCellsDataset(SegmentationDatasetBase):
    """Synthetic microscopy cells generated on the fly (see :func:`synth_cells`).

    Sample i is always the same image (``synth_cells(shape, seed=(seed, i))``), with its
    instance labels, so the data set needs no files and is identical on every machine.

    Args:
        n: number of samples.
        shape: (H, W) of each image.
        seed: seed of the images and of the augmentation stream.
        style: "fluorescence" or "phase".
        n_cells: range of the number of cells per image.
        target: "semantic", "separated" or "boundary".
        transform: augmentation, called as ``transform(sample, rng)``.
        weight_map: None, or options of :func:`border_weight_map`.

    Example:
        >>> ds = SyntheticCellsDataset(8, shape=(64, 64), weight_map={"w0": 10, "sigma": 5})
        >>> sorted(ds[0])
        ['image', 'instances', 'mask', 'name', 'weight']
    """

    def __init__(
        self,
        n: int,
        *,
        shape: Sequence[int] = (256, 256),
        seed: int = 0,
        style: str = "fluorescence",
        n_cells: tuple[int, int] = (15, 40),
        target: str = "semantic",
        transform: Transform | None = None,
        weight_map: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(target=target, transform=transform, weight_map=weight_map, seed=seed)
        if n < 1:
            raise ConfigError(f"SyntheticCellsDataset: n={n} samples, need at least 1")
        self.n = int(n)
        self._images: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.shape = tuple(int(s) for s in shape)
        self.style = style
        self.n_cells = n_cells
        self.num_classes = 2
        self.target_classes = self._target_classes(2)
        if style not in STYLES:
            raise ConfigError(f"style={style!r}{did_you_mean(style, STYLES)}: use one of {STYLES}")

    def _count(self) -> int:
        return self.n

    def _load(self, index: int) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]:
        # generating costs ~70 ms per 256² image, the rest of a sample ~10 ms: keep them
        if index not in self._images:
            image, instances = synth_cells(
                self.shape, seed=(self.seed, index), style=self.style, n_cells=self.n_cells
            )
            self._images[index] = (image[None], instances.astype(np.int64))
        image, instances = self._images[index]
        return f"synthetic_{index:05d}", image.copy(), None, instances.copy()
