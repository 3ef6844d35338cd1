"""Quality of a digits diffusion run, measured by a classifier of real handwritten digits.

    unetkit diffusion-train --out runs/digits            # ~20 min on 2 CPU cores
    python benchmarks/diffusion_quality.py runs/digits --n 50 --guidance 1 3
    python benchmarks/diffusion_quality.py runs/digits --n 50 --guidance 1 3 --precision bf16

For every digit d the run generates --n samples from "a handwritten digit <d>"; a
scikit-learn classifier trained on real MNIST digits the generator never saw (the held-out
split of the built-in digits) labels them. Reported: accuracy of the prompted digit per
guidance scale (1 = no guidance), per digit, and the sampling time per step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from unetkit.data.digits import DigitsDataset, classify_digits, train_digit_classifier
from unetkit.workflows.diffuse import DiffusionPipeline, save_grid
from unetkit.workflows.diffuse_train import DIGIT_PROMPTS


def heldout_classifier(size: int):
    """A classifier fitted on the held-out real digits, with its accuracy on a part of them
    it was not fitted on."""
    test = DigitsDataset("test", size=size)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    labels = np.array([test[i]["label"] for i in range(len(test))])
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.8 * len(order))
    clf = train_digit_classifier(images[order[:cut]], labels[order[:cut]])
    acc = float((classify_digits(clf, images[order[cut:]]) == labels[order[cut:]]).mean())
    return clf, acc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="diffusion run directory or checkpoint")
    ap.add_argument("--n", type=int, default=50, help="samples per digit")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--digits", default="0123456789", help="digits to prompt, e.g. 9")
    ap.add_argument("--grid", help="write a grid of the last guidance's samples here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="fp32")
    args = ap.parse_args(argv)

    pipe = DiffusionPipeline.from_checkpoint(
        args.run, sampler=args.sampler, precision=args.precision
    )
    clf, real_acc = heldout_classifier(pipe.size)
    print(f"classifier accuracy on held-out real digits: {real_acc:.3f}")
    digits = [int(c) for c in args.digits]
    header = "guidance | " + " ".join(f"{d:>5d}" for d in digits) + " |   all | s/step"
    print(header)
    print("-" * len(header))
    for g in args.guidance:
        accs, samples, seconds, steps = [], [], 0.0, 0
        for d in digits:
            t0 = time.perf_counter()
            images = pipe.generate(
                [DIGIT_PROMPTS[d]] * args.n, steps=args.steps, guidance=g, seed=args.seed + d
            )
            seconds += time.perf_counter() - t0
            steps += args.steps
            accs.append(float((classify_digits(clf, images) == d).mean()))
            samples.append(images[:10])
        cells = " ".join(f"{a:5.2f}" for a in accs)
        print(f"{g:8.1f} | {cells} | {np.mean(accs):5.3f} | {seconds / steps:6.3f}")
        if args.grid:
            save_grid(torch.cat(samples), args.grid, nrow=10)
    print(f"({args.n} samples per digit, {args.steps} steps, batch {args.n}, {args.precision})")


if __name__ == "__main__":
    main()
