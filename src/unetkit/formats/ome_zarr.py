"""OME-Zarr (OME-NGFF) images in and label pyramids out, lazily.

* :func:`open_ngff` opens an NGFF image group (spec 0.4 on Zarr v2, 0.5 on Zarr v3) without
  reading pixels: its axes, the arrays of every resolution level and their physical scale.
  :meth:`NGFFImage.window` reads one Y×X window of one level as ``Y×X×C`` (the layout
  ``data.io.to_float_image`` takes), so an image of any size is read a block at a time.
* :func:`create_prediction` lays out a prediction store (NGFF 0.5, Zarr v3) whose level-0
  arrays are filled block by block: the class mask as the root image, instance labels
  (uint32) under ``labels/instances`` and, optionally, class probabilities under
  ``probabilities``; every one a multiscale pyramid with the input's axes and physical
  scale. :func:`downsample_chunk` fills a chunk of a coarser level from the finer one (nearest
  neighbour, as labels need) once the blocks are written.

Needs the ``zarr`` extra (zarr >= 3); imported only by the code that reads or writes Zarr.

Example:
    >>> img = open_ngff("cells.ome.zarr")  # doctest: +SKIP
    >>> img.shape, img.scale(0)  # doctest: +SKIP
    ((16384, 16384), (0.325, 0.325))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetkit.errors import DataError

NGFF_VERSION = "0.5"
SPATIAL = ("y", "x")
#: µm per NGFF length unit (the UDUNITS-2 names the spec lists, from angstrom to metre)
LENGTH_UNITS_UM = {
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}
_LEVEL_PREFIX = ""  # datasets are named "0", "1", ... as ome-zarr-py writes them


def _zarr():
    try:
        import zarr
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise DataError("OME-Zarr needs the zarr extra: pip install 'unetkit[zarr]'") from e
    return zarr


@dataclasses.dataclass
class NGFFImage:
    """An opened NGFF image: metadata plus lazy arrays (nothing read yet).

    Attributes:
        path: the image group.
        axes: NGFF axis dicts (``name``, ``type``, ``unit``) in array order.
        arrays: one Zarr array per resolution level, finest first.
        scales: per level, the ``scale`` coordinate transformation (one value per axis).
        translations: per level, the ``translation`` (zeros where there is none).
    """

    path: Path
    axes: list[dict[str, Any]]
    arrays: list[Any]
    scales: list[list[float]]
    translations: list[list[float]] = dataclasses.field(default_factory=list)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a["name"] for a in self.axes)

    @property
    def channels(self) -> int:
        names = self.axis_names
        return int(self.arrays[0].shape[names.index("c")]) if "c" in names else 1

    def level_shape(self, level: int = 0) -> tuple[int, int]:
        """(Y, X) of a resolution level."""
        arr = self.arrays[self._level(level)]
        names = self.axis_names
        return int(arr.shape[names.index("y")]), int(arr.shape[names.index("x")])

    @property
    def shape(self) -> tuple[int, int]:
        return self.level_shape(0)

    def scale(self, level: int = 0) -> tuple[float, float]:
        """Physical (Y, X) pixel size at a level, in the axes' units."""
        s = self.scales[self._level(level)]
        names = self.axis_names
        return float(s[names.index("y")]), float(s[names.index("x")])

    def translation(self, level: int = 0) -> tuple[float, float]:
        """Physical (Y, X) offset of a level's first pixel (0, 0 without a translation)."""
        if not self.translations:
            return 0.0, 0.0
        t = self.translations[self._level(level)]
        names = self.axis_names
        return float(t[names.index("y")]), float(t[names.index("x")])

    def units(self) -> dict[str, str]:
        return {a["name"]: a["unit"] for a in self.axes if a.get("unit")}

    def pixel_size_um(self, level: int = 0) -> tuple[float, float] | None:
        """(Y, X) pixel size in µm at a level, or None when y and x have no length unit
        (NGFF units are optional: a bare scale says nothing about micrometres)."""
        units = self.units()
        factors = [LENGTH_UNITS_UM.get(units.get(axis, "")) for axis in SPATIAL]
        if None in factors:
            return None
        return tuple(s * f for s, f in zip(self.scale(level), factors, strict=True))

    def window(self, ys: slice, xs: slice, level: int = 0) -> np.ndarray:
        """Pixels ``[ys, xs]`` of a level as ``Y×X×C`` (first time point and plane)."""
        arr = self.arrays[self._level(level)]
        index = []
        for name in self.axis_names:
            index.append({"y": ys, "x": xs, "c": slice(None)}.get(name, 0))
        block = np.asarray(arr[tuple(index)])
        kept = [n for n in self.axis_names if n in ("c", "y", "x")]
        order = [kept.index("y"), kept.index("x")] + ([kept.index("c")] if "c" in kept else [])
        block = np.transpose(block, order)
        return block if block.ndim == 3 else block[..., None]

    def _level(self, level: int) -> int:
        if not 0 <= level < len(self.arrays):
            raise DataError(
                f"{self.path}: resolution level {level} does not exist; "
                f"the image has levels 0..{len(self.arrays) - 1}"
            )
        return level


