"""Procedural microscopy-like cell images with instance labels.

Built-in data for tests, demos and the quick-start: clusters of touching, irregular cells
(perturbed ellipses that split the space between them like a weighted Voronoi diagram),
with internal texture, uneven background, blur and Poisson + Gaussian noise. Touching cells
are common on purpose: they are what the U-Net border weight map and instance separation are
for (Ronneberger et al. 2015, fig. 3).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetkit.data.elastic import displacement_field
from unetkit.data.io import write_image
from unetkit.data.weightmaps import instance_borders
from unetkit.errors import ConfigError, did_you_mean

__all__ = ["STYLES", "synth_cells", "write_synthetic_folder"]

STYLES = ("fluorescence", "phase")
_COVERAGE = 0.5  # fraction of the image the cells cover before clipping
_ATTEMPTS = 12  # tries to place a cell next to another before placing it anywhere
_CROSS = ndimage.generate_binary_structure(2, 1)


def synth_cells(
    shape: Sequence[int] = (256, 256),
    *,
    seed: int | Sequence[int],
    n_cells: tuple[int, int] = (15, 40),
    style: str = "fluorescence",
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic cell image and its instance labels.

    Args:
        shape: (H, W) of the image.
        seed: an int or a sequence of ints (e.g. ``(seed, index)``); equal seeds give equal
            outputs.
        n_cells: inclusive range of the number of cells placed (some may be clipped away).
        style: ``"fluorescence"`` (bright cells on a dark background) or ``"phase"``
            (phase contrast: dark cells with bright halos on grey).

    Returns:
        (image, instances): float32 H×W in [0, 1], and int32 H×W labels 0 (background),
        1..N (cells, each one connected region, numbered consecutively).

    Example:
        >>> image, labels = synth_cells((128, 128), seed=0)
        >>> image.shape, labels.dtype
        ((128, 128), dtype('int32'))
    """
    if style not in STYLES:
        raise ConfigError(f"style={style!r}{did_you_mean(style, STYLES)}: use one of {STYLES}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 8:
        raise ConfigError(f"synthetic cells: shape={shape} must be (H, W) with H, W ≥ 8")
    lo, hi = int(n_cells[0]), int(n_cells[1])
    if not 1 <= lo <= hi:
        raise ConfigError(f"n_cells={n_cells}: need 1 ≤ low ≤ high")
    rng = np.random.default_rng(seed)
    cells = _place_cells(shape, int(rng.integers(lo, hi + 1)), rng)
    instances, rho = _rasterise(shape, cells)
    instances = _clean_labels(instances, min_area=_min_area(cells))
    rho = np.where(instances > 0, rho, np.inf)
    render = _render_fluorescence if style == "fluorescence" else _render_phase
    image = render(instances, rho, rng)
    return image.astype(np.float32), instances.astype(np.int32)


class _Cell:
    """A perturbed ellipse: centre, size, shape and the radial wobble of its outline."""

    def __init__(self, centre: np.ndarray, r: float, rng: np.random.Generator) -> None:
        self.centre = centre
        self.r = r
        elong = rng.uniform(1.0, 1.5)
        self.a, self.b = r * math.sqrt(elong), r / math.sqrt(elong)
        self.angle = rng.uniform(0, math.pi)
        self.amps = rng.uniform(0.0, 0.07, size=4)
        self.phases = rng.uniform(0, 2 * math.pi, size=4)

    def extent(self) -> float:
        return self.a * (1.0 + self.amps.sum()) + 1.0

    def rho(self, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        """Normalised radius at offsets (dy, dx) from the centre: < 1 inside the outline."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = (c * dx + s * dy) / self.a, (c * dy - s * dx) / self.b
        q = np.sqrt(u * u + v * v) + 1e-9
        # cos(kθ), sin(kθ) by the angle-addition recurrence: no arctan2/cos on every pixel.
        c1, s1 = u / q, v / q
        ck, sk = c1 * c1 - s1 * s1, 2.0 * c1 * s1  # k = 2
        wobble = 1.0
        for amp, phase in zip(self.amps, self.phases, strict=True):
            wobble = wobble + amp * (ck * math.cos(phase) - sk * math.sin(phase))
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        return q / wobble


def _place_cells(shape: tuple[int, int], n: int, rng: np.random.Generator) -> list[_Cell]:
    """Clustered placement: most cells start next to an earlier one so that they touch."""
    h, w = shape
    r_mean = math.sqrt(_COVERAGE * h * w / (n * math.pi))
    cells: list[_Cell] = []
    centres = np.zeros((n, 2))
    radii = np.zeros(n)
    for i in range(n):
        r = r_mean * rng.uniform(0.75, 1.25)
        centre = None
        if i > 0 and rng.random() < 0.85:
            for _ in range(_ATTEMPTS):
                other = cells[int(rng.integers(len(cells)))]
                angle = rng.uniform(0, 2 * math.pi)
                dist = (r + other.r) * rng.uniform(0.7, 0.95)
                cand = other.centre + dist * np.array([math.sin(angle), math.cos(angle)])
                inside = 0 <= cand[0] < h and 0 <= cand[1] < w
                gaps = np.hypot(*(centres[:i] - cand).T) - 0.65 * (r + radii[:i])
                if inside and gaps.min() > 0:
                    centre = cand
                    break
        if centre is None:
            centre = rng.uniform((0, 0), (h, w))
        cells.append(_Cell(centre, r, rng))
        centres[i], radii[i] = centre, r
    return cells


def _rasterise(shape: tuple[int, int], cells: list[_Cell]) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel goes to the cell with the smallest normalised radius, if that is < 1."""
    best = np.full(shape, np.inf, np.float32)
    labels = np.zeros(shape, np.int32)
    for label, cell in enumerate(cells, start=1):
        ext = cell.extent()
        y0, x0 = (max(int(c - ext), 0) for c in cell.centre)
        y1, x1 = (min(int(c + ext) + 2, n) for c, n in zip(cell.centre, shape, strict=True))
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cell.centre[0])
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cell.centre[1])
        rho = cell.rho(dy, dx)
        win = (rho < 1.0) & (rho < best[y0:y1, x0:x1])
        best[y0:y1, x0:x1][win] = rho[win]
        labels[y0:y1, x0:x1][win] = label
    return labels, best


