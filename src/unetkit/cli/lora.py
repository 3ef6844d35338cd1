"""`unetkit lora-train | lora-merge | lora-convert | lora-verify`: LoRA adapters end to end.

Registered as four sub-commands (see ``COMMANDS`` in main.py); this module holds them all
because they share the adapter options and are each a thin call into the library.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unetkit.errors import ConfigError

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
    p.add_argument("--limit-per-digit", type=int, help="built-in digits: images per class")
    p.add_argument("--targets", default="attn", help="comma-separated presets/globs (attn)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (4)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from unetkit.formats.checkpoint import read_metadata
    from unetkit.formats.loading import base_checkpoint
    from unetkit.workflows.adapt import LoRAOptions, train_lora

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
    diffusion = "diffusion" in read_metadata(base_checkpoint(args.base))
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
    start = time.time()
    result = train_lora(args.base, args.out, options, progress=not args.no_progress, **overrides)
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
    p.add_argument("--scale", type=float, default=1.0, help="multiplier on every adapter")
    p.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from unetkit.formats.checkpoint import load, read_metadata, save
    from unetkit.formats.loading import base_checkpoint, user_metadata
    from unetkit.formats.lora_files import load_adapter
    from unetkit.nn.lora_inject import merge_and_unload, set_lora_scale

    file = base_checkpoint(args.base)
    model = load(file)
    touched = 0
    for i, adapter in enumerate(args.adapters):
        touched += len(load_adapter(model, adapter, adapter_name=f"adapter{i}"))
    if args.scale != 1.0:
        set_lora_scale(model, args.scale)
    model = merge_and_unload(model)
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
    from unetkit.formats.lora_files import convert_adapter, read_adapter

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
    p.add_argument("--size", type=int, default=32, help="spatial size of the probe input")
    p.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    import torch

    from unetkit.formats.checkpoint import load
    from unetkit.formats.loading import base_checkpoint
    from unetkit.formats.lora_files import verify_adapter

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
    return 0


# main.py imports one module per COMMANDS entry; this one adds four sub-commands
def add_parser(sub: argparse._SubParsersAction) -> None:
    add_train_parser(sub)
    add_merge_parser(sub)
    add_convert_parser(sub)
    add_verify_parser(sub)
