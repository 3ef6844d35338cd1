"""``TileOptions``: how an image is cut into tiles and the tiles run, typed and checked once.

Every front-end (the CLI's ``--tile``/``--overlap``/``--tta``/``--batch-size``, napari, the
web page, Dask block-wise prediction) builds one ``TileOptions`` and hands it down unchanged
to :func:`unetkit.inference.tiling.predict_tiled`; nothing on the way re-reads or renames its
fields. Bad values fail here, with a ``ConfigError`` naming the field.

Example:
    >>> TileOptions(tile=256, overlap=0.5).tile_size(2)
    (256, 256)
    >>> TileOptions(overlap=1.0)
    Traceback (most recent call last):
    ...
    unetkit.errors.ConfigError: TileOptions.overlap=1.0: expected a number in [0, 1)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from unetkit.config import check_choice
from unetkit.errors import ConfigError
from unetkit.inference.grid import BLEND_MODES, PAD_MODES
from unetkit.inference.tta import TTA_MODES

__all__ = ["TileOptions"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclasses.dataclass(frozen=True)
class TileOptions:
    """How ``predict_tiled`` tiles an image (the result does not depend on ``batch_size``).

    Args:
        tile: output tile (valid-padding models) or window (same padding) size: one int for
            every axis or one per axis; None runs the whole image in one pass when it fits,
            else tiles of about ``tiling.DEFAULT_TILE_VOXELS`` input voxels. A tile larger
            than the image is capped at the image size.
        overlap: minimum overlap of neighbouring sliding windows, a fraction of the tile in
            [0, 1) (same padding only: overlap-tile outputs never overlap).
        batch_size: tiles per forward pass.
        tta: test-time augmentation per tile: False, True (= "flip") or one of
            ``tta.TTA_MODES``; the augmented predictions are averaged.
        blend: how overlapping windows are weighted: gaussian (nnU-Net) | constant.
        sigma_scale: the Gaussian's sigma as a fraction of the tile (nnU-Net: 0.125).
        pad_mode: context beyond the image border: reflect (mirror, the U-Net paper) |
            replicate | constant.
    """

    tile: int | tuple[int, ...] | None = dataclasses.field(
        default=None, metadata=_help("tile size (default: the whole image if it fits)")
    )
    overlap: float = dataclasses.field(default=0.25, metadata=_help("sliding-window overlap"))
    batch_size: int = dataclasses.field(default=4, metadata=_help("tiles per forward pass"))
    tta: bool | str = dataclasses.field(
        default=False, metadata=_help("flip test-time augmentation")
    )
    blend: str = dataclasses.field(default="gaussian", metadata=_help("window weighting"))
    sigma_scale: float = dataclasses.field(default=0.125, metadata=_help("Gaussian sigma / tile"))
    pad_mode: str = dataclasses.field(default="reflect", metadata=_help("border context"))

    def __post_init__(self) -> None:
        if self.tile is not None:
            object.__setattr__(self, "tile", _checked_tile(self.tile))
        if not _is_number(self.overlap) or not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"TileOptions.overlap={self.overlap!r}: expected a number in [0, 1)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ConfigError(f"TileOptions.batch_size={self.batch_size!r}: expected an int >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"TileOptions.batch_size={self.batch_size}: expected an int >= 1")
        if not isinstance(self.tta, bool):
            check_choice("TileOptions.tta", self.tta, TTA_MODES)
        check_choice("TileOptions.blend", self.blend, BLEND_MODES)
        if not _is_number(self.sigma_scale) or self.sigma_scale <= 0:
            raise ConfigError(
                f"TileOptions.sigma_scale={self.sigma_scale!r}: expected a number > 0"
            )
        check_choice("TileOptions.pad_mode", self.pad_mode, PAD_MODES)

    def tile_size(self, dims: int) -> tuple[int, ...] | None:
        """The tile per axis for a ``dims``-axis image (None: choose from the image).

        Raises:
            ConfigError: the tile has a number of sizes other than 1 or ``dims``.
        """
        if self.tile is None:
            return None
        if isinstance(self.tile, int):
            return (self.tile,) * dims
        if len(self.tile) != dims:
            raise ConfigError(
                f"TileOptions.tile={self.tile}: give one size or {dims} (one per axis)"
            )
        return self.tile

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (front-ends show it; they never restate it)."""
        return cls.__dataclass_fields__[name].default

    @classmethod
    def help(cls, name: str) -> str:
        """The one-line help of field ``name``, for front-ends' flags and widgets."""
        return cls.__dataclass_fields__[name].metadata["help"]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _checked_tile(tile: object) -> int | tuple[int, ...]:
    """An int >= 1, or a tuple of them (a list or numpy ints are accepted and converted)."""
    values: Sequence[Any] = (tile,) if not isinstance(tile, Sequence) else tile
    ok = len(values) > 0 and all(
        hasattr(v, "__index__") and not isinstance(v, bool) and int(v) >= 1 for v in values
    )
    if not ok or isinstance(tile, str):
        raise ConfigError(
            f"TileOptions.tile={tile!r}: expected a positive int or one positive int per axis"
        )
    if not isinstance(tile, Sequence):
        return int(tile)  # type: ignore[call-overload]
    return tuple(int(v) for v in values)
