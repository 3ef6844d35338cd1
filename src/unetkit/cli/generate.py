"""`unetkit generate`: prompts -> images with a diffusion run, a checkpoint, or a Stable
Diffusion pipeline folder / single-file checkpoint."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from unetkit.cli import flags as F
from unetkit.cli.sd_common import (
    add_sd_options,
    check_steps,
    parse_lora,
    progress,
    read_rgb,
    refuse_sd_only_flags,
    sd_size,
)
from unetkit.data.io import write_image
from unetkit.diffusion.samplers import SCHEDULER_NAMES
from unetkit.errors import ConfigError
from unetkit.formats.loading import base_checkpoint, is_adapter_file
from unetkit.formats.lora_files import load_adapter, read_adapter
from unetkit.outputs import output_file, output_folder
from unetkit.runtime import DEFAULT_PRECISION, PRECISIONS
from unetkit.workflows.diffuse import DiffusionPipeline, save_grid, to_uint8
from unetkit.workflows.sd_pipeline import StableDiffusion, is_sd_source

SD_STEPS, SD_GUIDANCE, RUN_STEPS, RUN_GUIDANCE = 25, 7.5, 50, 3.0


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Options shared by generate and inpaint."""
    p.add_argument(
        "--steps",
        type=F.positive_int,
        help=f"sampler steps ({RUN_STEPS} for runs, {SD_STEPS} for SD)",
    )
    p.add_argument(
        "--guidance",
        type=F.nonnegative_float,
        help=f"classifier-free guidance ({RUN_GUIDANCE:g} for runs, {SD_GUIDANCE:g} for SD)",
    )
    p.add_argument(
        "--sampler", choices=SCHEDULER_NAMES, help="default: the run's / the SD scheduler file's"
    )
    p.add_argument("--seed", type=F.nonnegative_int, default=0)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULT_PRECISION,
        help="auto (default): bf16 where the CPU/GPU computes it natively (on CPUs a frozen "
        "bf16 copy with prepacked weights, ~2x faster), else fp32. SD: the U-Net only",
    )
    p.add_argument("--text-encoder", help="override the run's text encoder (runs only)")
    add_sd_options(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images from a text prompt",
        description="Sample images for PROMPT from a diffusion run directory or checkpoint, "
        "or from a Stable Diffusion pipeline folder (diffusers layout: unet, vae, "
        "text_encoder, tokenizer, scheduler) or original single-file .safetensors; writes a "
        "PNG grid (and one PNG per sample with --out). With --image: image-to-image.",
    )
    p.add_argument("run_dir", metavar="SOURCE", help="run dir, checkpoint, SD folder or SD file")
    p.add_argument("prompt", help='e.g. "a handwritten digit three"')
    p.add_argument("--n", type=F.positive_int, default=16, help="number of samples (16; SD: 1)")
    p.add_argument("--grid", help="grid PNG path (default <prompt>.png)")
    p.add_argument("--out", help="folder for one PNG per sample")
    p.add_argument("--image", help="SD image-to-image: start from this picture")
    p.add_argument(
        "--strength",
        type=F.finite_float(0, 1, lo_open=True),
        default=0.8,
        help="img2img: how much to change (0-1, 0.8)",
    )
    p.add_argument("--height", type=F.positive_int, help="SD: image height (default: the model's)")
    p.add_argument("--width", type=F.positive_int, help="SD: image width (default: the model's)")
    add_sampling_options(p)
    p.set_defaults(run=run)


def _or(value: float | None, default: float) -> float:
    """A flag's value, or the source kind's default when it was not given (0 is a value)."""
    return default if value is None else value


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "sample"


def open_sd(args: argparse.Namespace):
    """The Stable Diffusion pipeline of ``args.run_dir`` with its LoRA files loaded."""
    sd = StableDiffusion.from_pretrained(
        args.run_dir, tokenizer=args.tokenizer, sampler=args.sampler, precision=args.precision
    )
    for spec in args.lora:
        sd.load_lora(*parse_lora(spec))
    print(f"using {sd.describe()}")
    return sd


