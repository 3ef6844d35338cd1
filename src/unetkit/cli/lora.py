"""`unetkit lora-train | lora-merge | lora-convert | lora-verify`: LoRA adapters end to end.

Registered as four sub-commands (see ``COMMANDS`` in main.py); this module holds them all
because they share the adapter options and are each a thin call into the library.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from unetkit.cli import flags as F
from unetkit.errors import CheckpointError, ConfigError, NonFiniteError, OutputError
from unetkit.finite import check_finite_tensors
from unetkit.formats.checkpoint import load, read_metadata, save
from unetkit.formats.loading import base_checkpoint, user_metadata
from unetkit.formats.lora_files import (
    adapter_file,
    convert_adapter,
    load_adapter,
    read_adapter,
    verify_adapter,
)
from unetkit.nn.lora_inject import merge_and_unload, set_lora_scale
from unetkit.outputs import output_file, output_folder
from unetkit.runlock import check_same_run, run_lock
from unetkit.runtime import PRECISIONS
from unetkit.workflows.adapt import LoRAOptions, train_lora

FORMATS = ("unetkit", "diffusers", "kohya")


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lora-train",
        help="fine-tune LoRA adapters on a trained model (diffusion or segmentation)",
        description="Load BASE (run directory or checkpoint), inject low-rank adapters into "
        "the layers --targets names, freeze everything else and train the adapters with the "
        "base's own recipe on --data (for the built-in digits base: --digits/--limit-per-digit). "
        "The run's checkpoints are small adapter files pointing at BASE.",
    )
    p.add_argument("base", metavar="BASE", help="run directory or checkpoint")
    p.add_argument("--out", required=True, help="run directory for the adapter run")
    p.add_argument("--data", help="training folder (images+captions, or images+masks)")
    p.add_argument("--captions", help="captions file for diffusion data")
    p.add_argument("--digits", help="built-in digits only: classes to train on, e.g. 9")
    p.add_argument(
        "--limit-per-digit", type=F.positive_int, help="built-in digits: images per class"
    )
    p.add_argument("--targets", default="attn", help="comma-separated presets/globs (attn)")
    p.add_argument("--rank", type=F.positive_int, default=4, help="LoRA rank r (4)")
    p.add_argument("--alpha", type=F.positive_float, help="LoRA alpha (default: the rank)")
    p.add_argument("--dropout", type=F.finite_float(0, 1, hi_open=True), default=0.0)
    p.add_argument("--epochs", type=F.positive_int, default=10)
    p.add_argument("--max-steps", type=F.positive_int)
    p.add_argument("--batch-size", type=F.positive_int)
    p.add_argument("--lr", type=F.positive_float, default=1e-3)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--seed", type=F.nonnegative_int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start the adapter run in --out over (its adapters are replaced)",
    )
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    options = LoRAOptions(
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        r=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
    )
    overrides = {
        k: getattr(args, k)
        for k in ("data", "epochs", "max_steps", "batch_size", "lr", "precision", "seed")
        if getattr(args, k) is not None
    }
    base_file = base_checkpoint(args.base)
    output_folder(args.out, flag="--out", inputs=[args.base, base_file, args.data, args.captions])
    diffusion = "diffusion" in read_metadata(base_file)
    if diffusion:
        overrides.update(sample_every=max(1, args.epochs), warmup_steps=0)
        if args.captions:
            overrides["captions"] = args.captions
        if args.limit_per_digit is not None:
            overrides["limit_per_digit"] = args.limit_per_digit
        if args.digits:
            keep = _digits(args.digits)
            overrides["exclude_digits"] = tuple(d for d in range(10) if d not in keep)
    elif args.digits or args.captions:
        raise ConfigError("--digits/--captions apply to diffusion bases only")
    if not args.restart:
        identity = {"data": args.data, "captions": args.captions, "lora.base": str(base_file)}
        identity.update({"lora.targets": list(options.targets), "lora.r": options.r})
        check_same_run(args.out, identity)
    start = time.time()
    with run_lock(args.out):
        result = train_lora(
            args.base,
            args.out,
            options,
            resume=not args.restart,
            progress=not args.no_progress,
            **overrides,
        )
    print(
        f"trained adapters in {(time.time() - start) / 60:.1f} min; best {result.monitor} "
        f"{result.best_metric:.4f}; adapter: {Path(args.out) / 'checkpoints/best.safetensors'}"
    )
    return 0


def _digits(text: str) -> tuple[int, ...]:
    try:
        digits = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ConfigError(f"--digits {text!r}: expected digits like 9 or 3,9") from None
    if not all(0 <= d <= 9 for d in digits):
        raise ConfigError(f"--digits {text!r}: digits are 0..9")
    return digits


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lora-merge",
        help="merge LoRA adapters into a base checkpoint",
        description="Add scale * B @ A of each ADAPTER to BASE's weights (in float32) and "
        "write a plain checkpoint that every unetkit command reads.",
    )
    p.add_argument("base", metavar="BASE", help="run directory or checkpoint")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="LoRA files (any layout)")
    p.add_argument("--out", required=True, help="merged .safetensors checkpoint")
    p.add_argument("--scale", type=F.any_float, default=1.0, help="multiplier on every adapter")
    p.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    file = base_checkpoint(args.base)
    adapters = [*args.adapters, *(adapter_file(a) for a in args.adapters)]
    output_file(args.out, flag="--out", inputs=[args.base, file, *adapters])
    model = load(file)
    check_finite_tensors(model.state_dict(), source=str(file))
    touched = 0
    for i, adapter in enumerate(args.adapters):
        layers = load_adapter(model, adapter, adapter_name=f"adapter{i}")
        touched += len(layers)
        lora = {k: v for k, v in model.state_dict().items() if f".adapter{i}" in k}
        check_finite_tensors(lora, source=adapter, what="adapter weights")
    if args.scale != 1.0:
        set_lora_scale(model, args.scale)
    model = merge_and_unload(model)
    # finite inputs can still overflow (a huge --scale): never write a NaN checkpoint
    check_finite_tensors(model.state_dict(), source=f"--out {args.out}", what="merged weights")
    meta = read_metadata(file)
    save(model, args.out, extra=user_metadata(meta))
    print(f"merged {len(args.adapters)} adapter(s) ({touched} layers) into {args.out}")
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lora-convert",
        help="convert a LoRA file between unetkit, diffusers/PEFT and Kohya layouts",
        description="Read a LoRA file of any supported layout and write it in --to layout; "
        "tensors are copied bit for bit and alphas kept.",
    )
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--to", dest="fmt", choices=FORMATS, required=True)
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    output_file(args.dest, flag="DEST", inputs=[args.source, adapter_file(args.source)])
    if Path(args.dest).is_file() and Path(args.dest).suffix != ".safetensors":
        raise OutputError(  # a name without .safetensors becomes a diffusers LoRA folder
            f"DEST {args.dest}: an existing file that is not .safetensors; name a "
            ".safetensors file or a new folder"
        )
    convert_adapter(args.source, args.dest, format=args.fmt)
    n = len(read_adapter(args.dest).modules)
    print(f"wrote {args.dest} ({args.fmt} layout, {n} modules)")
    return 0


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lora-verify",
        help="check that a LoRA file fits a base model and changes its output",
        description="Load ADAPTER onto BASE (an error lists keys that match no layer), run a "
        "fixed random input with and without it and report the layers touched and the "
        "relative output change.",
    )
    p.add_argument("base", metavar="BASE", help="run directory or checkpoint")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument(
        "--size",
        type=F.int_at_least(8, 1024),  # a probe, not an image: 10**6 would ask for TiB
        default=32,
        help="spatial size of the probe input (8-1024)",
    )
    p.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    model = load(base_checkpoint(args.base)).eval()
    config = model.config
    gen = torch.Generator().manual_seed(0)
    dims = getattr(config, "dims", 2)
    x = torch.randn(1, config.in_channels, *(args.size,) * dims, generator=gen)
    if hasattr(config, "cross_attention_dim"):  # diffusion U-Net: (x, t, context)
        ctx = torch.randn(1, 8, config.cross_attention_dim or 1, generator=gen)
        inputs = (x, torch.tensor([500]), ctx if config.cross_attention_dim else None)
    else:
        inputs = x
    report = verify_adapter(model, args.adapter, inputs)
    shown = ", ".join(report["modules"][:4]) + (", ..." if len(report["modules"]) > 4 else "")
    print(f"layers touched: {report['modules_touched']} ({shown})")
    print(f"unmatched modules: {len(report['unmatched_modules'])}")
    print(f"ranks: {report['ranks']}")
    print(
        f"output change with the adapter: relative {report['relative_change']:.3g}, "
        f"max abs {report['max_abs_change']:.3g}"
    )
    unmatched = report["unmatched_modules"]
    if unmatched:
        total = len(unmatched) + report["modules_touched"]
        raise CheckpointError(
            f"{args.adapter}: {len(unmatched)} of {total} adapter modules match no layer of "
            f"{args.base} (e.g. {unmatched[0]}); it was trained for another model"
        )
    if not math.isfinite(report["relative_change"]) or not math.isfinite(report["max_abs_change"]):
        raise NonFiniteError(
            f"{args.adapter}: the adapted model's output holds NaN or infinity; the adapter "
            f"(or {args.base}) has non-finite weights"
        )
    return 0


# main.py imports one module per COMMANDS entry; this one adds four sub-commands
def add_parser(sub: argparse._SubParsersAction) -> None:
    add_train_parser(sub)
    add_merge_parser(sub)
    add_convert_parser(sub)
    add_verify_parser(sub)
