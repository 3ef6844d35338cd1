"""`unetkit predict`: images or folders in; masks, instance labels, overlays, counts out."""

from __future__ import annotations

import argparse

from unetkit.cli import flags as F
from unetkit.data.io import parse_channels
from unetkit.inference.backends import BACKENDS
from unetkit.outputs import output_folder
from unetkit.runtime import DEFAULT_PRECISION, PRECISIONS
from unetkit.workflows.segment import InferenceOptions
from unetkit.workflows.segment_files import predict_files
from unetkit.workflows.segment_outputs import LABEL_FORMATS, OBJECT_TYPES, OutputOptions


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=F.tile_size, help="tile size (default: whole image if it fits)")
    p.add_argument(
        "--overlap",
        type=F.finite_float(0, 1, hi_open=True),
        default=0.25,
        help="sliding-window overlap",
    )
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--batch-size", type=F.positive_int, default=4, help="tiles per forward pass")
    p.add_argument(
        "--min-size", type=F.nonnegative_int, default=10, help="drop objects smaller (px)"
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
        tile=args.tile,
        overlap=args.overlap,
        tta=args.tta,
        batch_size=args.batch_size,
        min_size=args.min_size,
        precision=getattr(args, "precision", DEFAULT_PRECISION),
        channels=parse_channels(args.channels),
        pixel_size=args.pixel_size,
        object_diameter=args.object_diameter,
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
        help="a .safetensors checkpoint (e.g. RUN/checkpoints/best.safetensors) or an "
        ".onnx file from `unetkit export`",
    )
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    add_inference_flags(p)
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


def run(args: argparse.Namespace) -> int:
    output_folder(args.out, flag="--out", inputs=[args.checkpoint, *args.inputs])
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