def _min_area(cells: list[_Cell]) -> int:
    """Cells clipped by the image edge or squeezed by neighbours below this are dropped."""
    r_mean = float(np.mean([c.r for c in cells]))
    return max(8, int(0.1 * math.pi * r_mean**2))


def _clean_labels(labels: np.ndarray, *, min_area: int) -> np.ndarray:
    """Keep each cell's largest connected piece, drop tiny cells, renumber 1..N."""
    out = np.zeros_like(labels)
    next_label = 1
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, count = ndimage.label(labels[box] == label, structure=_CROSS)
        if count > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            keep = pieces == (1 + int(np.argmax(sizes)))
        else:
            keep = pieces == 1
        if keep.sum() >= min_area:
            out[box][keep] = next_label
            next_label += 1
    return out


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise (texture of cells and background)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma, truncate=3.0)
    return field / (field.std() + 1e-12)


def _background(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Uneven illumination: a bicubic surface through a coarse 4×4 grid of random levels."""
    return displacement_field(shape, rng=rng, grid=4, sigma=1.0)[0]


def _cell_signal(instances: np.ndarray, rho: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-cell brightness × dome profile × texture, 0 on background."""
    n = int(instances.max())
    brightness = np.concatenate([[0.0], rng.uniform(0.45, 1.0, size=n)])
    fg = instances > 0
    dome = np.zeros(instances.shape, np.float32)
    dome[fg] = np.sqrt(np.clip(1.0 - rho[fg] ** 2, 0.0, 1.0)) * 0.6 + 0.4
    texture = 1.0 + 0.12 * _smooth_noise(instances.shape, 2.0, rng)
    texture += 0.06 * _smooth_noise(instances.shape, 0.7, rng)
    return brightness[instances] * dome * texture


def _add_noise(
    image: np.ndarray, rng: np.random.Generator, photons: float, std: float
) -> np.ndarray:
    """Shot noise (Gaussian approximation of Poisson, variance = signal / photons) + read noise.

    The approximation is close at the photon counts used here and several times faster than
    drawing Poisson samples.
    """
    sd = np.sqrt(np.clip(image, 0.0, None) / photons + std * std)
    return image + rng.standard_normal(image.shape, dtype=np.float32) * sd


def _render_fluorescence(
    instances: np.ndarray, rho: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    signal = _cell_signal(instances, rho, rng)
    # Touching cells show a dim valley along their shared border, as stained nuclei do.
    valley = ndimage.gaussian_filter(
        instance_borders(instances, touching_only=True).astype(np.float32), 1.0
    )
    signal *= 1.0 - rng.uniform(0.3, 0.6) * np.clip(valley * 2.5, 0.0, 1.0)
    image = 0.08 + 0.04 * _background(instances.shape, rng) + 0.8 * signal
    image = ndimage.gaussian_filter(image, rng.uniform(0.7, 1.4))
    image = _add_noise(image, rng, photons=rng.uniform(60, 250), std=rng.uniform(0.005, 0.02))
    return np.clip(image, 0.0, 1.0)


def _render_phase(instances: np.ndarray, rho: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    fg = (instances > 0).astype(np.float32)
    signal = _cell_signal(instances, rho, rng)
    # Phase contrast: cells darker than the background, a bright halo around their outline
    # and a bright line where two cells meet.
    halo = np.clip(ndimage.gaussian_filter(fg, 2.5) - fg, 0.0, None)
    seams = ndimage.gaussian_filter(
        instance_borders(instances, touching_only=True).astype(np.float32), 0.8
    )
    image = 0.5 + 0.05 * _background(instances.shape, rng)
    image += -0.3 * signal + rng.uniform(0.6, 0.9) * halo + 0.25 * np.clip(seams * 2, 0, 1)
    image = ndimage.gaussian_filter(image, rng.uniform(0.6, 1.2))
    image = _add_noise(image, rng, photons=rng.uniform(300, 800), std=rng.uniform(0.01, 0.025))
    return np.clip(image, 0.0, 1.0)


def write_synthetic_folder(
    folder: str | os.PathLike,
    n: int,
    shape: Sequence[int] = (256, 256),
    seed: int = 0,
    *,
    style: str = "fluorescence",
) -> Path:
    """Write ``n`` synthetic images to ``folder/images`` and their labels to ``folder/masks``.

    Images are 8-bit grey PNGs, masks 16-bit PNG instance label images, both named
    ``cell_000.png``, ``cell_001.png``, ...; image i is ``synth_cells(shape, seed=(seed, i))``,
    the same as ``SyntheticCellsDataset(n, shape=shape, seed=seed)[i]``.

    Returns:
        ``folder``, ready for ``FolderSegmentationDataset(folder, mask_mode="instances")``.

    Example:
        >>> write_synthetic_folder("/tmp/cells", 4, (128, 128), seed=1)   # doctest: +SKIP
    """
    folder = Path(folder)
    width = max(3, len(str(n - 1)))
    for i in range(n):
        image, labels = synth_cells(shape, seed=(seed, i), style=style)
        name = f"cell_{i:0{width}d}.png"
        write_image(folder / "images" / name, np.round(image * 255).astype(np.uint8))
        write_image(folder / "masks" / name, labels.astype(np.uint16))
    return folder
