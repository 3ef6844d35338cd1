"""A tiny learnable problem for the trainer tests, importable and runnable as a script.

Task: label each pixel of a 1×16×16 noise image as foreground where a smoothed copy of the
image is positive. A 2-level U-Net without normalisation learns it in a few epochs, and
without batch-dependent layers its updates are exact functions of the samples seen.

As a script (used by the SIGKILL and torchrun tests)::

    python trainer_toy.py RUN_DIR --epochs N [--batch-size B] [--lr LR] [--hash-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import unetkit
from unetkit.training.tasks import SupervisedTask


class ToySegmentation(Dataset):
    """``n`` dict samples {"image": 1×16×16 float32, "mask": 16×16 int64}, fixed by ``seed``."""

    def __init__(self, n: int, *, seed: int = 0, size: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, size, size, generator=g)
        smooth = F.avg_pool2d(self.images, 3, stride=1, padding=1)
        self.masks = (smooth[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "mask": self.masks[i]}


def loss_fn(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(outputs.float(), batch["mask"])


def metric_fn(outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum over the batch of per-image pixel accuracy."""
    correct = (outputs.argmax(1) == batch["mask"]).double().mean(dim=(1, 2))
    return {"accuracy": float(correct.sum())}


def make_task(monitor: str = "val/accuracy", mode: str = "max") -> SupervisedTask:
    return SupervisedTask(loss_fn, metric_fn, monitor=monitor, mode=mode)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return unetkit.create_model("unet", channels=(4, 8), norm="none")


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(run_dir: str | Path, epochs: int, **overrides: object) -> object:
    """The toy run shared by the script and the in-process tests (same data, same settings)."""
    from unetkit.training import FitConfig, fit

    # CPU even where CUDA exists: the tests compare weights bit for bit
    kwargs: dict = dict(batch_size=4, lr=1e-2, precision="fp32", progress=False, device="cpu")
    kwargs.update(scheduler="constant", optimizer="adamw")
    kwargs.update(overrides)
    n_train = kwargs.pop("n_train", 16)
    model = kwargs.pop("model", None) or make_model()
    task = kwargs.pop("task", None) or make_task()
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    config = FitConfig(epochs=epochs, **{k: v for k, v in kwargs.items() if k in fields})
    result = fit(
        model,
        task,
        ToySegmentation(n_train, seed=1),
        ToySegmentation(5, seed=2),
        config,
        run_dir=run_dir,
        **{k: v for k, v in kwargs.items() if k not in fields},
    )
    return model, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hash-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    model, _ = run(
        args.run_dir,
        args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
    )
    if args.hash_dir:
        rank = int(os.environ.get("RANK", 0))
        Path(args.hash_dir, f"rank{rank}.txt").write_text(weights_hash(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
