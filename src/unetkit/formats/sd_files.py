"""Stable Diffusion pipeline files: a diffusers pipeline folder, its components, its scheduler.

A diffusers pipeline folder (what ``StableDiffusionPipeline.save_pretrained`` writes) holds
``model_index.json`` and one folder per component: ``unet/`` (read into our
``DiffusionUNet``), ``vae/`` (diffusers ``AutoencoderKL``), ``text_encoder/``
(transformers ``CLIPTextModel``), ``tokenizer/`` (``CLIPTokenizer``: tokenizer.json or
vocab.json + merges.txt) and ``scheduler/`` (``scheduler_config.json``, mapped onto our samplers).
Weights are read from ``.safetensors`` only. Original single-file checkpoints are read by
``unetkit.formats.sd_single_file``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats.diffusers import load_diffusers_unet
from unetkit.models.diffusion_unet import DiffusionUNet

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_FILES = {  # a component is present when one of its files is
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}
# diffusers scheduler class -> (our sampler, {our option: (config key, diffusers default)})
_SPACING = {
    "timestep_spacing": ("timestep_spacing", "leading"),
    "steps_offset": ("steps_offset", 0),
}
SCHEDULERS: dict[str, tuple[str, dict[str, tuple[str, Any]]]] = {
    "DDIMScheduler": (
        "ddim",
        {
            **_SPACING,
            "set_alpha_to_one": ("set_alpha_to_one", True),
            "clip_sample": ("clip_sample", True),
            "clip_sample_range": ("clip_sample_range", 1.0),
        },
    ),
    "DDPMScheduler": (
        "ddpm",
        {
            **_SPACING,
            "variance_type": ("variance_type", "fixed_small"),
            "clip_sample": ("clip_sample", True),
            "clip_sample_range": ("clip_sample_range", 1.0),
        },
    ),
    "EulerDiscreteScheduler": (
        "euler",
        {"timestep_spacing": ("timestep_spacing", "linspace"), "steps_offset": ("steps_offset", 0)},
    ),
    "DPMSolverMultistepScheduler": (
        "dpmpp-2m",
        {
            "timestep_spacing": ("timestep_spacing", "linspace"),
            "steps_offset": ("steps_offset", 0),
            "order": ("solver_order", 2),
        },
    ),
}
# samplers unetkit does not implement, run as DDIM on the same schedule and timesteps
_AS_DDIM = ("PNDMScheduler", "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler")


@dataclass
class SDFiles:
    """The loaded components of a Stable Diffusion pipeline.

    Args:
        unet: our ``DiffusionUNet``. vae: diffusers ``AutoencoderKL``. text_encoder:
            ``CLIPTextModel``. tokenizer: ``CLIPTokenizer``. scheduler_config: the
            ``scheduler_config.json`` dict. source: where they came from. notes: facts to
            report (e.g. a sampler substituted). unet_sample_size: the latent size the
            U-Net was trained at (``sample_size`` of its config; SD 1.x: 64).
    """

    unet: DiffusionUNet
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str
    notes: list[str] = field(default_factory=list)
    unet_sample_size: int = 64


def sampler_from_config(
    config: dict[str, Any], sampler: str | None = None
) -> tuple[str, dict[str, Any], str | None]:
    """``(our sampler name, its options, a note)`` for a diffusers ``scheduler_config.json``.

    ``sampler`` (``--sampler``) overrides the class; the timestep spacing of the file is
    kept where the chosen sampler has one.
    """
    cls = config.get("_class_name", "DDIMScheduler")
    note = None
    if cls in _AS_DDIM and sampler is None:
        note = f"{cls} is not implemented in unetkit; sampling with DDIM on its schedule"
        name, table = "ddim", dict(SCHEDULERS["DDIMScheduler"][1])
        table["set_alpha_to_one"] = ("set_alpha_to_one", False)
        table["clip_sample"] = ("clip_sample", False)
    elif cls not in SCHEDULERS and sampler is None:
        raise ConfigError(
            f"scheduler {cls!r} is not supported; choose one with --sampler "
            f"(ddim, ddpm, dpmpp-2m, euler)"
        )
    else:
        name, table = SCHEDULERS.get(cls, ("ddim", dict(_SPACING)))
    if sampler is not None and sampler != name:
        wanted = next(v for v in SCHEDULERS.values() if v[0] == sampler)
        name, table = sampler, {k: v for k, v in wanted[1].items() if k in _SPACING}
    options = {ours: config.get(key, default) for ours, (key, default) in table.items()}
    return name, options, note


def check_pipeline_dir(path: str | os.PathLike) -> Path:
    """Refuse a folder lacking a component, in one line naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such pipeline folder")
    missing = [c for c in COMPONENTS if not any((path / c / f).is_file() for f in _FILES[c])]
    if missing:
        found = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise CheckpointError(
            f"{path}: not a complete Stable Diffusion pipeline folder: missing "
            f"{', '.join(f'{c}/{_FILES[c][0]}' for c in missing)} (found {found or 'no folders'})"
        )
    return path


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" bars from transformers/diffusers while a component loads: a
    folder of tiny files should not print more than the command's own lines."""
    import diffusers.utils.logging as d_log
    import transformers.utils.logging as t_log

    was = [(m, m.is_progress_bar_enabled()) for m in (d_log, t_log)]
    for m, _ in was:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, enabled in was:
            if enabled:
                m.enable_progress_bar()


