"""Objects as an ImageJ ``RoiSet.zip`` (Fiji: drag it in, or ROI Manager > More > Open).

One polygon ROI per object (written by ``roifile``, the reference reader/writer of
ImageJ's ROI format), named ``<label>`` zero-padded, in pixel-corner coordinates with
sub-pixel precision. ImageJ polygon ROIs have no holes, so an object's outer outline is
written (its largest piece when it has several).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from unetkit._atomic import atomic_path
from unetkit.formats.polygons import object_outlines

__all__ = ["write_roi_zip"]


def write_roi_zip(path: str | os.PathLike, instances: np.ndarray) -> Path:
    """Write one ImageJ polygon ROI per object of a 2-D instance image to a zip, atomically.

    Args:
        path: target ``..._RoiSet.zip``.
        instances: H×W int labels, 0 = background.

    Returns:
        the path written.

    Example:
        >>> write_roi_zip("cells_RoiSet.zip", labels)   # doctest: +SKIP
    """
    import roifile  # optional dependency (extra: bio)

    path = Path(path)
    width = max(4, len(str(int(np.max(instances, initial=0)))))
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for outline in object_outlines(np.asarray(instances)):
            exterior = max((ext for ext, _ in outline.parts), key=len)
            name = f"{outline.label:0{width}d}"
            roi = roifile.ImagejRoi.frompoints(exterior[:-1], name=name)
            roi.roitype = roifile.ROI_TYPE.POLYGON  # frompoints says freehand; it is traced
            archive.writestr(f"{name}.roi", roi.tobytes())
    return path
