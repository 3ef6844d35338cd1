"""Latent diffusion pieces: the VAE and CLIP adapters and the latent denoising loop.

Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models") denoises in the latent space of an autoencoder, conditioned on CLIP text
embeddings. The U-Net is ours; the autoencoder (diffusers' ``AutoencoderKL``) and the text
encoder (transformers' ``CLIPTextModel`` + ``CLIPTokenizer``) are wrapped here so that the
loop below sees three plain functions: images ↔ latents, prompts → context.

The loop follows diffusers' ``StableDiffusion*Pipeline`` step for step (the order in which
random numbers are drawn, guidance as ``uncond + g (cond − uncond)`` on one batch
``[uncond; cond]``, img2img's start step ``T − int(T·strength)``, inpainting's
known-region replacement with the starting noise), so that a seed gives the same image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from unetkit.errors import ConfigError
from unetkit.runtime import model_device

StepCallback = Callable[[int, int], None]


class LatentCodec:
    """Images in [-1, 1] ↔ scaled latents with a VAE (diffusers ``AutoencoderKL``).

    Args:
        vae: the autoencoder (``encode(x).latent_dist`` and ``decode(z).sample``).
        scaling_factor: latents are multiplied by it after encoding (SD 1.x: 0.18215).
        compute_dtype: run the VAE under autocast in this dtype (e.g. bf16 on a CPU that
            computes it natively); None runs it in its weights' dtype. Autocast keeps the
            weights and the module untouched (the same VAE may serve a float32 pipeline)
            and its norms in float32. Results are float32 either way.
    """

    def __init__(
        self, vae: nn.Module, scaling_factor: float, compute_dtype: torch.dtype | None = None
    ) -> None:
        self.vae = vae.eval()
        self.scaling_factor = float(scaling_factor)
        self.compute_dtype = compute_dtype
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.image_channels = int(cfg.in_channels)
        self.scale = 2 ** (len(cfg.block_out_channels) - 1)  # pixels per latent

    def _autocast(self) -> torch.autocast:
        device = model_device(self.vae).type
        return torch.autocast(device, self.compute_dtype, enabled=self.compute_dtype is not None)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 4, H/s, W/s) float32 latents sampled with
        ``generator``."""
        with self._autocast():
            dist = self.vae.encode(images).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → (B, 3, H, W) float32 images in [-1, 1] (not clamped)."""
        with self._autocast():
            return self.vae.decode(latents / self.scaling_factor).sample.float()


class PromptEncoder:
    """Prompts → (B, L, D) CLIP token embeddings, padded to the tokenizer's length.

    Args:
        tokenizer: a transformers tokenizer. text_encoder: e.g. ``CLIPTextModel``.
    """

    def __init__(self, tokenizer: Any, text_encoder: nn.Module) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        # SD 1.x/2.x text encoders are run without an attention mask (as trained)
        return self.text_encoder(ids)[0]


@dataclass
class Guidance:
    """The text condition of a run: (B, L, D) prompt and negative-prompt embeddings."""

    context: torch.Tensor
    negative: torch.Tensor
    scale: float = 7.5

    def predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided model output for latents ``x`` (B, C, h, w) at timestep ``t``."""
        tt = t.reshape(1).expand(x.shape[0])
        if self.scale == 1.0:
            return model(x, tt, self.context)
        out = model(
            torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([self.negative, self.context])
        )
        uncond, cond = out.float().chunk(2)
        return uncond + self.scale * (cond - uncond)


@dataclass
class KnownRegion:
    """What inpainting keeps: (B, C, h, w) image latents and a (B, 1, h, w) mask (1 = repaint).

    With ``extra`` (the 9-channel SD-inpainting U-Net) the model receives
    ``[x_t, mask, masked-image latents]`` and fills the hole itself; otherwise the known
    latents, noised to each next timestep with the run's starting noise, replace the
    known region after every step (diffusers' rule for 4-channel U-Nets).
    """

    latents: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor
    extra: torch.Tensor | None = None


def denoise(
    model: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    guidance: Guidance,
    *,
    timesteps: torch.Tensor,
    generator: torch.Generator | None = None,
    known: KnownRegion | None = None,
    callback: StepCallback | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` over ``timesteps`` from ``latents`` (already scaled/noised).

    Args:
        model: noise predictor ``model(x, t, context)``, e.g. ``DiffusionUNet`` or its
            frozen fast-path copy.
        scheduler: a ``unetkit.diffusion`` scheduler after ``set_timesteps``.
        latents: (B, C, h, w) starting latents.
        guidance: contexts and scale. timesteps: the run's timesteps (a tail of
            ``scheduler.timesteps`` for img2img).
        generator: for stochastic samplers. known: inpainting. callback: ``(i, n)`` after
            each step (progress bars). device: where ``model`` runs (default: its
            parameters' device; give it for a ``runtime.Runner``).

    Returns:
        (B, C, h, w) float32 latents.
    """
    x = latents.float()
    device = device or model_device(model)
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            inp = scheduler.scale_model_input(x, t)
            if known is not None and known.extra is not None:
                inp = torch.cat([inp, known.extra], dim=1)
            out = guidance.predict(model, inp.to(device), t.to(device)).float().cpu()
            x = scheduler.step(out, t, x, generator=generator)
            if known is not None and known.extra is None:
                image = known.latents
                if i + 1 < len(timesteps):
                    image = scheduler.add_noise(image, known.noise, timesteps[i + 1 : i + 2])
                x = (1.0 - known.mask) * image + known.mask * x
            if callback is not None:
                callback(i + 1, len(timesteps))
    return x


def img2img_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The tail of ``scheduler.timesteps`` an img2img run of ``strength`` walks (diffusers'
    rule: skip the first ``steps − int(steps · strength)``)."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"--strength {strength} must be in (0, 1]")
    scheduler.set_timesteps(steps)
    start = max(steps - min(int(steps * strength), steps), 0)
    ts = scheduler.timesteps[start:]
    if len(ts) == 0:
        raise ConfigError(f"--strength {strength} with --steps {steps} leaves no step to run")
    return ts
