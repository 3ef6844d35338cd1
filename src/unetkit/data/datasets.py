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

import copy
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from unetkit.data.io import (
    IMAGE_EXTENSIONS,
    list_images,
    load_image,
    read_image,
    to_float_image,
)
from unetkit.data.mask_summary import MaskSummary, MaskTally, components
from unetkit.data.masks import check_mask_options, decode_mask, looks_like_instances
from unetkit.data.synthetic import STYLES, synth_cells
from unetkit.data.transforms import Transform
from unetkit.data.volumes import VOLUME_EXTENSIONS, read_volume, volume_stem
from unetkit.data.weightmaps import border_weight_map, instance_borders, separate_touching
from unetkit.errors import ConfigError, DataError, did_you_mean

__all__ = [
    "TARGETS",
    "FolderSegmentationDataset",
    "SyntheticCellsDataset",
    "boundary_target",
    "split_indices",
]

log = logging.getLogger(__name__)

TARGETS = ("semantic", "separated", "boundary")
_WEIGHT_OPTIONS = ("w0", "sigma", "class_weights")
_MAX_LISTED = 10  # problems listed in one error message
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


class _SegmentationDataset(Dataset):
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


class FolderSegmentationDataset(_SegmentationDataset):
    """Images and masks from two folders, paired by file stem.

    ``root`` holds ``images/`` and ``masks/``; ``images/a.png`` pairs with ``masks/a.png``
    (or ``a.tif``, any supported type). Files are listed and paired when the data set is
    built; their content is checked when a sample is read, or all at once by
    :meth:`validate`.

    Args:
        root: the folder holding ``images/`` and ``masks/``, or an (images_dir, masks_dir) pair.
        num_classes: classes in the mask files (background included), used to decode and
            check them; the returned mask has :attr:`target_classes` classes.
        mask_mode: "auto", "index", "binary" or "instances" (see :func:`decode_mask`).
        target: "semantic", "separated" or "boundary" (see the module docstring).
        transform: augmentation, called as ``transform(sample, rng)``.
        weight_map: None, or options of :func:`border_weight_map` (``w0``, ``sigma``,
            ``class_weights``), e.g. ``{"w0": 10, "sigma": 5}``.
        spatial_dims: 2 for images, 3 for volumes (multi-page ``.tif``/``.tiff`` or NIfTI
            ``.nii``/``.nii.gz``, read with :func:`unetkit.data.volumes.read_volume`).
        seed: seed of the augmentation stream.
        channels: image channels to use, in this order (``--channels 1,0``), read
            axis-aware by :func:`unetkit.data.io.load_image`; None keeps all.

    Example:
        >>> ds = FolderSegmentationDataset("data/cells", mask_mode="instances")  # doctest: +SKIP
        >>> ds.validate(); ds[0]["image"].shape                                  # doctest: +SKIP
        torch.Size([1, 256, 256])
    """

    def __init__(
        self,
        root: str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike],
        *,
        num_classes: int = 2,
        mask_mode: str = "auto",
        target: str = "semantic",
        transform: Transform | None = None,
        weight_map: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        seed: int = 0,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(target=target, transform=transform, weight_map=weight_map, seed=seed)
        check_mask_options(num_classes, mask_mode)
        self.channels = tuple(channels) if channels is not None else None
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims={spatial_dims}: use 2 (images) or 3 (volumes)")
        if isinstance(root, (str, os.PathLike)):
            images_dir, masks_dir = Path(root) / "images", Path(root) / "masks"
            for folder in (images_dir, masks_dir):
                if not folder.is_dir():
                    raise DataError(
                        f"{folder}: folder not found; a data folder holds images/ and masks/ "
                        "(or pass the pair (images_dir, masks_dir))"
                    )
        else:
            images_dir, masks_dir = (Path(p) for p in root)
        self.images_dir, self.masks_dir = images_dir, masks_dir
        self.num_classes = num_classes
        self.mask_mode = mask_mode
        self.spatial_dims = spatial_dims
        self.target_classes = self._target_classes(num_classes)
        extensions = VOLUME_EXTENSIONS if spatial_dims == 3 else IMAGE_EXTENSIONS
        self.pairs = _pair_files(images_dir, masks_dir, extensions)

    def _count(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]:
        image_path, mask_path = self.pairs[index]
        if self.spatial_dims == 3:
            raw_image, raw = read_volume(image_path)[0], read_volume(mask_path)[0]
        else:
            raw_image, raw = read_image(image_path, palette_to_rgb=True), read_image(mask_path)
        if self.channels is not None and self.spatial_dims == 2:
            # axis-aware, as predict reads it (OME/ImageJ channel axes, --channels order)
            image = load_image(image_path, channels=self.channels).image
        else:
            image = to_float_image(raw_image, path=image_path, spatial_dims=self.spatial_dims)
        mode = self.mask_mode
        if mode == "auto" and looks_like_instances(raw, self.num_classes):
            mode = "instances"
        labels = decode_mask(
            raw,
            self.num_classes,
            path=mask_path,
            mode=mode,
            spatial_dims=self.spatial_dims,
        )
        if labels.shape != image.shape[1:]:
            raise DataError(
                f"{image_path} ({fmt_size(image.shape[1:])}) and its mask {mask_path} "
                f"({fmt_size(labels.shape)}) differ in size; a mask must match its image "
                "pixel for pixel"
            )
        name = volume_stem(image_path)
        if mode == "instances":
            return name, image, None, labels
        return name, image, labels, None

    def validate(self) -> MaskSummary:
        """Read every image and mask now; raise one DataError listing every problem found.

        Returns:
            how the masks were read (:class:`MaskSummary`).
        """
        tally = MaskTally()
        validate_all(self, self.images_dir.parent, lambda loaded: tally.add(*loaded[1:]))
        return tally.summary()


def validate_all(dataset: Any, root: Path, visit: Callable[[Any], None] | None = None) -> None:
    """Call ``dataset._load(i)`` for every file (``visit`` sees each result); one DataError
    lists every bad file."""
    problems = []
    for index in range(_files(dataset)):
        try:
            loaded = dataset._load(index)
        except DataError as e:
            problems.append(str(e))
            continue
        if visit is not None:
            visit(loaded)
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
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


def _pair_files(
    images_dir: Path, masks_dir: Path, extensions: Sequence[str]
) -> list[tuple[Path, Path]]:
    images = list_images(images_dir, extensions=extensions)
    masks = list_images(masks_dir, extensions=extensions)
    if not images:
        raise DataError(f"{images_dir}: no images found ({' '.join(extensions)})")
    by_stem: dict[str, Path] = {}  # "a.nii.gz" pairs with "a.tif": stems without extension
    for mask in masks:
        stem = volume_stem(mask)
        if stem in by_stem:
            raise DataError(
                f"{masks_dir}: two masks for one image: {by_stem[stem].name} and "
                f"{mask.name}; keep one"
            )
        by_stem[stem] = mask
    missing = [p for p in images if volume_stem(p) not in by_stem]
    if missing:
        names = ", ".join(str(p) for p in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DataError(
            f"{len(missing)} image(s) without a mask: {names}{more}; expected a mask with "
            f"the same name (any of {' '.join(extensions)}) in {masks_dir}"
        )
    stems = {volume_stem(p) for p in images}
    orphans = [m.name for m in masks if volume_stem(m) not in stems]
    if orphans:
        log.warning(
            "%s: %d mask(s) without an image, ignored: %s", masks_dir, len(orphans), orphans[:5]
        )
    return [(p, by_stem[volume_stem(p)]) for p in images]


class SyntheticCellsDataset(_SegmentationDataset):
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
