"""Images and masks from two folders, paired by file stem (2D images or 3D volumes)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetkit.data.io import IMAGE_EXTENSIONS, list_images, load_image, read_image, to_float_image
from unetkit.data.mask_summary import MaskSummary, MaskTally
from unetkit.data.masks import check_mask_options, decode_mask, looks_like_instances
from unetkit.data.segmentation_base import (
    MAX_LISTED,
    SegmentationDatasetBase,
    fmt_size,
    validate_all,
)
from unetkit.data.transforms import Transform
from unetkit.data.volumes import VOLUME_EXTENSIONS, read_volume, volume_stem
from unetkit.errors import ConfigError, DataError

__all__ = ["FolderSegmentationDataset"]

log = logging.getLogger(__name__)


class FolderSegmentationDataset(SegmentationDatasetBase):
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
        names = ", ".join(str(p) for p in missing[:MAX_LISTED])
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
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
