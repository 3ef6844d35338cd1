"""Block-wise prediction on a real ``distributed.LocalCluster`` (2 workers, 127.0.0.1).

The reference is the single-process engine (``workflows.segment.predict_image`` on the
whole image in memory). Cells are dense on purpose, so many cross the block borders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries

pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
writer = pytest.importorskip("ome_zarr.writer")

import unetkit  # noqa: E402
from unetkit.cli.main import main  # noqa: E402
from unetkit.data.io import to_float_image  # noqa: E402
from unetkit.data.synthetic import synth_cells  # noqa: E402
from unetkit.errors import ConfigError, DataError  # noqa: E402
from unetkit.inference import TileOptions  # noqa: E402
from unetkit.inference.backends import load_inference_model  # noqa: E402
from unetkit.workflows.blocks import BlockOptions  # noqa: E402
from unetkit.workflows.dask_cluster import dask_client  # noqa: E402
from unetkit.workflows.distributed import predict_blocks  # noqa: E402
from unetkit.workflows.segment import InferenceOptions, predict_image  # noqa: E402
from unetkit.workflows.segment_outputs import OutputOptions  # noqa: E402

SIZE, BLOCK = 512, 256
OPTIONS = InferenceOptions(TileOptions(tile=128, batch_size=4), precision="fp32", min_size=10)


def _train_three_class(steps: int = 60) -> torch.nn.Module:
    """A tiny U-Net taught background / interior / boundary on synthetic cells (seconds):
    predictions need not be good, only cell-like, so objects cross block borders."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only spins (6x the CPU)
    try:
        return _fit(steps)
    finally:
        torch.set_num_threads(threads)


