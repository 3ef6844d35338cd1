"""Train every registered 2D segmentation model on the built-in synthetic cells with the
same budget and print Dice, parameters and time per training step, so users can choose.

    python benchmarks/compare_models.py --steps 150
    python benchmarks/compare_models.py --models unet attention_unet --steps 300

Each model uses its registry defaults at the width given by --preset-overrides below (kept
comparable, a few hundred thousand to a few million parameters); all share the recipe, the
data, the number of optimiser steps and the held-out evaluation (8 unseen images).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unetkit import registry
from unetkit.workflows import segment_train as R
from unetkit.workflows.report import heldout_report

# comparable, CPU-sized configurations (model_options per family)
SIZES: dict[str, dict] = {
    "unet": {"channels": (16, 32, 64, 128)},
    "unetpp": {"channels": (16, 32, 64, 128)},
    "attention_unet": {"channels": (16, 32, 64, 128)},
    "vnet": {"dims": 2, "channels": (8, 16, 32, 64, 128)},
    "deeplabv3plus": dict(
        backbone="resnet18",
        widths=(16, 32, 64, 128),
        aspp_channels=64,
        decoder_channels=64,
        low_level_channels=16,
    ),
    "transunet": dict(
        img_size=128,
        stem_width=32,
        stem_blocks=(1, 1, 1),
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        mlp_dim=256,
        decoder_channels=(64, 32, 16, 16),
    ),
    "swin_unet": dict(
        patch_size=4, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=8
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="default: every registered 2D model")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = ap.parse_args()
    names = args.models or [
        n for n in registry.list_models(task="segmentation") if 2 in registry.get_entry(n).dims
    ]
    per_epoch = 10
    rows = []
    for name in names:
        recipe = R.make_recipe(
            "demo",
            model=name,
            model_options=SIZES.get(name, {}),
            batch_size=args.batch_size,
            samples_per_epoch=per_epoch * args.batch_size,
            epochs=max(1, args.steps // per_epoch),
        )
        start = time.time()
        result = R.train(recipe, args.out / name, resume=False, progress=False)
        seconds = time.time() - start
        scores = heldout_report(recipe, args.out / name)
        with_model = R.build_model(recipe, 1)
        params = sum(p.numel() for p in with_model.parameters())
        rows.append((name, params, seconds / (recipe.epochs * per_epoch), scores, result))
    print(f"\n{args.steps} steps of batch {args.batch_size} (128² crops), held-out synthetic cells")
    print("| model | parameters | s/step (incl. data, validation) | Dice | AP@0.5 | count error |")
    print("|---|---|---|---|---|---|")
    for name, params, sps, s, _ in rows:
        print(
            f"| {name} | {params:,} | {sps:.2f} | {s['dice']:.3f} | {s['ap_50']:.3f} | "
            f"{s['count_error']:.3f} |"
        )


if __name__ == "__main__":
    main()
