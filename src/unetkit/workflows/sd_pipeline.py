"""``StableDiffusion``: text-to-image, image-to-image and inpainting on our U-Net.

Reads a diffusers pipeline folder or an original single-file checkpoint; the U-Net is
unetkit's ``DiffusionUNet`` (bf16 fast path on CPUs that compute bf16), the VAE and CLIP
text encoder are diffusers'/transformers' modules (see ``unetkit.diffusion.latent``).
LoRA files of every supported layout stack with per-file scales; their text-encoder parts
go into the CLIP text encoder.

Example:
    >>> sd = StableDiffusion.from_pretrained("stable-diffusion-v1-5")     # doctest: +SKIP
    >>> sd.load_lora("style.safetensors", scale=0.8)                      # doctest: +SKIP
    >>> images = sd.txt2img(["a red fox in snow"], steps=25, seed=1)      # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from unetkit.diffusion.latent import (
    Guidance,
    KnownRegion,
    LatentCodec,
    PromptEncoder,
    StepCallback,
    denoise,
    img2img_timesteps,
)
from unetkit.diffusion.samplers import build_scheduler
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import ConfigError, DataError
from unetkit.formats.lora_files import load_adapter
from unetkit.formats.sd_files import SDFiles, load_pipeline_dir, sampler_from_config
from unetkit.formats.sd_single_file import is_single_file, load_single_file
from unetkit.runtime import DEFAULT_PRECISION, fastpath, prepared


def is_sd_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Stable Diffusion pipeline folder or single-file checkpoint."""
    path = Path(path)
    if path.is_dir():
        return (path / "model_index.json").is_file() or (path / "vae").is_dir()
    if path.suffix == ".safetensors" and path.is_file():
        return is_single_file(path)
    return False


