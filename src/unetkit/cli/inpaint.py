"""`unetkit inpaint`: fill the masked region of an image with a diffusion run."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from unetkit.cli import flags as F
from unetkit.cli.generate import add_sampling_options
from unetkit.errors import DataError, NonFiniteError
from unetkit.outputs import output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inpaint",
        help="fill a masked region of an image",
        description="Repaint the white (non-zero) pixels of MASK in IMAGE guided by PROMPT; "
        "the other pixels are kept exactly.",
    )
    p.add_argument("run_dir", metavar="RUN", help="run directory or checkpoint file")
    p.add_argument("image", help="PNG/TIFF image of the run's size and channels")
    p.add_argument("mask", help="mask image, white = repaint")
    p.add_argument("prompt")
    p.add_argument("--output", help="result PNG (default <image>_inpainted.png)")
    p.add_argument(
        "--resample", type=F.positive_int, default=1, help="RePaint resampling per step (1)"
    )
    add_sampling_options(p)
    p.set_defaults(run=run)


def _load(path: str, channels: int, size: int) -> torch.Tensor:
    from unetkit.data.io import read_image

    arr = np.asarray(read_image(path), dtype=np.float32)
    bad = int((~np.isfinite(arr)).sum())
    if bad:  # one NaN pixel would turn the whole sample (kept pixels too) black
        raise NonFiniteError(f"{path}: image holds {bad} NaN/inf pixel value(s); fix the file")
    if arr.ndim not in (2, 3):
        raise DataError(f"{path}: a {arr.ndim}D array is not a 2D image (a volume?)")
    if arr.ndim == 3 and channels == 1:
        arr = arr[..., :3].mean(-1)
    if arr.ndim == 2:
        arr = arr[..., None].repeat(channels, -1)
    if arr.shape[:2] != (size, size) or arr.shape[2] < channels:
        raise DataError(
            f"{path}: image is {arr.shape[1]}x{arr.shape[0]} with {arr.shape[2]} channel(s); "
            f"the model makes {size}x{size} with {channels}. Resize it first"
        )
    scale = 65535.0 if arr.max() > 255 else 255.0
    return torch.from_numpy(arr[..., :channels] / scale).permute(2, 0, 1) * 2 - 1


def run(args: argparse.Namespace) -> int:
    from unetkit.data.io import write_image
    from unetkit.workflows.diffuse import DiffusionPipeline, to_uint8

    default = Path(args.image).with_name(Path(args.image).stem + "_inpainted.png")
    path = output_file(
        args.output or default, flag="--output", inputs=[args.run_dir, args.image, args.mask]
    )
    pipe = DiffusionPipeline.from_checkpoint(
        args.run_dir,
        text_encoder=args.text_encoder,
        sampler=args.sampler,
        precision=args.precision,
    )
    image = _load(args.image, pipe.channels, pipe.size)
    mask = (_load(args.mask, 1, pipe.size) > 0).float()
    if not mask.any():
        raise DataError(f"{args.mask}: mask has no white pixels, nothing to inpaint")
    out = pipe.inpaint(
        image,
        mask,
        args.prompt,
        steps=args.steps,
        guidance=args.guidance,
        resample=args.resample,
        seed=args.seed,
    )
    write_image(path, to_uint8(out)[0])
    print(f"wrote {path} ({int(mask.sum())} pixels repainted)")
    return 0
