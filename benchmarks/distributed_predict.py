"""Block-wise predict of one huge OME-Zarr image: wall time and peak memory per worker.

    python benchmarks/distributed_predict.py                    # 16384², blocks 1024²
    python benchmarks/distributed_predict.py --size 4096        # the small run
    python benchmarks/distributed_predict.py --size 2048 --markdown table.md

The image is generated (synthetic touching cells, uint8, OME-Zarr chunked ``--chunk``²);
the model is the 482 k-parameter U-Net of the ``demo`` recipe (channels 16-32-64-128,
3-class boundary target, random weights: the work per pixel does not depend on them).
Cases, each in a fresh process so that its peak memory is its own:

* ``whole``   — ``workflows.segment.predict_image`` on the whole image in memory (sizes
  up to ``--whole-max``; with ``--tile`` of the block-wise default, 256² at 1024² blocks,
  the reference the block-wise mask equals bit for bit at one torch thread);
* ``blocks``  — the single-process block-wise path (``unetkit predict`` on a Zarr, no
  ``--cluster``);
* ``local:N`` — a ``distributed.LocalCluster`` with N worker processes, 1 thread each.

Peak memory: the process's peak resident set (``VmHWM``, else ``ru_maxrss``); for Dask,
each worker process's own peak, read on the worker after the run. CPU: user + system
seconds of the process (the client, which also runs the scheduler and the stitching) and
of each worker.
Torch runs on one thread per worker (and per single-process case), so ``local:2`` vs
``local:1`` measures scaling; the clock starts once the workers are up (unetkit imported
on them, as ``dask_client`` preloads it). ``--repeat N`` runs the cases N times,
interleaved, and reports each case's median wall time (ratios under load are noisy).
The random weights make noise objects (about 18× the cells), so stitching and the object
table work harder than with a trained model.

The generated inputs and outputs go to a temporary folder, deleted at the end (``--keep``
keeps it). From a clone: ``pip install -e '.[zarr]'`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (``ru_maxrss`` can carry the peak of
    the parent that started the process, e.g. the one that generated the image)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_inputs(root: Path, size: int, chunk: int) -> tuple[Path, Path]:
    """The demo-sized U-Net checkpoint and a size² synthetic OME-Zarr (chunk by chunk)."""
    import torch
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    import unetkit
    from unetkit.data.synthetic import synth_cells

    torch.manual_seed(0)
    net = unetkit.create_model("unet", channels=(16, 32, 64, 128), out_channels=3)
    ckpt = unetkit.save(net, root / "demo.safetensors", extra={"target": "boundary"})
    image = root / "huge.ome.zarr"
    group = zarr.open_group(str(image), mode="w")
    arr = group.create_array("0", shape=(size, size), chunks=(chunk, chunk), dtype="uint8")
    cells = max(1, chunk * chunk // 1700)  # about 25 px cells, as in the tests
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            picture, _ = synth_cells((chunk, chunk), seed=(y, x), n_cells=(cells, cells + 10))
            arr[y : y + chunk, x : x + chunk] = (picture * 255).astype(np.uint8)
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}]
    write_multiscales_metadata(group, datasets, axes="yx")
    return ckpt, image


def run_case(case: str, ckpt: str, image: str, out: str, block: int, precision: str) -> dict:
    """One case in this process; returns wall time and peak memory (MiB)."""
    import torch

    torch.set_num_threads(1)
    from unetkit.inference import TileOptions
    from unetkit.workflows.blocks import BlockOptions, default_tile_edge
    from unetkit.workflows.dask_cluster import dask_client
    from unetkit.workflows.distributed import predict_blocks
    from unetkit.workflows.segment import InferenceOptions

    options = InferenceOptions(precision=precision)
    if case == "whole":
        from unetkit.data.io import to_float_image
        from unetkit.formats.ome_zarr import open_ngff
        from unetkit.inference.backends import load_inference_model
        from unetkit.workflows.segment import predict_image

        model, meta = load_inference_model(ckpt)
        tiles = TileOptions(tile=default_tile_edge(block))
        options = InferenceOptions(tiles, precision=precision)
        start, cpu = time.perf_counter(), _cpu_s()
        pixels = open_ngff(image).window(slice(None), slice(None))
        pred = predict_image(model, to_float_image(pixels), meta, options)
        wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
        objects = int(pred.instances.max())
        return {"wall_s": wall, "peak_mib": [_peak_mib()], "cpu_s": [cpu], "objects": objects}
    cluster = None if case == "blocks" else case
    with dask_client(cluster, dashboard=None) as client:
        workers = {} if client is None else client.run(_cpu_s)
        start, cpu = time.perf_counter(), _cpu_s()
        rows = predict_blocks(
            ckpt, [image], out, options, BlockOptions(block_size=block), client=client
        )
        wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
        peaks = [_peak_mib()] if client is None else sorted(client.run(_peak_mib).values())
        done = {} if client is None else client.run(_cpu_s)
        cpus = [cpu] + sorted(done[w] - workers[w] for w in done)
    return {"wall_s": wall, "peak_mib": peaks, "cpu_s": cpus, "objects": rows[0]["objects"]}


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the upper one of an even count), with every wall time."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return {**ordered[len(ordered) // 2], "walls": [r["wall_s"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="image edge (pixels)")
    parser.add_argument("--chunk", type=int, default=1024, help="input Zarr chunk edge")
    parser.add_argument("--block-size", type=int, default=1024, help="block edge per task")
    parser.add_argument("--cases", default="whole,blocks,local:1,local:2")
    parser.add_argument("--whole-max", type=int, default=8192, help="largest size for 'whole'")
    parser.add_argument("--precision", default="auto", help="fp32 | bf16 | auto (default)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the cases this many times, interleaved; "
        "the table shows the median wall time of each case",
    )
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # case ckpt image out block
    args = parser.parse_args()
    if args.one:
        case, ckpt, image, out, block = args.one
        print(json.dumps(run_case(case, ckpt, image, out, int(block), args.precision)))
        return
    root = Path(tempfile.mkdtemp(prefix="unetkit_dist_bench_"))
    try:
        run_cases(args, root)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_cases(args: argparse.Namespace, root: Path) -> None:
    """Generate the inputs in ``root``, run each case in its own process, print a table."""
    t = time.perf_counter()
    ckpt, image = make_inputs(root, args.size, args.chunk)
    print(f"generated {args.size}² OME-Zarr in {time.perf_counter() - t:.0f} s: {image}")
    rows = []
    cases = [c for c in args.cases.split(",") if c != "whole" or args.size <= args.whole_max]
    for run, case in enumerate(cases * args.repeat):
        out = root / f"out{run}_{case.replace(':', '')}"
        cmd = [
            sys.executable,
            __file__,
            "--precision",
            args.precision,
            "--one",
            case,
            str(ckpt),
            str(image),
            str(out),
            str(args.block_size),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode:
            sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"case": case, **result})
        print(json.dumps(rows[-1]), flush=True)
    rows = [_median_run([r for r in rows if r["case"] == case]) for case in cases]
    base = next((r["wall_s"] for r in rows if r["case"] == "local:1"), None)
    lines = [
        f"| case ({args.size}², blocks {args.block_size}², {args.precision}) | wall s | "
        "peak MiB per process | CPU s (client / workers) | objects | speed-up vs local:1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{base / r['wall_s']:.2f}x" if base and r["case"].startswith("local") else ""
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_mib"])
        cpu = " / ".join(f"{c:.0f}" for c in r["cpu_s"])
        wall = f"{r['wall_s']:.1f}" + (
            f" (of {', '.join(f'{w:.1f}' for w in r['walls'])})" if len(r["walls"]) > 1 else ""
        )
        lines.append(f"| {r['case']} | {wall} | {peaks} | {cpu} | {r['objects']} | {speed} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