class StableDiffusion:
    """A latent diffusion pipeline around our U-Net.

    Args:
        files: the loaded components (``load_pipeline_dir`` / ``load_single_file``).
        sampler: override of the pipeline's scheduler ("ddim", "ddpm", "dpmpp-2m", "euler").
        precision: "auto" (bf16 fast path where the CPU computes bf16), "bf16" or "fp32".
            Where it runs the U-Net's bf16 fast path, the VAE runs under bf16 autocast
            (its norms in float32); the text encoder (a few tokens) stays float32.
    """

    def __init__(
        self, files: SDFiles, *, sampler: str | None = None, precision: str = DEFAULT_PRECISION
    ):
        self.files = files
        self.unet = files.unet
        self.codec = LatentCodec(
            files.vae, files.vae.config.scaling_factor, fastpath.frozen_dtype(precision)
        )
        self.prompts = PromptEncoder(files.tokenizer, files.text_encoder)
        source = Path(files.source)
        if source.is_dir():
            source = source / "scheduler" / "scheduler_config.json"
        self.schedule = NoiseSchedule.from_diffusers_config(
            files.scheduler_config, source=str(source)
        )
        try:  # the file's class and options (timestep_spacing, ...) fail here, not mid-run
            self.sampler, self.sampler_options, note = sampler_from_config(
                files.scheduler_config, sampler
            )
            build_scheduler(self.sampler, self.schedule, **self.sampler_options)
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None
        self.notes = list(files.notes) + ([note] if note else [])
        stored = next(p.dtype for p in self.unet.parameters())
        if stored != torch.float32 and stored != fastpath.frozen_dtype(precision):
            raise ConfigError(
                f"{files.source}: the U-Net was loaded in {stored} for the fast path; "
                f"precision={precision!r} needs float32 weights (load it again)"
            )
        self._precision = precision
        self.adapters: list[tuple[str, float]] = []

    @property
    def precision(self) -> str:
        """The U-Net's precision, fixed when the pipeline is made (the weights may be
        stored for it)."""
        return self._precision

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer: str | None = None,
        precision: str = DEFAULT_PRECISION,
        **options: Any,
    ) -> StableDiffusion:
        """Load a pipeline folder or a single-file checkpoint (``tokenizer``: a folder with
        vocab.json + merges.txt, needed by single files, which carry none).

        Where ``precision`` runs the CPU fast path, the U-Net's weights are stored as its
        frozen bf16 copy keeps them (never all in float32): with the frozen copy that makes
        3.4 GB for an SD 1.x U-Net instead of 6.8 GB (float32 model + copy).
        """
        path = Path(path)
        store = fastpath.frozen_dtype(precision)
        if path.is_dir():
            files = load_pipeline_dir(path, frozen_dtype=store)
        else:
            files = load_single_file(path, tokenizer=tokenizer, frozen_dtype=store)
        return cls(files, precision=precision, **options)

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> list[str]:
        """Stack a LoRA file (any layout) with runtime ``scale``; text-encoder parts go into
        the CLIP text encoder. Returns the U-Net layers adapted."""
        name = f"lora{len(self.adapters)}"
        done = load_adapter(
            self.unet,
            path,
            adapter_name=name,
            scale=scale,
            text_encoders={"text_encoder": self.files.text_encoder},
        )
        self.adapters.append((str(path), float(scale)))
        return done

    def describe(self) -> str:
        """One line: base, adapters with scales, sampler (what ``generate`` prints)."""
        loras = ", ".join(f"{Path(p).name}:{s:g}" for p, s in self.adapters) or "none"
        opts = ", ".join(f"{k}={v}" for k, v in self.sampler_options.items())
        line = f"base {self.files.source}; LoRA {loras}; sampler {self.sampler} ({opts})"
        return line + "".join(f"; note: {n}" for n in self.notes)

    # --- the pieces of every run --------------------------------------------------------
    def _scheduler(self) -> Any:
        return build_scheduler(self.sampler, self.schedule, **self.sampler_options)

    def _guidance(self, prompts: list[str], negative: str | list[str], scale: float) -> Guidance:
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return Guidance(self.prompts(prompts), self.prompts(negatives), float(scale))

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        s = self.codec.scale
        if height % s or width % s or height < s or width < s:
            raise DataError(f"image size {height}x{width} must be a positive multiple of {s}")
        return height // s, width // s

    def _run(self, latents, guidance, timesteps, scheduler, gen, known=None, callback=None):
        with prepared(self.unet, self.precision) as runner:  # fast path or autocast, decided once
            z = denoise(
                runner,
                scheduler,
                latents,
                guidance,
                timesteps=timesteps,
                generator=gen,
                known=known,
                callback=callback,
                device=runner.runs_on,
            )
        return self.codec.decode(z).float()

    # --- the three tasks ----------------------------------------------------------------
    def txt2img(
        self,
        prompts: list[str],
        *,
        negative: str | list[str] = "",
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for ``prompts`` (default size: the U-Net's
        training size, ``sample_size`` × the VAE scale, from the files)."""
        size = self.default_size
        h, w = self._latent_size(height or size, width or size)
        g = self._guidance(list(prompts), negative, guidance)
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(prompts), self.codec.latent_channels, h, w), generator=gen)
        scheduler = self._scheduler()
        scheduler.set_timesteps(steps)
        latents = noise * scheduler.init_noise_sigma
        return self._run(latents, g, scheduler.timesteps, scheduler, gen, callback=callback)

    def img2img(
        self,
        image: torch.Tensor,
        prompts: list[str],
        *,
        strength: float = 0.8,
        negative: str | list[str] = "",
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Re-imagine ``image`` (3, H, W) in [-1, 1]: noise it to ``strength`` and denoise."""
        self._latent_size(*image.shape[-2:])
        g = self._guidance(list(prompts), negative, guidance)
        gen = torch.Generator().manual_seed(seed)
        init = self.codec.encode(image[None].float(), gen).expand(len(prompts), -1, -1, -1)
        scheduler = self._scheduler()
        ts = img2img_timesteps(scheduler, steps, strength)
        noise = torch.randn(init.shape, generator=gen)
        latents = scheduler.add_noise(init, noise, ts[:1].repeat(len(prompts)))
        return self._run(latents, g, ts, scheduler, gen, callback=callback)

    def inpaint(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        prompts: list[str],
        *,
        strength: float = 1.0,
        negative: str | list[str] = "",
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Repaint the white part of ``mask`` (1, H, W; 1 = repaint) in ``image`` (3, H, W).

        A 9-channel SD-inpainting U-Net receives the mask and the masked image's latents;
        a 4-channel U-Net keeps the known region by replacement after every step.
        """
        h, w = self._latent_size(*image.shape[-2:])
        b, inpainting_unet = len(prompts), self.unet.config.in_channels > self.codec.latent_channels
        g = self._guidance(list(prompts), negative, guidance)
        gen = torch.Generator().manual_seed(seed)
        mask = (mask[None].float() >= 0.5).float()  # (1, 1, H, W), binarised as diffusers does
        scheduler = self._scheduler()
        ts = img2img_timesteps(scheduler, steps, strength)
        full = strength >= 1.0
        # random numbers in diffusers' order: image latents, noise, masked-image latents
        image_latents = None
        if not inpainting_unet or not full:
            image_latents = self.codec.encode(image[None].float(), gen).expand(b, -1, -1, -1)
        noise = torch.randn((b, self.codec.latent_channels, h, w), generator=gen)
        if full:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, ts[:1].repeat(b))
        masked = self.codec.encode((image[None].float() * (mask < 0.5)), gen).expand(b, -1, -1, -1)
        small = torch.nn.functional.interpolate(mask, size=(h, w)).expand(b, -1, -1, -1)
        if inpainting_unet:
            known = KnownRegion(masked, small, noise, extra=torch.cat([small, masked], dim=1))
        else:
            known = KnownRegion(image_latents, small, noise)
        return self._run(latents, g, ts, scheduler, gen, known=known, callback=callback)

    @property
    def default_size(self) -> int:
        """Pixel size the U-Net was trained at (diffusers' ``sample_size`` × VAE scale)."""
        return int(self.files.unet_sample_size) * self.codec.scale
