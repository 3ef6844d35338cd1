"""LoRA fine-tuning of a trained unetkit model (diffusion or segmentation) with ``fit``.

The base checkpoint is loaded, adapters are injected into the layers the targets name,
every other weight is frozen, and the trainer optimises only the adapters. The run's
``checkpoints/best.safetensors`` and ``last.safetensors`` are small adapter files (the
unetkit LoRA layout = PEFT/diffusers keys) whose metadata points at the base checkpoint, so
``unetkit generate RUN`` / ``unetkit predict`` can find both.

Example:
    >>> opts = LoRAOptions(targets=("attn",), r=4)                     # doctest: +SKIP
    >>> train_lora("runs/digits", "runs/nine", opts,                   # doctest: +SKIP
    ...            exclude_digits=tuple(range(9)), limit_per_digit=100)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from unetkit.errors import ConfigError
from unetkit.formats.checkpoint import load, read_metadata
from unetkit.formats.loading import base_checkpoint
from unetkit.formats.lora_files import save_adapter
from unetkit.nn.lora_inject import inject_lora, trainable_summary
from unetkit.workflows import diffuse_train as D
from unetkit.workflows import segment_train as S

log = logging.getLogger(__name__)
# noise-process fields a diffusion base's metadata fixes for its adapters
_SCHEDULE_FIELDS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
)


@dataclasses.dataclass(frozen=True)
class LoRAOptions:
    """Where and how big the adapters are.

    Attributes:
        targets: module-name globs, ``re:`` regexes or presets ("attn", "attn+ff",
            "attn+ff+conv").
        r: rank; alpha: scale numerator (scale = alpha / r; None = r); dropout on the input.
    """

    targets: tuple[str, ...] = ("attn",)
    r: int = 4
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r={self.r!r} must be an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout={self.dropout} must be in [0, 1)")


def attach(model: nn.Module, options: LoRAOptions) -> dict[str, Any]:
    """Inject adapters, freeze the rest; returns a summary (layers, trainable fraction)."""

    wrapped = inject_lora(
        model, list(options.targets), r=options.r, alpha=options.alpha, dropout=options.dropout
    )
    trainable, total, fraction = trainable_summary(model)
    log.info(
        "LoRA r=%d on %d layers: %s of %s parameters trainable (%.3f%%)",
        options.r,
        len(wrapped),
        f"{trainable:,}",
        f"{total:,}",
        100 * fraction,
    )
    return {"layers": len(wrapped), "trainable": trainable, "total": total, "fraction": fraction}


def adapter_saver(options: LoRAOptions, base: Path):
    """A ``fit`` model saver that writes the adapter (not the model) with a base pointer."""

    def save(model: nn.Module, path: Path, extra: dict[str, Any]) -> Path:
        return save_adapter(model, path, targets=list(options.targets), base_model=str(base))

    return save


def train_lora(
    base: str | os.PathLike,
    run_dir: str | os.PathLike,
    options: LoRAOptions,
    *,
    resume: bool = True,
    progress: bool = True,
    **recipe_overrides: Any,
) -> Any:
    """Fine-tune adapters on ``base`` (a run directory or checkpoint).

    ``recipe_overrides`` are fields of the base's recipe kind: ``DiffusionRecipe`` for a
    diffusion base (data, captions, digits via ``exclude_digits``/``limit_per_digit``,
    epochs, lr, ...), ``SegmentationRecipe`` for a segmentation base (data, epochs, ...).
    Returns the trainer's FitResult.
    """

    file = base_checkpoint(base)
    meta = read_metadata(file)
    model = load(file)
    summary = attach(model, options)
    saver = adapter_saver(options, file)
    lora_info = {"base": str(file), **dataclasses.asdict(options), **summary}
    if "diffusion" in meta:
        d = meta["diffusion"]
        noise = {k: d["schedule"][k] for k in _SCHEDULE_FIELDS if k in d["schedule"]}
        overrides = {
            "size": d["image_size"],
            "channels": d["channels"],
            "text_encoder": d["text_encoder"],
            "max_length": d["max_length"],
            **noise,  # the adapter learns the base's own objective
            **recipe_overrides,
        }
        recipe = D.make_diffusion_recipe("digits", **overrides)
        return D.train_diffusion(
            recipe,
            run_dir,
            resume=resume,
            progress=progress,
            model=model,
            save_model=saver,
            lora=lora_info,
        )

    known = S.checkpoint_recipe_fields(meta)
    recipe = S.make_recipe("modern", model=meta["model"], **{**known, **recipe_overrides})
    return S.train(
        recipe,
        run_dir,
        resume=resume,
        progress=progress,
        model=model,
        save_model=saver,
        lora=lora_info,
    )
