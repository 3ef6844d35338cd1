"""`unetkit inpaint`: repaint the masked region of an image with a diffusion run or a Stable
Diffusion pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from unetkit.cli import flags as F
from unetkit.cli.generate import (
    RUN_GUIDANCE,
    RUN_STEPS,
    SD_GUIDANCE,
    SD_STEPS,
    _or,
    add_sampling_options,
    load_run_loras,
    open_sd,
)
from unetkit.cli.sd_common import (
    check_steps,
    parse_lora,
    progress,
    read_rgb,
    refuse_sd_only_flags,
    sd_size,
)
from unetkit.data.io import write_image
from unetkit.errors import DataError
from unetkit.outputs import output_file
from unetkit.workflows.diffuse import DiffusionPipeline, to_uint8
from unetkit.workflows.sd_pipeline import is_sd_source


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inpaint",
        help="fill a masked region of an image",
        description="Repaint the white pixels of MASK in IMAGE, guided by PROMPT. IMAGE: any "
        "PNG/TIFF (grey or RGB, any size); MASK: an image of the same size, white (>= 50%% "
        "grey) = repaint, black = keep. Both are resized to the model (a diffusion run: its "
        "training size; Stable Diffusion: the nearest multiple of 8) and the resize is "
        "printed; the output has the model's size. A run keeps the unmasked pixels exactly; "
        "SD keeps them in latent space (known-region replacement), or feeds them to a "
        "9-channel SD-inpainting U-Net.",
    )
    p.add_argument("run_dir", metavar="SOURCE", help="run dir, checkpoint, SD folder or SD file")
    p.add_argument("image", help="image to repaint (PNG/TIFF, any size)")
    p.add_argument("mask", help="mask image of the same size, white = repaint")
    p.add_argument("prompt")
    p.add_argument("--output", help="result PNG (default <image>_inpainted.png)")
    p.add_argument(
        "--resample", type=F.positive_int, default=1, help="runs: RePaint resampling per step"
    )
    p.add_argument(
        "--strength",
        type=F.finite_float(0, 1, lo_open=True),
        default=1.0,
        help="SD: noise level of the start (0-1, 1)",
    )
    add_sampling_options(p)
    p.set_defaults(run=run)


def _load_pair(args: argparse.Namespace, size: tuple[int, int] | None, grey: bool):
    image, note = read_rgb(args.image, size)
    if size is None:
        size = tuple(image.shape[-2:])
    mask, mask_note = read_rgb(args.mask, size, mask=True)
    for n in (note, mask_note):
        if n:
            print(f"{n} (the model's size)")
    if not mask.any():
        raise DataError(f"{args.mask}: mask has no white pixels, nothing to inpaint")
    return (image.mean(0, keepdim=True) if grey else image), mask


def _run_sd(args: argparse.Namespace) -> tuple:
    sd = open_sd(args)
    image, _ = read_rgb(args.image, None)
    image, mask = _load_pair(args, sd_size(*image.shape[-2:], sd.codec.scale), grey=False)
    steps = check_steps(args.steps or SD_STEPS, sd.schedule)
    guidance = _or(args.guidance, SD_GUIDANCE)
    callback, close = progress(steps, "inpainting", args.no_progress)
    try:
        out = sd.inpaint(
            image, mask, [args.prompt], strength=args.strength, negative=args.negative,
            steps=steps, guidance=guidance, seed=args.seed, callback=callback,
        )  # fmt: skip
    finally:
        close()
    return out.clamp(-1, 1), mask


def _run_pixels(args: argparse.Namespace) -> tuple:
    refuse_sd_only_flags(args, "negative", "tokenizer")
    pipe = DiffusionPipeline.from_checkpoint(
        args.run_dir,
        text_encoder=args.text_encoder,
        sampler=args.sampler,
        precision=args.precision,
    )
    if pipe.channels not in (1, 3):
        raise DataError(f"{args.run_dir}: inpainting needs a 1- or 3-channel model")
    load_run_loras(pipe, args.lora)
    image, mask = _load_pair(args, (pipe.size, pipe.size), grey=pipe.channels == 1)
    out = pipe.inpaint(
        image,
        mask,
        args.prompt,
        steps=check_steps(args.steps or RUN_STEPS, pipe.schedule),
        guidance=_or(args.guidance, RUN_GUIDANCE),
        resample=args.resample,
        seed=args.seed,
    )
    return out, mask


def run(args: argparse.Namespace) -> int:
    default = Path(args.image).with_name(Path(args.image).stem + "_inpainted.png")
    inputs = [args.run_dir, args.image, args.mask, *(parse_lora(s)[0] for s in args.lora)]
    path = output_file(args.output or default, flag="--output", inputs=inputs)
    for given in (args.image, args.mask):  # before the model is loaded (seconds to minutes)
        if not Path(given).is_file():
            raise DataError(f"{given}: file not found")
    out, mask = (_run_sd if is_sd_source(args.run_dir) else _run_pixels)(args)
    write_image(path, to_uint8(out)[0])
    print(f"wrote {path} ({int(mask.sum())} pixels repainted)")
    return 0