def _from_pretrained(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    # diffusers/transformers raise OSError, ValueError, TypeError (a tokenizer without
    # merges.txt), RuntimeError (weights of other shapes than config.json says) ... on a
    # damaged folder: one line naming it, never a traceback
    try:
        with _quiet_loading():
            return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: cannot load the {what} ({first})") from None


def _json_object(path: Path) -> dict[str, Any]:
    """A component's JSON config file as a dict; CheckpointError naming it otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # not JSON, not UTF-8, unreadable
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def load_pipeline_dir(
    path: str | os.PathLike, *, frozen_dtype: torch.dtype | None = None
) -> SDFiles:
    """Load the five components of a diffusers Stable Diffusion pipeline folder.

    Args:
        path: the pipeline folder.
        frozen_dtype: store the U-Net's weights as the CPU fast path's frozen copy keeps
            them (``load_diffusers_unet``), for a U-Net run only at that precision.

    Raises:
        CheckpointError: a component is missing or unreadable, or the VAE's latent
            channels do not fit the U-Net's input (named, one line).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    path = check_pipeline_dir(path)
    unet = load_diffusers_unet(path / "unet", frozen_dtype=frozen_dtype)
    vae = _from_pretrained(AutoencoderKL, path / "vae", "VAE", use_safetensors=True)
    te = _from_pretrained(
        CLIPTextModel, path / "text_encoder", "text encoder", use_safetensors=True
    )
    tok = _from_pretrained(CLIPTokenizer, path / "tokenizer", "tokenizer")
    sched = _json_object(path / "scheduler" / "scheduler_config.json")
    size = _json_object(path / "unet" / "config.json").get("sample_size") or 64
    size = size[0] if isinstance(size, (list, tuple)) and size else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(
            f"{path / 'unet' / 'config.json'}: sample_size={size!r} is not a positive integer"
        )
    files = SDFiles(unet.eval(), vae.eval(), te.eval(), tok, sched, str(path))
    files.unet_sample_size = size
    check_components(files)
    return files


def check_components(files: SDFiles) -> None:
    """The VAE, text encoder and U-Net must fit together (one line naming the mismatch)."""
    c = files.unet.config
    latent = int(files.vae.config.latent_channels)
    factor = files.vae.config.scaling_factor  # latents are divided by it: NaN or 0 poisons all
    if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise CheckpointError(
            f"{files.source}: the VAE's scaling_factor={factor!r} is not a positive number"
        )
    if c.in_channels not in (latent, 2 * latent + 1) or c.out_channels != latent:
        raise CheckpointError(
            f"{files.source}: the VAE makes {latent}-channel latents but the U-Net takes "
            f"{c.in_channels} and predicts {c.out_channels} channels (expected {latent}, or "
            f"{2 * latent + 1} in for an inpainting U-Net)"
        )
    width = int(files.text_encoder.config.hidden_size)
    if c.cross_attention_dim != width:
        raise CheckpointError(
            f"{files.source}: the text encoder gives {width}-wide embeddings but the U-Net's "
            f"cross-attention expects {c.cross_attention_dim}"
        )
