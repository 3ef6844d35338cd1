"""`unetkit predict`: images or folders in; masks, instance labels, overlays, counts out."""

from __future__ import annotations

import argparse
import logging

from tqdm import tqdm

from unetkit.cli import flags as F
from unetkit.data.io import parse_channels
from unetkit.errors import ConfigError
from unetkit.formats.ome_zarr import is_zarr
from unetkit.inference import TileOptions
from unetkit.inference.backends import BACKENDS
from unetkit.outputs import output_folder
from unetkit.runtime import DEFAULT_PRECISION, PRECISIONS
from unetkit.workflows.blocks import BlockOptions
from unetkit.workflows.dask_cluster import dask_client
from unetkit.workflows.distributed import predict_blocks
from unetkit.workflows.segment import InferenceOptions
from unetkit.workflows.segment_files import predict_files
from unetkit.workflows.segment_outputs import LABEL_FORMATS, OBJECT_TYPES, OutputOptions


def add_tile_flags(p: argparse.ArgumentParser) -> None:
    """Flags of :class:`~unetkit.inference.TileOptions`: defaults and help from its fields."""
    T = TileOptions
    p.add_argument("--tile", type=F.tile_size, default=T.default("tile"), help=T.help("tile"))
    p.add_argument(
        "--overlap",
        type=F.finite_float(0, 1, hi_open=True),
        default=T.default("overlap"),
        help=f"{T.help('overlap')} (default {T.default('overlap')})",
    )
    p.add_argument(
        "--tta",
        action="store_const",
        const=True,
        default=T.default("tta"),
        help=T.help("tta"),
    )
    p.add_argument(
        "--batch-size",
        type=F.positive_int,
        default=T.default("batch_size"),
        help=f"{T.help('batch_size')} (default {T.default('batch_size')})",
    )


