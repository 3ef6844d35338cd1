"""The sample pipeline every segmentation data set shares: targets -> weight map ->
augmentation -> tensors, with a per-data-set cache of decoded whole images.

A data set supplies ``_count()`` (files) and ``_load(i)`` (name, image, class mask or
instance labels); :class:`SegmentationDatasetBase` builds the target the recipe asks for
(see ``unetkit.data.datasets`` for the targets), the border weight map, selects regions,
augments and converts. ``validate_all`` and ``fmt_size`` serve every file-backed data set.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from unetkit.data.mask_summary import components
from unetkit.data.transforms import Transform
from unetkit.data.weightmaps import border_weight_map, instance_borders, separate_touching
from unetkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "TARGETS", "Item", "Region", "SegmentationDatasetBase", "boundary_target", "fmt_size",
    "validate_all",
]  # fmt: skip

TARGETS = ("semantic", "separated", "boundary")
_WEIGHT_OPTIONS = ("w0", "sigma", "class_weights")
MAX_LISTED = 10  # problems listed in one error message
_CACHE_BYTES = 256 * 2**20  # decoded images + targets kept per data set (and per worker)
Region = tuple[slice, ...] | None  # a window of an image's spatial axes; None: all of it
Item = tuple[int, Region]  # (file index, region): one sample of a data set


def boundary_target(instances: np.ndarray) -> np.ndarray:
    """3-class target: 0 background, 1 cell interior, 2 cell boundary.

    Boundary pixels are the instance pixels with a face neighbour of another label (another
    instance or the background): 1 pixel thick at the background, 2 between touching cells.
    The image edge is not a boundary (a cell cut by the edge goes on beyond it).

    Args:
        instances: integer labels, H×W or D×H×W.

    Returns:
        int64 array shaped like ``instances``.

    Example:
        >>> boundary_target(np.array([[0, 1, 1, 1, 2, 2, 0]])).tolist()
        [[0, 2, 1, 2, 2, 2, 0]]
    """
    instances = np.asarray(instances)
    target = (instances > 0).astype(np.int64)
    target[instance_borders(instances)] = 2
    return target


class SegmentationDatasetBase(Dataset):
    """Shared sample pipeline: targets → weight map → augmentation → tensors."""

    def __init__(
        self,
        *,
        target: str,
        transform: Transform | None,
        weight_map: Mapping[str, Any] | None,
        seed: int,
    ) -> None:
        if target not in TARGETS:
            raise ConfigError(f"target={target!r}{did_you_mean(target, TARGETS)}: use {TARGETS}")
        if weight_map is not None:
            for key in weight_map:
                if key not in _WEIGHT_OPTIONS:
                    raise ConfigError(
                        f"weight_map: unknown option {key!r}{did_you_mean(key, _WEIGHT_OPTIONS)}; "
                        f"valid options: {', '.join(_WEIGHT_OPTIONS)}"
                    )
            weight_map = dict(weight_map)
            border_weight_map(np.zeros((2, 2), np.int32), **weight_map)  # bad values fail now
        self.target = target
        self.transform = transform
        self.weight_map = weight_map
        self.seed = seed
        self.epoch = 0
        self.items: list[Item] | None = None  # None: every file, whole
        self.normalize: Transform | None = None
        self._cache: OrderedDict[int, tuple[str, dict[str, Any]]] = OrderedDict()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream: sample i of epoch e uses rng([seed, i, e])."""
        self.epoch = int(epoch)

    def set_normalize(self, normalize: Transform | None) -> None:
        """Normalise each file's whole image once, before regions, crops and augmentation.

        Prediction normalises the whole image, so training crops and held-out regions must
        see the whole image's statistics too: a crop's own percentiles would stretch an
        empty background patch to full range, and absolute intensity augmentation on a
        dim 16-bit image (values ≪ 1 after dtype scaling) would drown the signal.
        """
        self.normalize = normalize
        self._cache = OrderedDict()

    def _count(self) -> int:
        """Number of files (images) behind the data set."""
        raise NotImplementedError

    def _load(self, index: int) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(name, float image C×..., class mask or None, instance labels or None)."""
        raise NotImplementedError

    def _target_classes(self, num_classes: int) -> int:
        return {"semantic": num_classes, "separated": 2, "boundary": 3}[self.target]

    def __len__(self) -> int:
        return self._count() if self.items is None else len(self.items)

    def select(self, items: Sequence[Item], *, transform: Transform | None = None) -> Any:
        """A copy holding only ``items``: (file index, region) pairs, where a region is a
        tuple of slices over the spatial axes (None: the whole image). Targets and weight
        maps are still computed on the whole image, then cut to the region.

        Args:
            items: the samples of the copy, in order.
            transform: the copy's augmentation (default: this data set's).
        """
        out = copy.copy(self)
        out.items = [(int(i), r) for i, r in items]
        out._cache = OrderedDict()
        if transform is not None:
            out.transform = transform
        return out

    def file_index(self, index: int) -> int:
        """The file behind sample ``index``."""
        return index if self.items is None else self.items[index][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, index, self.epoch])
        return self.sample(index, rng)

    def sample(self, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
        """Sample ``index`` augmented with ``rng`` (the transform is skipped without one)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        file_index, region = (index, None) if self.items is None else self.items[index]
        name, arrays = self._prepared(file_index)
        sample: dict[str, Any] = {"name": name}
        for key, value in arrays.items():
            sample[key] = value if region is None else value[(Ellipsis, *region)]
        if self.transform is not None and rng is not None:
            sample = self.transform(sample, rng)
        return _to_tensors(sample)

    def _prepared(self, file_index: int) -> tuple[str, dict[str, Any]]:
        """(name, {"image", targets...}) of a whole file, decoded once and kept (LRU)."""
        if file_index in self._cache:
            self._cache.move_to_end(file_index)
            return self._cache[file_index]
        name, image, classes, instances = self._load(file_index)
        if self.normalize is not None:
            image = self.normalize({"image": image})["image"]
        arrays = {"image": image, **self._targets(classes, instances)}
        for a in arrays.values():
            a.flags.writeable = False  # shared by every draw: transforms must copy
        self._cache[file_index] = (name, arrays)
        while len(self._cache) > 1 and _nbytes(self._cache) > _CACHE_BYTES:
            self._cache.popitem(last=False)
        return name, arrays

    def _targets(self, classes: np.ndarray | None, instances: np.ndarray | None) -> dict:
        out: dict[str, np.ndarray] = {}
        if instances is not None:
            out["instances"] = instances.astype(np.int32)
        objects = instances
        if objects is None and (self.target != "semantic" or self.weight_map is not None):
            objects = components(classes)  # no instance file: separate by connectivity
        if self.target == "semantic":
            mask = classes if classes is not None else (instances > 0).astype(np.int64)
        elif self.target == "separated":
            objects = separate_touching(objects)
            mask = (objects > 0).astype(np.int64)
        else:
            mask = boundary_target(objects)
        out["mask"] = mask
        if self.weight_map is not None:
            out["weight"] = border_weight_map(objects, mask=mask, **self.weight_map)
        return out


