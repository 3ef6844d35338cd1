"""The single-process block path holds block-sized arrays, whatever the image size.

Measured with ``tracemalloc`` (numpy reports its arrays to it; torch's own buffers are
block-sized and not counted): the peak of what is allocated while a stage runs, at two
image sizes with the same blocks. A stage that holds something of the whole image (every
block's normalisation sample, every label of the image in one graph, the whole object
table) needs several times more at 7x the pixels; a block-wise one needs about the same
(what grows is the graph of the labels on block borders: ~0.2 MiB at 64 blocks here).
No wall clock: the numbers are bytes, the same on any machine."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
writer = pytest.importorskip("ome_zarr.writer")

import unetkit  # noqa: E402
from unetkit.data.synthetic import synth_cells  # noqa: E402
from unetkit.data.tiff import PixelSize  # noqa: E402
from unetkit.inference import TileOptions  # noqa: E402
from unetkit.segmentation.postprocess import object_table  # noqa: E402
from unetkit.segmentation.stitching import (  # noqa: E402
    core_labels,
    face_pairs,
    label_classes,
    stream_luts,
)
from unetkit.workflows import block_sources  # noqa: E402
from unetkit.workflows.block_outputs import ObjectTable, object_sums  # noqa: E402
from unetkit.workflows.blocks import BlockOptions, block_grid  # noqa: E402
from unetkit.workflows.distributed import predict_blocks  # noqa: E402
from unetkit.workflows.segment import InferenceOptions  # noqa: E402

SMALL, LARGE, BLOCK = 384, 1024, 128  # 9 and 64 blocks: both have blocks inside
OPTIONS = InferenceOptions(TileOptions(tile=64, batch_size=4), precision="fp32", min_size=4)


def _peak(run: Callable[[], object]) -> tuple[int, object]:
    """Bytes at the peak of what ``run`` allocates (and still holds at that moment)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = run()
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        tracemalloc.stop()


# --- the global passes, on many labels: merge and object table ---------------------------
LABELS = 4000  # local labels per block


def _grid_links(side: int) -> list[tuple[int, int, np.ndarray]]:
    """A side×side grid of blocks, each linked to its right and lower neighbour by a few
    labels (the objects that cross borders)."""
    links = []
    for i in range(side * side):
        r, c = divmod(i, side)
        for j in ([i + side] if r + 1 < side else []) + ([i + 1] if c + 1 < side else []):
            links.append((i, j, np.array([[1 + i % 7, 2 + j % 5], [LABELS, LABELS - 1]])))
    return links


def _area(i: int) -> np.ndarray:
    """Block i's areas, made when asked for (as the workflow reads them from a file)."""
    return np.concatenate([[0], np.random.default_rng(i).integers(1, 50, LABELS)])


def _merge(side: int) -> int:
    n = side * side
    objects = 0
    for lut, _ in stream_luts([LABELS] * n, _area, _grid_links(side), min_size=10):
        objects = max(objects, int(lut.max()))
    return objects


