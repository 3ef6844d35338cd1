"""OME-Zarr in and out: files written by ome-zarr-py are read lazily at any level, and the
prediction stores unetkit writes are read back and validated by ome-zarr-py and
ome-zarr-models (independent implementations of the NGFF spec)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
writer = pytest.importorskip("ome_zarr.writer")
pytest.importorskip("dask")

from ome_zarr.format import FormatV04  # noqa: E402
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Label, Multiscales, Reader  # noqa: E402

from unetkit.errors import DataError  # noqa: E402
from unetkit.formats import ome_zarr  # noqa: E402
from unetkit.workflows.block_sources import open_source  # noqa: E402


def _write(path: Path, data: np.ndarray, axes: str, fmt=None) -> None:
    """An image as ome-zarr-py writes it: its own pyramid, pixel size 0.5 × 0.25."""
    root = zarr.open_group(str(path), mode="w", **({"zarr_format": 2} if fmt else {}))
    writer.write_image(
        data,
        root,
        axes=axes,
        scale_factors=(2, 4),
        scale={"y": 0.5, "x": 0.25},
        storage_options={"chunks": (1,) * (data.ndim - 2) + (32, 32)},
        **({"fmt": fmt} if fmt is not None else {}),
    )


@pytest.mark.parametrize("fmt", [None, FormatV04()], ids=["ngff-0.5", "ngff-0.4"])
def test_reads_images_ome_zarr_wrote(tmp_path: Path, fmt) -> None:
    data = np.random.default_rng(0).integers(0, 60000, (2, 100, 70), dtype=np.uint16)
    _write(tmp_path / "img.zarr", data, "cyx", fmt)
    img = ome_zarr.open_ngff(tmp_path / "img.zarr")
    assert img.axis_names == ("c", "y", "x") and img.channels == 2
    assert img.shape == (100, 70) and img.scale(0) == (0.5, 0.25)
    assert len(img.arrays) >= 2 and img.scale(1) == (1.0, 0.5)
    assert img.translation(0) == (0.0, 0.0) and img.translation(1) != (0.0, 0.0)
    win = img.window(slice(10, 40), slice(5, 69))
    np.testing.assert_array_equal(win, np.moveaxis(data[:, 10:40, 5:69], 0, -1))
    coarse = np.asarray(img.arrays[1])  # level 1 as ome-zarr-py downsampled it
    np.testing.assert_array_equal(img.window(slice(None), slice(None), level=1)[..., 0], coarse[0])
    with pytest.raises(DataError, match="level 9 does not exist"):
        img.window(slice(0, 1), slice(0, 1), level=9)


def test_zarr_without_ngff_metadata_is_one_line(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    root.create_array("0", shape=(8, 8), dtype="uint8")
    with pytest.raises(DataError) as e:
        ome_zarr.open_ngff(tmp_path / "plain.zarr")
    msg = str(e.value)
    assert "plain.zarr" in msg and "multiscales" in msg and "\n" not in msg
    with pytest.raises(DataError, match="not a Zarr folder"):
        ome_zarr.open_ngff(tmp_path)


def test_prediction_store_validates_as_ngff(tmp_path: Path) -> None:
    out = tmp_path / "pred.zarr"
    arrays = ome_zarr.create_prediction(
        out,
        (300, 200),
        chunk=64,
        scale=(0.5, 0.25),
        translation=(3.0, -1.5),
        units={"y": "micrometer", "x": "micrometer"},
        num_classes=3,
        probabilities=True,
    )
    labels = np.arange(300 * 200, dtype=np.uint32).reshape(300, 200) % 7
    arrays["instances"][0][:] = labels
    arrays["mask"][0][:] = (labels > 0).astype(np.uint8)
    reopened = ome_zarr.open_prediction(out)
    for levels in reopened.values():
        ome_zarr.build_pyramid(levels)
    n_levels = ome_zarr.pyramid_levels((300, 200), 64)
    assert n_levels == 4 and len(reopened["instances"]) == n_levels
    np.testing.assert_array_equal(reopened["instances"][2][:], labels[::4, ::4])

    # ome-zarr-py's reader: image node, labels node with image-label metadata
    nodes = list(Reader(parse_url(str(out)))())
    image = nodes[0]
    assert image.specs and any(isinstance(s, Multiscales) for s in image.specs)
    axes = image.metadata["axes"]
    assert [a["name"] for a in axes] == ["y", "x"] and axes[0]["unit"] == "micrometer"
    scales = [t[0]["scale"] for t in image.metadata["coordinateTransformations"]]
    assert scales == [[0.5 * 2**i, 0.25 * 2**i] for i in range(n_levels)]
    shifts = [t[1]["translation"] for t in image.metadata["coordinateTransformations"]]
    assert shifts == [[3.0, -1.5]] * n_levels  # levels sample pixel 0 of level 0 onwards
    assert ome_zarr.open_ngff(out).translation(2) == (3.0, -1.5)
    # the reader walks from the image to its labels (and from the labels to their image)
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(label_nodes) == 1 and "labels/instances" in str(label_nodes[0].zarr)
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), labels)
    assert label_nodes[0].data[0].dtype == np.uint32
    back = list(Reader(parse_url(str(out / "labels" / "instances")))())
    assert str(back[0].zarr).split()[0].endswith("pred.zarr")  # image-label source

    # ome-zarr-models: pydantic models of the NGFF 0.5 spec
    models = pytest.importorskip("ome_zarr_models.v05")
    img_model = models.Image.from_zarr(zarr.open_group(str(out), mode="r"))
    assert len(img_model.attributes.ome.multiscales[0].datasets) == n_levels
    lab = models.ImageLabel.from_zarr(zarr.open_group(str(out / "labels" / "instances"), mode="r"))
    assert lab.attributes.ome.image_label is not None
    models.Labels.from_zarr(zarr.open_group(str(out / "labels"), mode="r"))


def test_tiff_is_read_through_its_tiles(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    data = np.random.default_rng(1).integers(0, 255, (200, 150), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", data, tile=(64, 64))
    source = open_source(str(tmp_path / "big.tif"))
    assert source.shape == (200, 150)
    np.testing.assert_array_equal(
        source.window(slice(70, 130), slice(1, 99))[..., 0], data[70:130, 1:99]
    )
