"""`unetkit export`: a checkpoint to ONNX (onnxruntime-checked), a torch.export program and/or
a bioimage.io model package."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from unetkit.cli import flags as F
from unetkit.errors import ConfigError, DataError
from unetkit.formats.bioimageio import PackageInfo, default_test_image, export_package
from unetkit.formats.bioimageio_load import check_package
from unetkit.formats.checkpoint import load, read_metadata
from unetkit.formats.loading import load_with_metadata, user_metadata
from unetkit.formats.onnx import DEFAULT_OPSET, EXPORTERS, export_onnx, read_onnx_metadata
from unetkit.formats.torch_export import export_torch
from unetkit.nn.lora_inject import lora_layers, merge_and_unload
from unetkit.outputs import output_file
from unetkit.workflows.pictures import overlay
from unetkit.workflows.segment import check_inference_metadata, predict_image
from unetkit.workflows.segment_files import read_float_input


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (dynamic batch/size), a torch.export program or a "
        "bioimage.io model package",
        description="Write CHECKPOINT as an ONNX graph with dynamic batch, height and width "
        "(checked against PyTorch with onnxruntime at two other sizes before it is written) "
        "and/or as a torch.export program (.pt2; dynamic batch, fixed size). The checkpoint's "
        "config and normalisation travel in the file, so `unetkit predict FILE.onnx` works. "
        "--bioimageio writes a bioimage.io model zoo package (see its flags below).",
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
    add_bioimageio_flags(p)
    p.set_defaults(run=run)


def add_bioimageio_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "bioimage.io package",
        "a model zoo package (rdf.yaml 0.5, ONNX + PyTorch state-dict weights, test tensors, "
        "cover) for deepImageJ/Fiji, ilastik, napari and bioimage.io; CHECKPOINT may be a "
        "LoRA adapter file (exported merged into its base)",
    )
    g.add_argument("--bioimageio", metavar="OUT.zip", help="write a bioimage.io package here")
    g.add_argument("--name", help="model name (default: the checkpoint's run/file name)")
    g.add_argument("--description", help="one or two sentences on what the model segments")
    g.add_argument(
        "--authors",
        nargs="+",
        metavar="NAME",
        help="author names (required unless the checkpoint metadata has 'authors')",
    )
    g.add_argument("--license", help="SPDX licence id (default: checkpoint's, else CC-BY-4.0)")
    g.add_argument(
        "--cite",
        nargs=2,
        action="append",
        default=[],
        metavar=("TEXT", "DOI"),
        help="a citation (repeatable); the U-Net paper is always cited",
    )
    g.add_argument("--tags", nargs="+", default=[], help="extra keywords")
    g.add_argument(
        "--training-data",
        metavar="TEXT",
        help="what the model was trained on (default: from RUN/config.json)",
    )
    g.add_argument(
        "--test-image",
        metavar="FILE",
        help="image for the package's test tensors and cover (default: synthetic cells)",
    )
    g.add_argument(
        "--check",
        action="store_true",
        help="run bioimageio.core's test on the written package (offline)",
    )


# a test image of a few pixels fails inside the export ("No functions provided to try");
# refused with one line instead
MIN_TEST_EDGE = 32


def run(args: argparse.Namespace) -> int:
    if not args.onnx and not args.torch_export and not args.bioimageio:
        raise ConfigError(
            "nothing to write: pass --onnx FILE, --torch-export FILE and/or --bioimageio OUT.zip"
        )
    inputs = [args.checkpoint, args.test_image]
    written: dict[Path, str] = {}
    for flag, path in (
        ("--onnx", args.onnx),
        ("--torch-export", args.torch_export),
        ("--bioimageio", args.bioimageio),
    ):
        if path:
            output_file(path, flag=flag, inputs=inputs)
            other = written.setdefault(Path(path).resolve(), flag)
            if other != flag:  # the second file would replace the first
                raise ConfigError(f"{other} and {flag} name the same file {path}")
    if args.bioimageio:
        run_bioimageio(args)
        if not args.onnx and not args.torch_export:
            return 0
    meta = read_metadata(args.checkpoint)  # CheckpointError (one line) for other files
    check_inference_metadata(meta, source=args.checkpoint)  # e.g. a diffusion U-Net
    model = load(args.checkpoint)
    extra = user_metadata(meta)
    size = None
    if args.size:
        size = tuple(args.size) * model.dims if len(args.size) == 1 else tuple(args.size)
        if len(size) != model.dims:
            raise ConfigError(
                f"--size {' '.join(map(str, args.size))}: give 1 or {model.dims} numbers for "
                f"this {model.dims}-D model"
            )
    if args.onnx:
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
        path = export_torch(model, args.torch_export, size=size, metadata=extra)
        print(f"wrote {path} (torch.export, batch dynamic)")
    return 0


def _training_data(checkpoint: Path) -> str | None:
    """A sentence on the training images from the run's config.json (RUN/checkpoints/X)."""
    config = checkpoint.resolve().parent.parent / "config.json"
    if checkpoint.resolve().parent.name != "checkpoints" or not config.is_file():
        return None  # not in a run folder: a config.json two levels up is someone else's
    try:
        run = json.loads(config.read_text(encoding="utf-8")).get("run", {})
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, or not an object
        raise DataError(
            f"{config}: cannot read the run's config ({type(e).__name__}); fix it or pass "
            "--training-data TEXT"
        ) from None
    if not isinstance(run, dict):
        raise DataError(f"{config}: 'run' is not a table; fix it or pass --training-data TEXT")
    if run.get("data"):
        what = f"the annotated images in {Path(run['data']).name}/"
    else:
        what = (
            f"{run.get('synthetic_train')} synthetic {run.get('synthetic_style')} cell "
            f"images of {run.get('synthetic_size')} px (unetkit.data.synthetic)"
        )
    return (
        f"{what}; {run.get('epochs')} epochs, crop {run.get('crop')}, loss {run.get('loss')}"
        f", normalisation {run.get('normalize')}, target {run.get('target')}"
    )


