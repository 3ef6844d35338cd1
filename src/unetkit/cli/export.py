"""`unetkit export`: a checkpoint to ONNX (onnxruntime-checked) and/or a torch.export program."""

from __future__ import annotations

import argparse
from pathlib import Path

from unetkit.cli import flags as F
from unetkit.errors import ConfigError
from unetkit.formats.onnx import DEFAULT_OPSET, EXPORTERS
from unetkit.outputs import output_file
from unetkit.workflows.segment import check_inference_metadata


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (dynamic batch/size) or a torch.export program",
        description="Write CHECKPOINT as an ONNX graph with dynamic batch, height and width "
        "(checked against PyTorch with onnxruntime at two other sizes before it is written) "
        "and/or as a torch.export program (.pt2; dynamic batch, fixed size). The checkpoint's "
        "config and normalisation travel in the file, so `unetkit predict FILE.onnx` works.",
    )
    p.add_argument("checkpoint", help="a unetkit .safetensors checkpoint")
    p.add_argument("--onnx", metavar="FILE", help="write an ONNX model here")
    p.add_argument("--torch-export", metavar="FILE", help="write a torch.export .pt2 here")
    p.add_argument(
        "--opset", type=F.int_at_least(7), default=DEFAULT_OPSET, help="ONNX opset (default 17)"
    )
    p.add_argument(
        "--size",
        type=F.positive_int,
        nargs="+",
        metavar="N",
        help="spatial example size (one number per axis, or one for all); default from the "
        "model's size planner. Fixed-size graphs (--static, --torch-export) take only it",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="fix the ONNX spatial size to --size (for Swin-Unet / TransUNet, whose "
        "shape logic cannot be traced dynamically); the batch stays dynamic",
    )
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="torchscript",
        help="torchscript (default; dynamic H/W) or dynamo (torch.export-based; needs --static)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.onnx and not args.torch_export:
        raise ConfigError("nothing to write: pass --onnx FILE and/or --torch-export FILE")
    for flag, path in (("--onnx", args.onnx), ("--torch-export", args.torch_export)):
        if path:
            output_file(path, flag=flag, inputs=[args.checkpoint])
    if (
        args.onnx
        and args.torch_export
        and Path(args.onnx).resolve() == Path(args.torch_export).resolve()
    ):
        raise ConfigError(f"--onnx and --torch-export name the same file {args.onnx}")
    from unetkit.formats.checkpoint import load, read_metadata
    from unetkit.formats.loading import user_metadata

    meta = read_metadata(args.checkpoint)  # CheckpointError (one line) for other files
    check_inference_metadata(meta, source=args.checkpoint)  # e.g. a diffusion U-Net
    model = load(args.checkpoint)
    extra = user_metadata(meta)
    size = None
    if args.size:
        size = tuple(args.size) * model.dims if len(args.size) == 1 else tuple(args.size)
    if args.onnx:
        from unetkit.formats.onnx import export_onnx, read_onnx_metadata

        export_onnx(
            model,
            args.onnx,
            opset=args.opset,
            dynamic_spatial=not args.static,
            size=size,
            metadata=extra,
            exporter=args.exporter,
        )
        info = read_onnx_metadata(args.onnx)["onnx"]
        shape = "dynamic" if info["dynamic_spatial"] else "×".join(map(str, info["size"]))
        print(f"wrote {args.onnx} (opset {info['opset']}, batch dynamic, size {shape})")
    if args.torch_export:
        from unetkit.formats.torch_export import export_torch

        path = export_torch(model, args.torch_export, size=size, metadata=extra)
        print(f"wrote {path} (torch.export, batch dynamic)")
    return 0
