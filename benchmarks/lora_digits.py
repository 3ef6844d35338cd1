"""LoRA teaches a digit the base model never saw.

    unetkit diffusion-train --exclude-digits 9 --out runs/no-nine        # base without "nine"
    python benchmarks/lora_digits.py runs/no-nine --out runs/lora-nine --rank 8 --images 100

Trains a rank-r adapter on at most --images real nines (attention projections only), then
reports: adapter file size vs the base checkpoint, trainable fraction, time per LoRA step vs
per full fine-tuning step on the same batch, and the real-digit classifier's accuracy on
generated "nine"s and on the other digits (before and after, to show nothing else moved).
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import numpy as np
import torch

from unetkit.formats.loading import base_checkpoint
from unetkit.workflows.adapt import LoRAOptions, train_lora
from unetkit.workflows.diffuse import DiffusionPipeline
from unetkit.workflows.diffuse_train import DIGIT_PROMPTS


def step_seconds(model: torch.nn.Module, schedule, context: torch.Tensor, steps: int = 3) -> float:
    """Median time of one optimizer step (forward, backward, AdamW) on a batch of 32, on a
    copy of ``model`` (the steps must not move the weights that are evaluated later)."""
    from unetkit.diffusion.objectives import diffusion_loss

    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4)
    x = torch.randn(32, 1, 32, 32)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        diffusion_loss(model, x, context.expand(32, -1, -1), schedule).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def accuracy(
    pipe: DiffusionPipeline, clf, digits, n: int, guidance: float, steps: int
) -> dict[int, float]:
    from unetkit.data.digits import classify_digits

    out = {}
    for d in digits:
        images = pipe.generate([DIGIT_PROMPTS[d]] * n, steps=steps, guidance=guidance, seed=d)
        out[d] = float((classify_digits(clf, images) == d).mean())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", help="digits run trained without the new digit")
    ap.add_argument("--out", required=True)
    ap.add_argument("--digit", type=int, default=9)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps per sample")
    ap.add_argument("--n", type=int, default=50, help="samples per digit for accuracy")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--targets", default="attn", help="LoRA targets (preset or globs, comma list)")
    args = ap.parse_args(argv)

    from diffusion_quality import heldout_classifier  # benchmarks/ is on sys.path

    base_file = base_checkpoint(args.base)
    options = LoRAOptions(targets=tuple(args.targets.split(",")), r=args.rank)
    others = [d for d in range(10) if d != args.digit]
    train_lora(
        args.base,
        args.out,
        options,
        progress=False,
        epochs=args.epochs,
        lr=args.lr,
        warmup_steps=0,
        exclude_digits=tuple(others),
        limit_per_digit=args.images,
        sample_every=args.epochs,
    )
    # the run's own epoch times count (a finished run is only re-evaluated)
    with open(Path(args.out) / "metrics.csv") as f:
        lora_minutes = sum(float(row["seconds"]) for row in csv.DictReader(f)) / 60
    adapter = Path(args.out) / "checkpoints" / "best.safetensors"

    base = DiffusionPipeline.from_checkpoint(base_file)
    tuned = DiffusionPipeline.from_checkpoint(adapter)
    clf, real_acc = heldout_classifier(base.size)
    context = base.encode([DIGIT_PROMPTS[args.digit]])[0]
    full_step = step_seconds(base.model, base.schedule, context)
    for name, p in tuned.model.named_parameters():  # as in training: only adapters learn
        p.requires_grad_(".lora_" in name)
    lora_step = step_seconds(tuned.model, tuned.schedule, context)
    trainable = sum(p.numel() for p in tuned.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in base.model.parameters())
    base.model.eval(), tuned.model.eval()
    digits = [args.digit, *others]
    before = accuracy(base, clf, digits, args.n, args.guidance, args.steps)
    after = accuracy(tuned, clf, digits, args.n, args.guidance, args.steps)

    size = adapter.stat().st_size / base_file.stat().st_size
    print(f"classifier accuracy on held-out real digits: {real_acc:.3f}")
    print(f"adapter file: {adapter.stat().st_size / 1e3:.0f} kB = {100 * size:.2f}% of the base")
    print(
        f"trainable: {trainable:,} adapter parameters = {100 * trainable / total:.2f}% of the "
        f"base's {total:,}"
    )
    print(
        f"LoRA training: {lora_minutes:.1f} min; step {lora_step:.3f} s vs full fine-tuning "
        f"{full_step:.3f} s (batch 32)"
    )
    print(
        f"'{DIGIT_PROMPTS[args.digit]}' recognised: {before[args.digit]:.2f} before, "
        f"{after[args.digit]:.2f} after"
    )
    print("digit  | " + " ".join(f"{d:>5d}" for d in range(10)))
    for name, acc in (("before", before), ("after", after)):
        print(f"{name:6s} | " + " ".join(f"{acc[d]:5.2f}" for d in range(10)))
    print(
        f"other digits: {np.mean([before[d] for d in others]):.3f} before, "
        f"{np.mean([after[d] for d in others]):.3f} after"
    )


if __name__ == "__main__":
    main()
