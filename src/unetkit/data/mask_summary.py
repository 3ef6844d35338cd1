"""How a folder's masks were read, in numbers a training run states at its start."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

__all__ = ["MaskSummary", "MaskTally", "components", "equivalent_diameter", "object_area"]


def equivalent_diameter(size: np.ndarray, ndim: int) -> np.ndarray:
    """Diameters of the discs (2-D) or balls (3-D) with ``size`` pixels (voxels) each."""
    size = np.asarray(size, np.float64)
    if ndim == 3:
        return (6.0 * size / np.pi) ** (1.0 / 3.0)
    return 2.0 * np.sqrt(size / np.pi)


def object_area(diameter: float, ndim: int) -> float:
    """Pixels (voxels) of the disc (ball) of ``diameter``: the inverse of equivalent_diameter."""
    if ndim == 3:
        return float(np.pi * diameter**3 / 6.0)
    return float(np.pi * diameter**2 / 4.0)


def components(mask: np.ndarray) -> np.ndarray:
    """Instance labels from a class mask: connected components of each foreground class."""
    instances = np.zeros(mask.shape, np.int64)
    offset = 0
    for c in np.unique(mask):
        if c <= 0:
            continue
        labels, count = ndimage.label(mask == c)
        instances[labels > 0] = labels[labels > 0] + offset
        offset += count
    return instances


@dataclasses.dataclass(frozen=True)
class MaskSummary:
    """How a folder's masks were read: stated at the start of a training run.

    Args:
        files: number of masks.
        instance_files: masks read as instance labels (the others as class masks).
        classes: class values found in the class masks (background 0 included).
        objects: objects per image (instances, or connected components of each class).
        empty: masks with no foreground pixel.
        shapes: spatial shape of each image.
        object_diameter: median equivalent diameter (pixels) of all objects, None without
            objects; recorded in the checkpoint as the training scale.
    """

    files: int
    instance_files: int
    classes: tuple[int, ...]
    objects: tuple[int, ...]
    empty: int
    shapes: tuple[tuple[int, ...], ...]
    object_diameter: float | None = None

    def describe(self) -> str:
        """One line, e.g. ``1 mask(s): instance labels; 64.0 objects/image (min 64, max 64)``."""
        if self.instance_files == self.files:
            how = "instance labels"
        elif self.instance_files == 0:
            how = "class masks, classes " + ",".join(str(c) for c in self.classes)
        else:
            how = f"{self.instance_files} instance label files, the rest class masks"
        counts = np.asarray(self.objects)
        text = (
            f"{self.files} mask(s): {how}; {counts.mean():.1f} objects/image "
            f"(min {counts.min()}, max {counts.max()})"
        )
        if self.object_diameter is not None:
            text += f"; median object diameter {self.object_diameter:.1f} px"
        return text + (f"; {self.empty} all-background" if self.empty else "")


class MaskTally:
    """Counts masks one at a time (nothing is kept but numbers), then gives the summary."""

    def __init__(self) -> None:
        self.instance_files, self.empty = 0, 0
        self.classes: set[int] = set()
        self.objects: list[int] = []
        self.shapes: list[tuple[int, ...]] = []
        self.diameters: list[np.ndarray] = []

    def add(self, image: np.ndarray, mask: np.ndarray | None, instances: np.ndarray | None) -> None:
        """One file: its C×... image and its class mask or its instance labels."""
        self.shapes.append(tuple(image.shape[1:]))
        if instances is not None:
            self.instance_files += 1
            objects = instances
            self.objects.append(int(np.count_nonzero(np.unique(instances))))
            self.empty += int(not instances.any())
        else:
            self.classes.update(int(c) for c in np.unique(mask))
            objects = components(mask)
            self.objects.append(int(objects.max(initial=0)))
            self.empty += int(not mask.any())
        sizes = np.bincount(objects.ravel().astype(np.int64))[1:]
        sizes = sizes[sizes > 0]
        self.diameters.append(equivalent_diameter(sizes, objects.ndim))

    def summary(self) -> MaskSummary:
        return MaskSummary(
            files=len(self.shapes),
            instance_files=self.instance_files,
            classes=tuple(sorted(self.classes)),
            objects=tuple(self.objects),
            empty=self.empty,
            shapes=tuple(self.shapes),
            object_diameter=self._median_diameter(),
        )

    def _median_diameter(self) -> float | None:
        every = np.concatenate(self.diameters) if self.diameters else np.zeros(0)
        return round(float(np.median(every)), 2) if every.size else None
