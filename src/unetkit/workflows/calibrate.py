"""Choose the instance-separation seed threshold on validation images, after training.

A boundary-aware model (background / interior / boundary) separates touching cells by
seeded watershed; seeds are pixels with p(interior) above a threshold. How confident the
interior must be depends on the model, so the threshold that maximises instance AP@0.5 on
the validation set is stored in the checkpoint, where `unetkit predict` reads it. The test
set is never used for this choice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from unetkit.formats.checkpoint import read_metadata, save
from unetkit.formats.loading import is_adapter_file, load_with_metadata, user_metadata
from unetkit.formats.lora_files import read_adapter, write_adapter
from unetkit.inference.tiling import predict_tiled
from unetkit.segmentation.instances import instance_ap, instance_ap_range
from unetkit.segmentation.postprocess import instances_from_boundary
from unetkit.workflows.segment import min_object_size

log = logging.getLogger(__name__)

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
MIN_SEED_SIZE = 5


def best_seed_threshold(
    probabilities: Sequence[np.ndarray],
    instances: Sequence[np.ndarray],
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    min_size: int = 10,
) -> tuple[float, float]:
    """(threshold, mean AP@0.5) maximising AP@0.5 over ``thresholds``.

    A validation region holds few objects, so several thresholds often score alike: ties
    go to the better mean AP over IoU 0.5-0.95, then to the higher threshold (a strict
    seed rarely splits one nucleus in two, and foreground left without a seed is still
    kept as an object of its own, so touching nuclei merge less).
    """
    best, best_key = thresholds[0], (-1.0, -1.0)
    for t in thresholds:
        scores = []
        for p, truth in zip(probabilities, instances, strict=True):
            pred = instances_from_boundary(
                p, interior_threshold=t, min_size=min_size, min_seed_size=MIN_SEED_SIZE
            )
            scores.append((instance_ap(pred, truth), instance_ap_range(pred, truth)))
        key = tuple(float(v) for v in np.mean(scores, axis=0))
        if key >= best_key:
            best, best_key = t, key
    return best, best_key[0]


def calibrate_seed_threshold(checkpoint: str | os.PathLike, val_data: Dataset) -> float | None:
    """Store the best seed threshold in ``checkpoint``'s metadata; None without instances.

    ``checkpoint`` may be a LoRA run's adapter file: the threshold of base + adapter then
    goes into the adapter's ``inference`` settings. ``val_data`` yields normalised samples
    with ``instances`` (as during validation).
    """
    samples = [val_data[i] for i in range(len(val_data))]
    samples = [s for s in samples if "instances" in s]
    if not samples:
        return None
    model, meta = load_with_metadata(checkpoint)
    probs = [predict_tiled(model, s["image"]).numpy() for s in samples]
    truths = [np.asarray(s["instances"]) for s in samples]
    min_size = min_object_size(user_metadata(meta), truths[0].ndim)  # as predict will use
    threshold, ap = best_seed_threshold(probs, truths, min_size=min_size)
    log.info("instance seeds: p(interior) > %.2f (validation AP@0.5 %.3f)", threshold, ap)
    if is_adapter_file(checkpoint):
        adapter = read_adapter(checkpoint)
        adapter.info["inference"] = {
            **adapter.info.get("inference", {}),
            "seed_threshold": threshold,
        }
        write_adapter(adapter, checkpoint)
        return threshold
    meta = read_metadata(checkpoint)
    extra = user_metadata(meta)
    extra["seed_threshold"] = threshold
    save(model, checkpoint, extra=extra)
    return threshold