def is_zarr(path: str | os.PathLike) -> bool:
    """True for a Zarr group folder (v2 ``.zgroup``/``.zattrs`` or v3 ``zarr.json``)."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in ("zarr.json", ".zgroup", ".zattrs"))


def _ngff_attrs(group: Any) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))  # 0.5 nests under "ome"; 0.4 does not


def open_ngff(path: str | os.PathLike) -> NGFFImage:
    """Open an OME-Zarr image group lazily (NGFF 0.4 or 0.5), first multiscale.

    Args:
        path: the image group (e.g. ``cells.ome.zarr`` or ``plate.zarr/A/1/0``).

    Returns:
        an :class:`NGFFImage`; pixels are read only by :meth:`NGFFImage.window`.

    Raises:
        DataError: not a Zarr group, no ``multiscales`` metadata, or axes without y and x.
    """
    zarr = _zarr()
    p = Path(path)
    if not is_zarr(p):
        raise DataError(f"{p}: not a Zarr folder (no zarr.json, .zgroup or .zattrs)")
    try:
        group = zarr.open_group(str(p), mode="r")
    except Exception as e:  # zarr raises several types for a broken store
        raise DataError(f"{p}: cannot open as a Zarr group ({e})") from e
    meta = _ngff_attrs(group)
    multiscales = meta.get("multiscales")
    if not multiscales:
        raise DataError(
            f"{p}: Zarr group has no OME-NGFF 'multiscales' metadata; write it as OME-Zarr "
            "(e.g. ome_zarr.writer.write_image) or pass the image group inside it"
        )
    ms = multiscales[0]
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    if not axes:  # NGFF 0.3 and older: fixed order
        axes = [{"name": n} for n in "tczyx"[-len(group[ms["datasets"][0]["path"]].shape) :]]
    names = [a["name"] for a in axes]
    if "y" not in names or "x" not in names:
        raise DataError(f"{p}: NGFF axes {names} have no 'y' and 'x'")
    arrays, scales, translations = [], [], []
    for ds in ms["datasets"]:
        arrays.append(group[ds["path"]])
        scale, shift = [1.0] * len(axes), [0.0] * len(axes)
        for t in ds.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = [float(v) for v in t["scale"]]
            elif t.get("type") == "translation":
                shift = [float(v) for v in t["translation"]]
        scales.append(scale)
        translations.append(shift)
    return NGFFImage(p, axes, arrays, scales, translations)


# --- writing -----------------------------------------------------------------------------
def _axes(units: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for name in SPATIAL:
        axis: dict[str, Any] = {"name": name, "type": "space"}
        if units.get(name):
            axis["unit"] = units[name]
        out.append(axis)
    return out


def _multiscale(
    name: str,
    axes: list[dict[str, Any]],
    scale: Sequence[float],
    translation: Sequence[float],
    levels: int,
    channel: bool,
) -> dict[str, Any]:
    if channel:
        axes = [{"name": "c", "type": "channel"}, *axes]
    datasets = []
    for level in range(levels):
        s = [float(v) * 2**level for v in scale]
        transforms: list[dict[str, Any]] = [
            {"type": "scale", "scale": ([1.0] if channel else []) + s}
        ]
        # levels keep every 2**level-th pixel of level 0 (no averaging): pixel i of a level
        # is pixel i * 2**level of level 0, so every level has level 0's offset
        if any(translation):
            t = [float(v) for v in translation]
            transforms.append(
                {"type": "translation", "translation": ([0.0] if channel else []) + t}
            )
        datasets.append(
            {"path": f"{_LEVEL_PREFIX}{level}", "coordinateTransformations": transforms}
        )
    return {"name": name, "axes": axes, "datasets": datasets}


def pyramid_levels(shape: Sequence[int], chunk: int, max_levels: int = 8) -> int:
    """Levels halving Y and X until the image fits one chunk (at least 1)."""
    levels, size = 1, max(shape)
    while size > chunk and levels < max_levels:
        size = (size + 1) // 2
        levels += 1
    return levels


def create_prediction(
    path: str | os.PathLike,
    shape: tuple[int, int],
    *,
    chunk: int,
    scale: Sequence[float] = (1.0, 1.0),
    translation: Sequence[float] = (0.0, 0.0),
    units: dict[str, str] | None = None,
    num_classes: int = 2,
    probabilities: bool = False,
) -> dict[str, list[Any]]:
    """Create (or reopen) an NGFF 0.5 prediction store with empty pyramids.

    Layout: root image = class mask (uint8, ``y, x``); ``labels/instances`` = instance
    labels (uint32, with ``image-label`` metadata); ``probabilities`` = ``c, y, x`` float32
    (only with ``probabilities``). Every array is chunked ``chunk``² in Y, X (at most the
    level's own extent).

    Args:
        path: the output ``.zarr`` folder; an existing store of the same layout is reopened
            (resuming), never cleared.
        shape: (Y, X) of level 0.
        chunk: chunk edge in pixels.
        scale: physical (Y, X) pixel size of level 0.
        translation: physical (Y, X) offset of level 0's first pixel.
        units: e.g. ``{"y": "micrometer", "x": "micrometer"}``.
        num_classes: probability channels.
        probabilities: also create the probability pyramid.

    Returns:
        ``{"mask": [level arrays], "instances": [...], "probabilities": [...]}``.
    """
    zarr = _zarr()
    p = Path(path)
    levels = pyramid_levels(shape, chunk)
    axes = _axes(units or {})
    root = zarr.open_group(str(p), mode="a", zarr_format=3)
    plan: dict[str, tuple[Any, str, int | None]] = {
        "mask": (root, "uint8", None),
        "instances": (root.require_group("labels").require_group("instances"), "uint32", None),
    }
    if probabilities:
        plan["probabilities"] = (root.require_group("probabilities"), "float32", num_classes)
    arrays: dict[str, list[Any]] = {}
    for key, (group, dtype, channels) in plan.items():
        arrays[key] = []
        for level in range(levels):
            yx = tuple(-(-n // 2**level) for n in shape)
            full = yx if channels is None else (channels, *yx)
            # never larger than the level: a 100000² chunk of a 64² image is a 9 GiB buffer
            # for every write (one block still fills one chunk: a block is the whole axis)
            cy, cx = min(chunk, yx[0]), min(chunk, yx[1])
            chunks = (cy, cx) if channels is None else (1, cy, cx)
            names = SPATIAL if channels is None else ("c", *SPATIAL)
            arrays[key].append(  # NGFF 0.5: dimension_names must repeat the axes' names
                group.require_array(
                    str(level),
                    shape=full,
                    chunks=chunks,
                    dtype=dtype,
                    fill_value=0,
                    dimension_names=names,
                )
            )
        ms = _multiscale(key, axes, scale, translation, levels, channel=channels is not None)
        attrs: dict[str, Any] = {"version": NGFF_VERSION, "multiscales": [ms]}
        if key == "instances":
            attrs["image-label"] = {
                "version": NGFF_VERSION,
                "source": {"image": "../../"},
                "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],  # background: clear
            }
        group.attrs["ome"] = attrs
    labels = root["labels"]
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": ["instances"]}
    return arrays


def open_prediction(path: str | os.PathLike) -> dict[str, list[Any]]:
    """The level arrays of a store made by :func:`create_prediction`, opened for writing
    pixels only (metadata untouched: many workers may open it at once)."""
    zarr = _zarr()
    root = zarr.open_group(str(path), mode="r+")
    groups = {"mask": root, "instances": root["labels/instances"]}
    if "probabilities" in root:
        groups["probabilities"] = root["probabilities"]
    out = {}
    for key, group in groups.items():
        datasets = _ngff_attrs(group)["multiscales"][0]["datasets"]
        out[key] = [group[d["path"]] for d in datasets]
    return out


def downsample_chunk(finer: Any, coarser: Any, row: int, col: int) -> None:
    """Write chunk (row, col) of a pyramid level from the level below it: every second
    pixel in Y and X (nearest neighbour: labels stay labels). Reads only the 2× region."""
    cy, cx = coarser.chunks[-2:]
    ys, xs = slice(row * cy, (row + 1) * cy), slice(col * cx, (col + 1) * cx)
    lead = (slice(None),) * (coarser.ndim - 2)
    source = finer[
        (*lead, slice(2 * ys.start, 2 * ys.stop, 2), slice(2 * xs.start, 2 * xs.stop, 2))
    ]
    coarser[(*lead, ys, xs)] = source


def pyramid_chunks(coarser: Any) -> list[tuple[int, int]]:
    """(row, col) of every chunk of a level, for :func:`downsample_chunk`."""
    n_y, n_x = coarser.shape[-2:]
    cy, cx = coarser.chunks[-2:]
    return [(r, c) for r in range(-(-n_y // cy)) for c in range(-(-n_x // cx))]


def build_pyramid(levels: list[Any]) -> None:
    """Fill levels 1.. from level 0, chunk by chunk, in this process (the distributed
    workflow runs :func:`downsample_chunk` as tasks instead)."""
    for finer, coarser in zip(levels, levels[1:], strict=False):
        for row, col in pyramid_chunks(coarser):
            downsample_chunk(finer, coarser, row, col)
