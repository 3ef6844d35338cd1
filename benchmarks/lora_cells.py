"""LoRA adapts a segmentation U-Net to a shifted imaging domain from a few labelled images.

    unetkit train --demo --out runs/demo                   # base: fluorescence-like cells
    python benchmarks/lora_cells.py runs/demo --out runs/lora-cells --images 8

The base was trained on the built-in fluorescence-like cells (bright cells, dark
background). The new domain is the phase-contrast style of the same generator (dark cells
with bright halos on a textured grey background). With --images labelled phase images, the
script trains (a) LoRA adapters on every conv (``attn+ff+conv``, base frozen) and (b) full
fine-tuning with the same steps, and scores the base, both, on held-out phase images (and
the adapted models on held-out fluorescence images: the base domain). Reported: Dice,
foreground Dice, DSB2018 AP@0.5, training time, adapter size vs the base file, trainable fraction.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unetkit.data.datasets import FolderSegmentationDataset
from unetkit.data.synthetic import write_synthetic_folder
from unetkit.formats.checkpoint import load
from unetkit.formats.loading import base_checkpoint
from unetkit.workflows import segment_train as S
from unetkit.workflows.adapt import LoRAOptions, train_lora
from unetkit.workflows.segment import evaluate_dataset, load_for_inference


def scores(checkpoint: Path, folder: Path) -> dict[str, float]:
    model, meta = load_for_inference(checkpoint)
    data = FolderSegmentationDataset(folder, mask_mode="instances", target="semantic")
    _, means = evaluate_dataset(model.eval(), meta, (data[i] for i in range(len(data))))
    return means


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", help="segmentation run (or checkpoint) trained on fluorescence cells")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=8, help="labelled images of the new domain")
    ap.add_argument("--test-images", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--samples-per-epoch", type=int, default=160)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)

    out = Path(args.out)
    base_file = base_checkpoint(args.base)
    train_dir = write_synthetic_folder(out / "phase_train", args.images, seed=101, style="phase")
    test_dir = write_synthetic_folder(out / "phase_test", args.test_images, seed=202, style="phase")
    fluo_dir = write_synthetic_folder(out / "fluo_test", args.test_images, seed=303)
    common = dict(
        data=str(train_dir),
        epochs=args.epochs,
        samples_per_epoch=args.samples_per_epoch,
        lr=args.lr,
        val_fraction=0.25,
    )

    t0 = time.perf_counter()
    options = LoRAOptions(targets=("attn+ff+conv",), r=args.rank)
    train_lora(base_file, out / "lora", options, progress=False, **common)
    lora_s = time.perf_counter() - t0
    adapter = out / "lora" / "checkpoints" / "best.safetensors"

    t0 = time.perf_counter()
    meta = load_for_inference(base_file)[1]
    known = {k: meta[k] for k in ("target", "normalize", "num_classes") if k in meta}
    recipe = S.make_recipe("modern", model=meta["model"], **known, **common)
    S.train(recipe, out / "full", progress=False, model=load(base_file))
    full_s = time.perf_counter() - t0
    full_file = out / "full" / "checkpoints" / "best.safetensors"

    adapted, _ = load_for_inference(adapter)
    trainable = sum(p.numel() for n, p in adapted.named_parameters() if ".lora_" in n)
    total = sum(p.numel() for n, p in adapted.named_parameters() if ".lora_" not in n)
    rows = [
        ("base (no adaptation)", base_file, None),
        (f"LoRA r={args.rank} (attn+ff+conv)", adapter, lora_s),
        ("full fine-tuning", full_file, full_s),
    ]
    print(f"{args.images} labelled phase-contrast images; held-out: {args.test_images} each")
    print(
        f"adapter file {adapter.stat().st_size / 1e3:.0f} kB = "
        f"{100 * adapter.stat().st_size / base_file.stat().st_size:.1f}% of the base file; "
        f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)"
    )
    print("| model | phase: Dice | phase: AP@0.5 | fluorescence: Dice | training time |")
    print("|---|---|---|---|---|")
    for name, file, seconds in rows:
        phase, fluo = scores(file, test_dir), scores(file, fluo_dir)
        took = "—" if seconds is None else f"{seconds:.0f} s"
        print(
            f"| {name} | {phase['dice_1']:.3f} | {phase['ap_50']:.3f} | "
            f"{fluo['dice_1']:.3f} | {took} |"
        )


if __name__ == "__main__":
    main()
