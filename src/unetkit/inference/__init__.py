"""Inference engines: tiling (overlap-tile, sliding window), TTA, streaming, backends.

``TileOptions`` (how an image is tiled) is the one options type every front-end hands down.
"""

from unetkit.inference.tile_options import TileOptions

__all__ = ["TileOptions"]