def load_run_loras(pipe: DiffusionPipeline, specs: list[str]) -> None:
    """Stack the ``--lora FILE[:SCALE]`` files onto a diffusion run's U-Net."""
    for i, spec in enumerate(specs):
        file, scale = parse_lora(spec)
        load_adapter(pipe.model, file, adapter_name=f"lora{i}", scale=scale)


def _run_sd(args: argparse.Namespace) -> int:
    sd = open_sd(args)
    scale = sd.codec.scale
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % scale:  # the VAE halves the image log2(scale) times
            near = max(scale, round(value / scale) * scale)
            raise ConfigError(f"{flag} {value}: must be a multiple of {scale}, e.g. {near}")
    n = args.n if args.n != 16 else 1  # 16 is the digits default; one SD image unless asked
    steps = check_steps(args.steps or SD_STEPS, sd.schedule)
    guidance = _or(args.guidance, SD_GUIDANCE)
    callback, close = progress(steps, "sampling", args.no_progress)
    try:
        if args.image:
            image, _ = read_rgb(args.image, None)
            size = sd_size(*image.shape[-2:], sd.codec.scale)
            image, note = read_rgb(args.image, size)
            if note:
                print(f"{note} (a multiple of {sd.codec.scale})")
            images = sd.img2img(
                image, [args.prompt] * n, strength=args.strength, negative=args.negative,
                steps=steps, guidance=guidance, seed=args.seed, callback=callback,
            )  # fmt: skip
        else:
            images = sd.txt2img(
                [args.prompt] * n, negative=args.negative, steps=steps, guidance=guidance,
                seed=args.seed, height=args.height, width=args.width, callback=callback,
            )  # fmt: skip
    finally:
        close()
    _write(args, images.clamp(-1, 1), f"{n} images, {steps} steps, guidance {guidance:g}")
    return 0


def _write(args: argparse.Namespace, images, what: str) -> None:
    grid = _grid(args)
    save_grid(images, grid)
    print(f"wrote {grid} ({what})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(to_uint8(images)):
            write_image(out / f"{slug(args.prompt)}_{i:03d}.png", img)
        print(f"wrote {len(images)} PNGs to {out}/")


def _grid(args: argparse.Namespace) -> Path:
    return Path(args.grid or f"{slug(args.prompt)}.png")


def run(args: argparse.Namespace) -> int:
    # check both outputs before sampling: nothing is written (not even the grid in the
    # working folder) when one of them is refused
    inputs = [args.run_dir, args.image, *(parse_lora(s)[0] for s in args.lora)]
    output_file(_grid(args), flag="--grid", inputs=inputs)
    if args.out:
        output_folder(args.out, flag="--out", inputs=inputs)
    if is_sd_source(args.run_dir):
        return _run_sd(args)
    refuse_sd_only_flags(args, "image", "height", "width", "negative", "tokenizer")
    pipe = DiffusionPipeline.from_checkpoint(
        args.run_dir,
        text_encoder=args.text_encoder,
        sampler=args.sampler,
        precision=args.precision,
    )
    load_run_loras(pipe, args.lora)
    loras = [f"{Path(f).name}:{s:g}" for f, s in map(parse_lora, args.lora)]
    file = base_checkpoint(args.run_dir)
    if is_adapter_file(file):  # a LoRA run: its adapter sits on the base it names
        loras.insert(0, f"{file.name}:1 (the run's own adapter)")
        file = Path(read_adapter(file).info.get("base_model") or file)
    used = ", ".join(loras) or "none"
    print(f"using base {file}; LoRA {used}; sampler {args.sampler or pipe.sampler}")
    steps = check_steps(args.steps or RUN_STEPS, pipe.schedule)
    guidance = _or(args.guidance, RUN_GUIDANCE)
    callback, close = progress(steps, "sampling", args.no_progress)
    try:
        images = pipe.generate(
            [args.prompt] * args.n, steps=steps, guidance=guidance, seed=args.seed,
            callback=None if callback is None else lambda i, t, x: callback(i + 1, steps),
        )  # fmt: skip
    finally:
        close()
    _write(args, images, f"{args.n} samples, {steps} steps, guidance {guidance:g}")
    return 0