def tile_options_from_args(args: argparse.Namespace) -> TileOptions:
    return TileOptions(
        tile=args.tile, overlap=args.overlap, tta=args.tta, batch_size=args.batch_size
    )


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    add_tile_flags(p)
    p.add_argument(
        "--min-size",
        type=F.nonnegative_int,
        default=None,
        help="drop objects with fewer pixels (default: 10%% of the median training "
        "object's area, as the checkpoint records it, else 10)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="auto: bf16 on CPUs/GPUs that compute it natively (on CPUs a frozen copy "
        "with prepacked weights), else fp32 "
        "(default); bf16 forces it; fp32 is exact",
    )
    p.add_argument(
        "--channels",
        help="input channels to use, in order, numbered from 0 (e.g. 1,0: cytoplasm then "
        "nucleus); default: all",
    )
    p.add_argument(
        "--pixel-size",
        type=F.positive_float,
        help="µm per pixel of the inputs (overrides the files' metadata); with a checkpoint "
        "that states its training pixel size, inputs are rescaled to it",
    )
    p.add_argument(
        "--object-diameter",
        type=F.positive_float,
        help="typical object diameter in the inputs (pixels); rescales inputs to the "
        "checkpoint's training object diameter",
    )


def options_from_args(args: argparse.Namespace) -> InferenceOptions:
    return InferenceOptions(
        tiles=tile_options_from_args(args),
        min_size=args.min_size,
        precision=getattr(args, "precision", DEFAULT_PRECISION),
        channels=parse_channels(args.channels),
        pixel_size=args.pixel_size,
        object_diameter=args.object_diameter,
        scene=getattr(args, "scene", None),
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment images: masks, instances, overlays, per-object tables",
        description="Segment images of any size with a trained checkpoint. Per image it "
        "writes <stem>_mask.png, <stem>_instances.png (uint16 labels; uint32 "
        "<stem>_instances.tif above 65,535 objects), <stem>_labels_preview.png (colour), "
        "<stem>_overlay.png and <stem>_objects.csv (area, centroid, intensity; µm when the "
        "pixel size is known); counts.csv grows as images finish, and a re-run skips them.",
    )
    p.add_argument(
        "checkpoint",
        help="a .safetensors checkpoint (e.g. RUN/checkpoints/best.safetensors), a run "
        "directory, a `train --folds K` run directory (its K models' probabilities are "
        "averaged) or an .onnx file from `unetkit export`",
    )
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    add_inference_flags(p)
    p.add_argument(
        "--scene",
        type=F.nonnegative_int,
        help="CZI/ND2/LIF inputs: the scene to read, numbered from 0 (default: the first, "
        "with a warning when a file holds more)",
    )
    p.add_argument(
        "--attention-maps",
        action="store_true",
        help="also write attention heat maps (models with attention gates)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="torch (default for checkpoints) or onnx (onnxruntime; default for .onnx "
        "files; a checkpoint is exported once to CHECKPOINT.onnx next to it)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (falls back to eager with a warning if it fails)",
    )
    add_output_flags(p)
    add_block_flags(p)
    p.set_defaults(run=run)


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """Flags of :class:`~unetkit.workflows.segment_outputs.OutputOptions`."""
    p.add_argument(
        "--labels-format",
        choices=LABEL_FORMATS,
        default=OutputOptions.label_format,
        help="auto: uint16 PNG up to 65,535 objects, else 32-bit TIFF; tif32: always 32-bit TIFF",
    )
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write <stem>_probabilities.tif (float32 C×H×W)",
    )
    p.add_argument(
        "--geojson",
        action="store_true",
        help="also write <stem>.geojson (QuPath: File > Import objects)",
    )
    p.add_argument(
        "--imagej-rois",
        action="store_true",
        help="also write <stem>_RoiSet.zip (Fiji ROI Manager; needs roifile)",
    )
    p.add_argument(
        "--object-type",
        choices=OBJECT_TYPES,
        default=OutputOptions.object_type,
        help="QuPath object type of the GeoJSON features",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo images that an earlier run into --out finished (default: skip them)",
    )


def outputs_from_args(args: argparse.Namespace) -> OutputOptions:
    return OutputOptions(
        label_format=args.labels_format,
        save_probabilities=args.save_probabilities,
        geojson=args.geojson,
        imagej_rois=args.imagej_rois,
        object_type=args.object_type,
        overwrite=args.overwrite,
    )


def add_block_flags(p: argparse.ArgumentParser) -> None:
    """Block-wise prediction of huge images / many images (OME-Zarr out, Dask optional)."""
    g = p.add_argument_group(
        "huge images and many images",
        "with --cluster, --block-size, --level or an OME-Zarr input: block-wise prediction, "
        "one <stem>.zarr (OME-Zarr: mask, labels/instances, pyramids; --save-probabilities "
        "adds probabilities) and <stem>_objects.csv per image; resumable",
    )
    g.add_argument(
        "--cluster",
        help="local:N (a Dask LocalCluster, N single-threaded workers on 127.0.0.1) or "
        "tcp://HOST:PORT (a running `dask scheduler`); default: this process",
    )
    g.add_argument(
        "--block-size",
        type=F.positive_int,
        help="block edge in pixels per task and output chunk "
        f"(default {BlockOptions.block_size})",
    )
    g.add_argument(
        "--label-halo",
        type=F.nonnegative_int,
        default=BlockOptions.label_halo,
        help="extra pixels per block side for the watershed of boundary models "
        "(about the largest object radius)",
    )
    g.add_argument(
        "--level", type=F.nonnegative_int, default=0, help="OME-Zarr resolution level to read"
    )
    g.add_argument(
        "--scheduler-timeout",
        type=F.positive_float,
        default=10.0,
        help="seconds to wait for the --cluster scheduler",
    )


def _block_wise(args: argparse.Namespace) -> bool:
    chosen = args.cluster or args.block_size or args.level
    return bool(chosen) or any(is_zarr(i) for i in args.inputs)


def _refuse_whole_image_flags(args: argparse.Namespace) -> None:
    """Flags of the whole-image path that block-wise predict has no use for: one line each."""
    refused = (
        ("--attention-maps", args.attention_maps, "heat maps are drawn per whole image"),
        ("--backend onnx", args.backend == "onnx", "workers run the checkpoint with torch"),
        ("--compile", args.compile, "each worker would compile for every block shape"),
    )
    for flag, given, why in refused:
        if given:
            raise ConfigError(f"{flag}: not available for block-wise predict ({why}); leave it out")


def run_blocks(args: argparse.Namespace) -> int:
    """Block-wise predict; prints the Dask dashboard address and a progress bar."""
    _refuse_whole_image_flags(args)
    blocks = BlockOptions(
        block_size=args.block_size or BlockOptions.block_size,
        label_halo=args.label_halo,
        level=args.level,
    )
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, unit="block")
        bar = bars[stage]
        bar.n = done
        bar.refresh()

    if not getattr(args, "verbose", False):  # Dask's start-up chatter; -v shows it
        logging.getLogger("distributed").setLevel(logging.WARNING)
    with dask_client(args.cluster, timeout=args.scheduler_timeout) as client:
        if client is not None:
            print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        rows = predict_blocks(
            args.checkpoint, args.inputs, args.out, options_from_args(args), blocks,
            outputs=outputs_from_args(args), client=client, progress=progress,
        )
    for bar in bars.values():
        bar.close()
    for r in rows:
        print(f"{r['image']}: {r['objects']} objects -> {r['output']}")
    print(f"wrote {len(rows)} result(s) to {args.out}/")
    return 0


def run(args: argparse.Namespace) -> int:
    output_folder(args.out, flag="--out", inputs=[args.checkpoint, *args.inputs])
    if _block_wise(args):
        if args.scene is not None:
            raise ConfigError("--scene: block-wise prediction reads the first scene only")
        return run_blocks(args)
    rows = predict_files(
        args.checkpoint,
        args.inputs,
        args.out,
        options_from_args(args),
        outputs=outputs_from_args(args),
        attention_maps=args.attention_maps,
        backend=args.backend,
        compile=args.compile,
    )
    for r in rows:
        what = (
            f"{r['objects']} objects"
            if "min" not in r
            else f"values {r['min']:.3g}..{r['max']:.3g}"
        )
        print(f"{r['image']}: {what}")
    print(f"wrote {len(rows)} result(s) to {args.out}/")
    return 0