def _table(side: int) -> int:
    """The object table of side² blocks: each block starts LABELS - 1 objects (ids in the
    blocks' order) and holds the last one of the block before it too (a spanning object)."""
    n, new = side * side, LABELS - 1

    def part(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(i)
        ids = np.concatenate([[0], np.arange(i * new + 1, (i + 1) * new + 1), [i * new]])
        return {
            "ids": ids,
            "area": rng.integers(1, 50, LABELS + 1),
            "sum_y": rng.random(LABELS + 1),
            "sum_x": rng.random(LABELS + 1),
            "sum_i": rng.random((1, LABELS + 1)),
        }

    table = ObjectTable(1, np.arange(1, n) * new, None)
    for i in range(n):
        table.add_spanning(part(i))
    rows = 0
    for i in range(n):
        rows += len(table.rows(part(i))["label"])
    return rows


@pytest.mark.parametrize("stage", [_merge, _table], ids=["merge", "object_table"])
def test_global_passes_hold_one_block_of_labels(stage) -> None:
    small, done_small = _peak(lambda: stage(2))
    large, done_large = _peak(lambda: stage(8))
    assert done_large > 15 * done_small  # 16x the blocks: it saw 16x the objects
    # one graph or table of all labels would need ~16x (64 vs 4 blocks of 4000 labels)
    assert large < 1.5 * small, f"peak {large / 2**20:.2f} MiB vs {small / 2**20:.2f} MiB"


def test_two_pass_table_equals_object_table_of_the_whole_labels() -> None:
    """Blocks labelled, stitched and summed as the workflow does; the table's rows, handed
    on block by block, equal ``object_table`` of the assembled labels."""
    rng = np.random.default_rng(5)
    smooth = ndimage.gaussian_filter(rng.random((150, 170)), 2.5)
    classes = (smooth > np.quantile(smooth, 0.55)).astype(np.uint8)
    image = rng.random((2, 150, 170))
    grid = block_grid(classes.shape, 40)
    index = {(b.row, b.col): i for i, b in enumerate(grid)}
    local = [core_labels(label_classes(classes[b.slices]), np.s_[:, :])[0] for b in grid]
    links = []
    for i, b in enumerate(grid):
        for j, edge, face in (
            (index.get((b.row + 1, b.col)), np.s_[-1, :], np.s_[0, :]),
            (index.get((b.row, b.col + 1)), np.s_[:, -1], np.s_[:, 0]),
        ):
            if j is not None:
                pairs = face_pairs(
                    local[i][edge],
                    local[j][face],
                    classes[b.slices][edge],
                    classes[grid[j].slices][face],
                )
                links.append((i, j, pairs))
    counts = [int(lab.max()) for lab in local]
    areas = [np.bincount(lab.ravel(), minlength=int(lab.max()) + 1) for lab in local]
    merged = list(stream_luts(counts, areas.__getitem__, links, min_size=3))
    parts = [
        object_sums(lab, lut, image[:, b.y0 : b.y1, b.x0 : b.x1], b)
        for lab, (lut, _), b in zip(local, merged, grid, strict=True)
    ]
    whole = np.zeros(classes.shape, np.uint32)
    for lab, (lut, _), b in zip(local, merged, grid, strict=True):
        whole[b.slices] = lut[lab]
    spanning = np.concatenate([s for _, s in merged])
    assert len(spanning) >= 5  # objects cross borders
    table = ObjectTable(2, spanning, PixelSize(0.5, 0.25))
    for part in parts:
        table.add_spanning(part)
    got = [table.rows(part) for part in parts]
    columns = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
    want = object_table(whole, image, pixel_size=(0.5, 0.25))
    assert list(columns) == list(want[0]) and table.count == len(want) == whole.max()
    for key in ("label", "area"):
        assert columns[key].tolist() == [row[key] for row in want]
    for key in columns:  # sums in another order than the whole image's: the last bit
        np.testing.assert_allclose(columns[key], [row[key] for row in want], rtol=1e-12)


# --- the whole single-process path, with a model -----------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("blockmem")
    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(8, 16), out_channels=3, norm="group")
    extra = {"target": "semantic", "normalize": "percentile"}  # the sampled statistics
    ckpt = str(unetkit.save(net, root / "model.safetensors", extra=extra))
    images = {}
    for size in (SMALL, LARGE):
        picture, _ = synth_cells((size, size), seed=size, n_cells=(size * size // 900,) * 2)
        group = zarr.open_group(str(root / f"{size}.ome.zarr"), mode="w")
        pixels = (picture * 255).astype(np.uint8)
        writer.write_image(pixels, group, axes="yx", storage_options={"chunks": (BLOCK, BLOCK)})
        images[size] = root / f"{size}.ome.zarr"
    return {"root": root, "ckpt": ckpt, "images": images}


def test_single_process_peak_does_not_grow_with_the_image(inputs: dict, monkeypatch) -> None:
    # statistics from blocks (as above 4096²), from a sample of a fixed size
    monkeypatch.setattr(block_sources, "EXACT_STATS_PIXELS", BLOCK * BLOCK)
    monkeypatch.setattr(block_sources, "_SAMPLE_PIXELS", 64 * 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def run(size: int, name: str) -> list[dict]:
            out = inputs["root"] / name
            blocks = BlockOptions(block_size=BLOCK)
            return predict_blocks(inputs["ckpt"], [inputs["images"][size]], out, OPTIONS, blocks)

        run(SMALL, "warm")  # imports and the cached model: not the image's
        small, rows_small = _peak(lambda: run(SMALL, "small"))
        large, rows_large = _peak(lambda: run(LARGE, "large"))
    finally:
        torch.set_num_threads(threads)
    assert (rows_small[0]["blocks"], rows_large[0]["blocks"]) == (9, 64)
    assert rows_large[0]["objects"] > 4 * rows_small[0]["objects"] > 0
    # measured: 1.05 vs 1.22 MiB; before the fix 2.2 vs 14.5 MiB (every block's float32
    # pixels kept by the normalisation sample, every label in one graph, the whole table)
    assert large < 1.6 * small, f"peak {large / 2**20:.2f} MiB vs {small / 2**20:.2f} MiB"
    assert Path(rows_large[0]["output"]).is_dir()
