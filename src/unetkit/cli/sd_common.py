"""Shared pieces of `generate` / `inpaint` for Stable Diffusion sources and diffusion runs:
LoRA flags, progress bars, image loading with resizing (stated, never silent)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit.data.io import read_image
from unetkit.errors import ConfigError, DataError, NonFiniteError


def add_sd_options(p: argparse.ArgumentParser) -> None:
    """Flags of Stable Diffusion sources (and --lora, which works for runs too)."""
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="stack a LoRA file or folder (any layout: unetkit, diffusers, PEFT, Kohya, "
        "LyCORIS LoCon) with a scale, default 1; repeatable: --lora a.safetensors:0.8 "
        "--lora b/:0.5",
    )
    p.add_argument("--negative", default="", help="negative prompt (SD sources)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder (vocab.json + merges.txt or tokenizer.json) for a single-file "
        "SD checkpoint, which carries none",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_lora(spec: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` → (file, scale); a Windows drive colon or a folder path is kept."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        value = float(scale)
    except ValueError:
        if Path(spec).exists():
            return spec, 1.0
        raise ConfigError(f"--lora {spec!r}: expected FILE or FILE:SCALE with a number") from None
    if not math.isfinite(value):  # a NaN scale writes NaN into every adapted weight
        raise ConfigError(f"--lora {spec!r}: the scale must be a finite number")
    return path, value


def check_steps(steps: int, schedule: Any) -> int:
    """``--steps``, or a ConfigError when the model's schedule has fewer timesteps."""
    limit = schedule.num_train_timesteps
    if steps > limit:
        raise ConfigError(
            f"--steps {steps}: the model was trained with {limit} timesteps; "
            f"use --steps {limit} or fewer"
        )
    return steps


def refuse_sd_only_flags(args: argparse.Namespace, *dests: str) -> None:
    """ConfigError for a Stable-Diffusion-only flag given with a diffusion run: a run has
    no negative prompt, tokenizer, image-to-image or free size, and a flag is never
    ignored silently."""
    for dest in dests:
        if getattr(args, dest, None):
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(
                f"{flag}: applies to Stable Diffusion sources only; {args.run_dir} is a "
                f"diffusion run or checkpoint (leave {flag} out)"
            )


def progress(total: int, what: str, disabled: bool) -> tuple[Any, Any]:
    """``(callback(i, n), close)`` drawing a tqdm bar on stderr (nothing when disabled)."""
    if disabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit="step", file=sys.stderr, leave=False)

    def callback(i: int, n: int, *_: Any) -> None:
        bar.total = n
        bar.n = i
        bar.refresh()

    return callback, bar.close


def read_rgb(
    path: str, size: tuple[int, int] | None, *, mask: bool = False
) -> tuple[torch.Tensor, str]:
    """An image file as (C, H, W) in [-1, 1] (RGB) or a (1, H, W) mask in {0, 1}, resized to
    ``size`` (H, W) if given (bicubic; masks nearest). Returns the tensor and a note on the
    resize ('' if none)."""
    from PIL import Image

    arr = np.asarray(read_image(path))
    if arr.ndim not in (2, 3):
        raise DataError(f"{path}: a {arr.ndim}D array is not a 2D image (grey or RGB)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())  # one NaN pixel would blacken the whole sample
        raise NonFiniteError(f"{path}: image holds {bad} NaN/inf pixel value(s); fix the file")
    if arr.dtype != np.uint8:
        top = 65535.0 if arr.max() > 255 else 255.0
        arr = (np.clip(arr.astype(np.float64) / top, 0, 1) * 255).round().astype(np.uint8)
    if mask:
        arr = arr if arr.ndim == 2 else arr[..., :3].mean(-1).astype(np.uint8)
    elif arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    else:
        arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr[..., :1], 3, -1)
    note = ""
    h, w = arr.shape[:2]
    if size is not None and (h, w) != tuple(size):
        img = Image.fromarray(arr)
        arr = np.asarray(img.resize((size[1], size[0]), Image.NEAREST if mask else Image.BICUBIC))
        note = f"{Path(path).name} resized {w}x{h} -> {size[1]}x{size[0]}"
    x = torch.from_numpy(arr.astype(np.float32) / 255.0)
    if mask:
        return (x[None] >= 0.5).float(), note
    return x.permute(2, 0, 1) * 2 - 1, note


def sd_size(h: int, w: int, scale: int) -> tuple[int, int]:
    """The nearest size the VAE accepts (multiples of ``scale``, at least one)."""
    return max(scale, round(h / scale) * scale), max(scale, round(w / scale) * scale)