def _package_info(args: argparse.Namespace, meta: dict[str, Any]) -> PackageInfo:
    path = Path(args.checkpoint)
    run_name = path.resolve().parent.parent.name if path.parent.name == "checkpoints" else None
    authors = args.authors or meta.get("authors")
    if not authors:
        raise ConfigError("--authors: a bioimage.io package needs at least one author name")
    name = args.name or f"unetkit {meta['model']} {run_name or path.stem}"
    return PackageInfo(
        name=name,
        description=args.description
        or f"{meta['model']} ({meta.get('target', 'semantic')} target) segmentation model "
        "trained with unetkit.",
        authors=tuple([authors] if isinstance(authors, str) else authors),
        license=args.license or meta.get("license") or "CC-BY-4.0",
        cite=tuple((text, doi) for text, doi in args.cite),
        tags=tuple(args.tags),
        training_data=args.training_data or _training_data(path),
    )


def run_bioimageio(args: argparse.Namespace) -> None:
    """Load (a LoRA adapter merged into its base), picture and package the model."""
    model, meta = load_with_metadata(args.checkpoint)
    check_inference_metadata(meta, source=args.checkpoint)  # e.g. a diffusion U-Net
    if lora_layers(model):
        model = merge_and_unload(model)
    info = _package_info(args, meta)
    volumes = model.dims == 3
    if args.test_image:
        image = read_float_input(Path(args.test_image), volumes=volumes)
        if image.shape[0] != model.in_channels or min(image.shape[1:]) < MIN_TEST_EDGE:
            raise DataError(
                f"--test-image {args.test_image}: {image.shape[0]} channel(s) of "
                f"{'×'.join(map(str, image.shape[1:]))} pixels; the package's test needs "
                f"{model.in_channels} channel(s) and at least {MIN_TEST_EDGE} pixels per side"
            )
    else:
        image = default_test_image(model)
    instances = predict_image(model, image, meta).instances
    picture = image
    if volumes:  # the cover shows the middle slice
        picture, instances = image[:, image.shape[1] // 2], instances[instances.shape[0] // 2]
    cover = overlay(picture, instances)
    path = export_package(model, meta, args.bioimageio, info, test_image=image, cover=cover)
    print(f"wrote {path} (bioimage.io model 0.5: onnx + pytorch_state_dict weights)")
    if args.check:
        summary = check_package(path)
        if summary.status != "passed":
            failed = [d.name for d in summary.details if d.status != "passed"]
            raise ConfigError(f"{path}: bioimageio.core test failed: {'; '.join(failed)}")
        print(f"{path}: bioimageio.core test passed ({len(summary.details)} checks)")