def _nbytes(cache: Mapping[int, tuple[str, dict[str, Any]]]) -> int:
    return sum(a.nbytes for _, arrays in cache.values() for a in arrays.values())


def _to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    dtypes = {"image": np.float32, "mask": np.int64, "instances": np.int32, "weight": np.float32}
    out = dict(sample)
    for key, dtype in dtypes.items():
        if key in out:  # copies: flips leave negative strides, cached arrays are shared
            out[key] = torch.from_numpy(np.array(out[key], dtype=dtype, order="C", copy=True))
    return out


def validate_all(dataset: Any, root: Path, visit: Callable[[Any], None] | None = None) -> None:
    """Call ``dataset._load(i)`` for every file (``visit`` sees each result); one DataError
    lists every bad file."""
    problems, channels = [], None
    for index in range(_files(dataset)):
        try:
            loaded = dataset._load(index)
        except DataError as e:
            problems.append(str(e))
            continue
        image = loaded[1] if isinstance(loaded, tuple) and len(loaded) > 1 else None
        if isinstance(image, np.ndarray) and image.ndim >= 3:  # C×H×W: batches need one C
            channels = image.shape[0] if channels is None else channels
            if image.shape[0] != channels:
                problems.append(
                    f"{loaded[0]}: {image.shape[0]} channel(s), the images before it have "
                    f"{channels}; convert it, or pick channels with --channels"
                )
        if visit is not None:
            visit(loaded)
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = len(problems) - MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(
            f"{root}: {len(problems)} of {_files(dataset)} samples are invalid:\n  {listed}{tail}"
        )


def _files(dataset: Any) -> int:
    """Files behind a data set (its length unless it selects regions of them)."""
    count = getattr(dataset, "_count", None)
    return count() if count is not None else len(dataset)


def fmt_size(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)
