"""`unetkit convert`: diffusion U-Net weights between diffusers, LDM and unetkit files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unetkit.errors import CheckpointError
from unetkit.outputs import output_file, output_folder

FORMATS = ("diffusers", "ldm", "unetkit")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert diffusion U-Net weights: diffusers <-> LDM <-> unetkit",
        description="Read SOURCE (a diffusers UNet2DConditionModel directory, an original "
        "LDM/CompVis U-Net .safetensors, or a unetkit checkpoint) and write DEST in the "
        "--to format. Keys that do not match the model are an error that lists them.",
    )
    p.add_argument("source", help="diffusers dir, LDM .safetensors or unetkit .safetensors")
    p.add_argument("dest", help="output directory (diffusers) or .safetensors file")
    p.add_argument("--from", dest="src_format", choices=FORMATS, help="default: detected")
    p.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)
    p.add_argument(
        "--config",
        help="U-Net config for LDM sources: a diffusers config.json, or a preset name of "
        "diffusion-unet (default sd15)",
    )
    p.set_defaults(run=run)


def detect_format(path: Path) -> str:
    """diffusers (a directory), unetkit (our metadata) or ldm (model.diffusion_model keys)."""
    if path.is_dir():
        return "diffusers"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: only .safetensors files are read (pickled .ckpt/.bin files can run "
            f"code when loaded); convert it with a trusted tool first"
        )
    from safetensors import safe_open

    from unetkit.formats import checkpoint

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") == checkpoint.FORMAT:
            return "unetkit"
        if any(k.startswith(("model.diffusion_model.", "input_blocks.")) for k in f):
            return "ldm"
    raise CheckpointError(
        f"{path}: neither a unetkit checkpoint nor an LDM U-Net (no model.diffusion_model.* "
        f"keys); pass --from to say what it is"
    )


def _ldm_config(spec: str | None):
    from unetkit.formats.diffusers import config_from_diffusers
    from unetkit.registry import build_config

    if spec and Path(spec).is_file():
        return config_from_diffusers(json.loads(Path(spec).read_text()))
    return build_config("diffusion-unet", preset=spec or "sd15")


def load_any(path: Path, fmt: str, config: str | None):
    from unetkit.formats import checkpoint, diffusers, ldm

    if fmt == "diffusers":
        return diffusers.load_diffusers_unet(path)
    if fmt == "ldm":
        return ldm.load_ldm_unet(path, _ldm_config(config))
    return checkpoint.load(path)


def run(args: argparse.Namespace) -> int:
    from unetkit.formats import checkpoint, diffusers, ldm

    src = Path(args.source)
    guard = output_folder if args.dst_format == "diffusers" else output_file
    guard(args.dest, flag="DEST", inputs=[src, args.config])
    fmt = args.src_format or detect_format(src)
    model = load_any(src, fmt, args.config)
    dest = Path(args.dest)
    if args.dst_format == "diffusers":
        diffusers.save_diffusers_unet(model, dest)
    elif args.dst_format == "ldm":
        ldm.save_ldm_unet(model, dest)
    else:
        checkpoint.save(model, dest)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {src} ({fmt}) -> {dest} ({args.dst_format}), {n:,} parameters")
    return 0
