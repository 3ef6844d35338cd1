"""`unetkit convert`: diffusion U-Net weights between diffusers, LDM and unetkit files."""

from __future__ import annotations

import argparse
from pathlib import Path

from unetkit.formats.unet_files import FORMATS, detect_unet_format, read_unet, write_unet
from unetkit.outputs import output_file, output_folder


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert diffusion U-Net weights: diffusers <-> LDM <-> unetkit",
        description="Read SOURCE (a diffusers UNet2DConditionModel directory or pipeline root, "
        "an original LDM/CompVis .safetensors, or a unetkit checkpoint; detected) and write "
        "DEST in the --to format. The U-Net config is read from the folder's config.json, "
        "the file's metadata, or inferred from an LDM file's tensor shapes (SD 1.x/2.x, "
        "inpainting). A unetkit diffusion run's schedule and text-encoder facts travel along, "
        "so `unetkit generate` accepts the result. Keys that do not match are an error that "
        "lists them.",
    )
    p.add_argument("source", help="diffusers dir, LDM .safetensors or unetkit .safetensors")
    p.add_argument("dest", help="output directory (diffusers) or .safetensors file")
    p.add_argument("--from", dest="src_format", choices=FORMATS, help="default: detected")
    p.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)
    p.add_argument(
        "--config",
        help="LDM sources only, rarely needed: override the config read from the file or "
        "inferred from its shapes, with a diffusers config.json or a diffusion-unet preset",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    src, dest = Path(args.source), Path(args.dest)
    guard = output_folder if args.dst_format == "diffusers" else output_file
    guard(dest, flag="DEST", inputs=[src, args.config])
    fmt = args.src_format or detect_unet_format(src)
    model, diffusion = read_unet(src, fmt, config=args.config)
    write_unet(model, dest, args.dst_format, diffusion=diffusion)
    n = sum(p.numel() for p in model.parameters())
    kept = " (diffusion metadata kept)" if diffusion else ""
    print(f"converted {src} ({fmt}) -> {dest} ({args.dst_format}), {n:,} parameters{kept}")
    return 0