def _fit(steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = unetkit.create_model("unet", channels=(8, 16), out_channels=3, norm="group")
    data = []
    for i in range(4):
        image, labels = synth_cells((128, 128), seed=(0, i), n_cells=(9, 11))
        edge = find_boundaries(labels, mode="inner")
        target = np.where(edge, 2, (labels > 0).astype(np.int64))
        data.append(((image - image.mean()) / image.std(), target))
    opt = torch.optim.Adam(net.parameters(), 2e-2)
    net.train()
    for _ in range(steps):
        picks = [data[k] for k in rng.integers(len(data), size=4)]
        corners = rng.integers(0, 128 - 64, (4, 2))
        x = np.stack(
            [im[y : y + 64, c : c + 64] for (im, _), (y, c) in zip(picks, corners, strict=True)]
        )
        t = np.stack(
            [tg[y : y + 64, c : c + 64] for (_, tg), (y, c) in zip(picks, corners, strict=True)]
        )
        loss = torch.nn.functional.cross_entropy(
            net(torch.from_numpy(x[:, None])), torch.from_numpy(t)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    net = _train_three_class()
    ckpt = {
        target: str(unetkit.save(net, root / f"{target}.safetensors", extra={"target": target}))
        for target in ("boundary", "semantic")
    }
    image, _ = synth_cells((SIZE, SIZE), seed=1, n_cells=(150, 160))
    pixels = (image * 255).astype(np.uint8)
    group = zarr.open_group(str(root / "cells.ome.zarr"), mode="w")
    writer.write_image(
        pixels,
        group,
        axes="yx",
        scale={"y": 0.5, "x": 0.5},
        storage_options={"chunks": (BLOCK // 2, BLOCK // 2)},
    )
    return {"root": root, "ckpt": ckpt, "pixels": pixels, "zarr": root / "cells.ome.zarr"}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            processes=False,
            protocol="tcp://",
            dashboard_address=None,  # threads, but real TCP comms
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _reference(setup: dict, target: str):
    model, meta = load_inference_model(setup["ckpt"][target])
    return predict_image(model, to_float_image(setup["pixels"]), meta, OPTIONS)


def _read(out: Path) -> tuple[np.ndarray, np.ndarray, zarr.Group]:
    group = zarr.open_group(str(out), mode="r")
    return group["0"][:], group["labels/instances/0"][:], group


def _match(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """IoU of each reference object with the object covering most of it."""
    ious = []
    for label in range(1, int(ref.max()) + 1):
        obj = ref == label
        values, counts = np.unique(got[obj], return_counts=True)
        best = values[np.argmax(counts)]
        other = got == best
        ious.append(0.0 if best == 0 else (obj & other).sum() / (obj | other).sum())
    return np.array(ious)


def _crossing(instances: np.ndarray) -> int:
    """Objects that cross a block border."""
    rows = set(np.unique(instances[BLOCK - 1][instances[BLOCK - 1] == instances[BLOCK]]))
    cols = set(np.unique(instances[:, BLOCK - 1][instances[:, BLOCK - 1] == instances[:, BLOCK]]))
    return len((rows | cols) - {0})


@pytest.mark.parametrize("target", ["semantic", "boundary"])
def test_distributed_equals_single_process(setup: dict, client, target: str, tmp_path: Path):
    ref = _reference(setup, target)
    assert _crossing(ref.instances) >= 5  # the test means something
    rows = predict_blocks(
        setup["ckpt"][target],
        [setup["zarr"]],
        tmp_path,
        OPTIONS,
        BlockOptions(block_size=BLOCK, label_halo=32),
        outputs=OutputOptions(save_probabilities=True),
        client=client,
    )
    mask, instances, group = _read(tmp_path / "cells.zarr")
    np.testing.assert_array_equal(group["probabilities/0"][:], ref.probabilities)  # bit for bit
    np.testing.assert_array_equal(mask, ref.labels)
    assert rows[0]["objects"] == instances.max() == ref.instances.max()
    ious = _match(ref.instances, instances)
    assert ious.min() > 0.95, f"objects {np.flatnonzero(ious <= 0.95) + 1} differ"
    # none split: every distributed object lies in one reference object
    assert ref.instances.max() == len(np.unique(instances[instances > 0]))
    if target == "semantic":  # connected components stitch exactly
        np.testing.assert_array_equal(_match(instances, ref.instances), 1.0)


def test_resume_skips_finished_blocks(setup: dict, tmp_path: Path, monkeypatch) -> None:
    from unetkit.workflows import distributed

    opts = BlockOptions(block_size=BLOCK)
    clean = tmp_path / "clean"
    predict_blocks(setup["ckpt"]["semantic"], [setup["zarr"]], clean, OPTIONS, opts)
    # a run killed at its last block: three blocks written, then the process dies
    real = distributed.predict_block

    def dies_at_last_block(job, block):
        if (block.row, block.col) == (1, 1):
            raise KeyboardInterrupt
        return real(job, block)

    monkeypatch.setattr(distributed, "predict_block", dies_at_last_block)
    with pytest.raises(KeyboardInterrupt):
        predict_blocks(setup["ckpt"]["semantic"], [setup["zarr"]], tmp_path, OPTIONS, opts)
    markers = tmp_path / "cells.zarr" / ".unetkit"
    stamps = {p.name: p.stat().st_mtime_ns for p in markers.glob("block_*.npz")}
    assert sorted(stamps) == ["block_0_0.npz", "block_0_1.npz", "block_1_0.npz"]
    monkeypatch.setattr(distributed, "predict_block", real)
    seen: list[tuple[str, int, int]] = []
    predict_blocks(
        setup["ckpt"]["semantic"],
        [setup["zarr"]],
        tmp_path,
        OPTIONS,
        opts,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    assert {p: markers.joinpath(p).stat().st_mtime_ns for p in stamps} == stamps  # skipped
    assert (markers / "block_1_1.npz").is_file() and ("predict", 4, 4) in seen
    for key in ("0", "labels/instances/0", "labels/instances/1"):
        resumed = zarr.open_array(str(tmp_path / "cells.zarr" / key), mode="r")[:]
        np.testing.assert_array_equal(resumed, zarr.open_array(str(clean / "cells.zarr" / key))[:])
    assert json.loads((markers / "complete.json").read_text())["blocks"] == 4
    assert not (markers / "local").exists()


def test_many_images_share_the_workers(setup: dict, client, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    import tifffile

    tifffile.imwrite(folder / "a.tif", setup["pixels"][:300, :200], tile=(64, 64))
    tifffile.imwrite(folder / "b.tif", setup["pixels"][200:, 100:])
    rows = predict_blocks(
        setup["ckpt"]["semantic"],
        [folder],
        tmp_path / "out",
        OPTIONS,
        BlockOptions(block_size=BLOCK),
        client=client,
    )
    assert [Path(r["output"]).name for r in rows] == ["a.zarr", "b.zarr"]
    model, meta = load_inference_model(setup["ckpt"]["semantic"])
    for name, crop in (("a", setup["pixels"][:300, :200]), ("b", setup["pixels"][200:, 100:])):
        ref = predict_image(model, to_float_image(crop), meta, OPTIONS)
        np.testing.assert_array_equal(_read(tmp_path / "out" / f"{name}.zarr")[0], ref.labels)


def test_block_smaller_than_halo_is_one_line(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        predict_blocks(
            setup["ckpt"]["boundary"],
            [setup["zarr"]],
            tmp_path,
            OPTIONS,
            BlockOptions(block_size=64, label_halo=32),
        )
    msg = str(e.value)
    assert "--block-size 64" in msg and "halo of 160 px" in msg and "\n" not in msg


def test_unreachable_scheduler_is_one_line() -> None:
    with pytest.raises(DataError) as e, dask_client("tcp://127.0.0.1:1", timeout=1):
        pass
    assert "tcp://127.0.0.1:1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="local:N"), dask_client("local:zero"):
        pass


def test_cli_block_wise_and_bad_input(setup: dict, tmp_path: Path, capsys) -> None:
    ckpt = setup["ckpt"]["semantic"]
    out = tmp_path / "cli"
    assert (
        main(
            [
                "predict",
                ckpt,
                str(setup["zarr"]),
                "--out",
                str(out),
                "--block-size",
                str(BLOCK),
                "--tile",
                "128",
                "--precision",
                "fp32",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    ref = _reference(setup, "semantic")
    np.testing.assert_array_equal(_read(out / "cells.zarr")[0], ref.labels)
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("0", shape=(8, 8), dtype="uint8")
    capsys.readouterr()
    assert main(["predict", ckpt, str(plain), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unetkit predict: error: ") and "plain.zarr" in err
    assert "multiscales" in err and "\n" not in err
    assert (
        main(
            [
                "predict",
                ckpt,
                str(setup["zarr"]),
                "--out",
                str(out),
                "--cluster",
                "tcp://127.0.0.1:1",
                "--scheduler-timeout",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "tcp://127.0.0.1:1" in err and "\n" not in err


@pytest.mark.slow
def test_cli_local_cluster_of_worker_processes(setup: dict, tmp_path: Path, capsys) -> None:
    """`--cluster local:2`: real worker processes (jobs pickled, model loaded per worker),
    the dashboard address printed, the mask equal to the single-process one."""
    out = tmp_path / "procs"
    args = ["predict", setup["ckpt"]["semantic"], str(setup["zarr"]), "--out", str(out)]
    args += ["--cluster", "local:2", "--block-size", str(BLOCK), "--tile", "128"]
    assert main([*args, "--precision", "fp32", "--save-probabilities"]) == 0
    printed = capsys.readouterr().out
    assert "Dask dashboard: http://127.0.0.1:" in printed and "cells.zarr" in printed
    mask, instances, group = _read(out / "cells.zarr")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: bit-for-bit needs the same
    try:
        ref = _reference(setup, "semantic")
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(group["probabilities/0"][:], ref.probabilities)
    np.testing.assert_array_equal(mask, ref.labels)
    assert instances.max() == ref.instances.max()


def test_valid_padding_model_overlap_tile_grid(setup: dict, tmp_path: Path) -> None:
    """A paper-style valid-padding U-Net: the overlap-tile grid, block by block, at an
    OME-Zarr level (level 1 as ome-zarr-py downsampled it), equal to the whole image."""
    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(4, 8), padding="valid", norm="none")
    ckpt = unetkit.save(net, tmp_path / "valid.safetensors", extra={"target": "semantic"})
    options = InferenceOptions(TileOptions(tile=64), precision="fp32")
    predict_blocks(
        ckpt,
        [setup["zarr"]],
        tmp_path,
        options,
        BlockOptions(block_size=96, level=1),
        outputs=OutputOptions(save_probabilities=True),
    )
    pixels = zarr.open_array(str(setup["zarr"] / "s1"), mode="r")[:]  # ome-zarr-py's level 1
    model, meta = load_inference_model(ckpt)
    ref = predict_image(model, to_float_image(pixels), meta, options)
    mask, _, group = _read(tmp_path / "cells.zarr")
    np.testing.assert_array_equal(group["probabilities/0"][:], ref.probabilities)
    np.testing.assert_array_equal(mask, ref.labels)
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"] == [1.0, 1.0]  # level 1 of a 0.5 µm image
