"""``DiffusionPipeline``: a trained text-conditioned U-Net + its schedule + its text encoder.

Built from a training run (or one checkpoint file) it turns prompts into images and fills
masked regions of an image; image files come and go as uint8 PNGs.

Example:
    >>> pipe = DiffusionPipeline.from_checkpoint("runs/digits")        # doctest: +SKIP
    >>> images = pipe.generate(["a handwritten digit three"] * 4)     # doctest: +SKIP
    >>> save_grid(images, "threes.png", nrow=4)                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetkit import runtime
from unetkit.data.io import write_image
from unetkit.diffusion.inpainting import InpaintingGuide
from unetkit.diffusion.samplers import build_scheduler
from unetkit.diffusion.sampling import generate
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import CheckpointError
from unetkit.formats.checkpoint import read_metadata
from unetkit.formats.loading import base_checkpoint, load_model_or_adapter
from unetkit.text import CaptionEmbeddingCache, load_text_encoder


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W) or (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    x = x.permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def save_grid(
    images: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None, pad: int = 2
) -> Path:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid, ``nrow`` images per row."""
    arr = to_uint8(images)
    n, h, w = arr.shape[:3]
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, *arr.shape[3:]), np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_image(path, grid)


def clips_x0_estimate(prediction_type: str) -> bool:
    """Whether pixel-space DDPM/DDIM sampling should clip the model's x0 estimate to [-1, 1]:
    only for ε-prediction (see ``DiffusionPipeline``'s ``clip_sample``)."""
    return prediction_type == "epsilon"


class DiffusionPipeline:
    """Prompt → image sampling and inpainting with one model.

    Args:
        model: the noise predictor (``DiffusionUNet``).
        schedule: its training ``NoiseSchedule``.
        text: a ``CaptionEmbeddingCache`` or ``TextEncoder`` (anything with ``encode`` or
            ``get``); None for unconditional models.
        size: image size; channels: image channels.
        sampler: default sampler name ("ddim", "ddpm", "dpmpp-2m", "euler").
        precision: one of ``runtime.PRECISIONS``; default "auto" (bf16 where the hardware
            computes it natively: on CPUs a frozen copy, see ``runtime.prepared``).
        clip_sample: clip the x0 estimate to [-1, 1] in DDPM/DDIM steps (pixel data).
            None (default): only for ε-prediction, whose x0 estimate is ill-conditioned at
            high noise; clipping a v- or x0-model's (well-conditioned) estimate makes the
            DDIM update inconsistent with its ε and ruins the samples (seen on the digits).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: Any,
        text: Any = None,
        *,
        size: int = 32,
        channels: int = 1,
        sampler: str = "ddim",
        precision: str = runtime.DEFAULT_PRECISION,
        clip_sample: bool | None = None,
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.text = text
        self.size = size
        self.channels = channels
        self.sampler = sampler
        self.precision = precision
        self.clip_sample = (
            clips_x0_estimate(schedule.prediction_type) if clip_sample is None else clip_sample
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, *, text_encoder: str | None = None, **options: Any
    ) -> DiffusionPipeline:
        """Load a run directory (its best checkpoint) or a checkpoint file."""
        model, described = load_model_or_adapter(base_checkpoint(path))
        file = described
        meta = read_metadata(described).get("diffusion")
        if meta is None:
            raise CheckpointError(
                f"{file}: a U-Net without unetkit diffusion metadata (no noise schedule or text "
                f"encoder; e.g. converted from another tool's bare U-Net); generate needs a "
                f"`unetkit diffusion-train` run, or a Stable Diffusion pipeline folder or "
                f"single-file checkpoint"
            )
        model.eval()
        encoder = load_text_encoder(
            text_encoder or meta["text_encoder"], max_length=meta.get("max_length")
        )
        return cls(
            model,
            NoiseSchedule.from_dict(meta["schedule"]),
            CaptionEmbeddingCache(encoder),
            size=int(meta["image_size"]),
            channels=int(meta["channels"]),
            sampler=options.pop("sampler", None) or meta.get("sampler", "ddim"),
            clip_sample=options.pop("clip_sample", meta.get("clip_sample")),
            **options,
        )

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(context, empty-caption context) for ``prompts``."""
        if self.text is None:
            return None, None
        if hasattr(self.text, "get"):
            return self.text.get(prompts), self.text.null()
        return self.text.encode(prompts), self.text.encode([""])

    def _scheduler(self, sampler: str | None) -> Any:
        name = sampler or self.sampler
        # pixel-space data lives in [-1, 1]: clipping the x0 estimate keeps an imperfect
        # model's trajectory in range (DDPM's own sampler does this; SD latents do not)
        if self.clip_sample and name in ("ddpm", "ddim"):
            return build_scheduler(name, self.schedule, clip_sample=True)
        return build_scheduler(name, self.schedule)

    def _run(self, prompts: list[str], **kwargs: Any) -> torch.Tensor:

        device = runtime.model_device(self.model)
        context, null = self.encode(prompts)
        if context is not None:
            context, null = context.to(device), null.to(device)
        sampler = kwargs.pop("sampler", None)
        shape = kwargs.pop("shape", None) or (len(prompts), self.channels, self.size, self.size)
        with runtime.prepared(self.model, self.precision) as runner:
            return generate(
                runner,
                self._scheduler(sampler),
                context,
                uncond_context=null,
                shape=shape,
                **kwargs,
            ).float()

    def generate(
        self,
        prompts: list[str],
        *,
        steps: int = 50,
        guidance: float = 3.0,
        sampler: str | None = None,
        seed: int = 0,
        callback: Any = None,
    ) -> torch.Tensor:
        """One sample per prompt: (N, C, H, W) in [-1, 1]."""
        return self._run(
            list(prompts),
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seed=seed,
            callback=callback,
        )

    def inpaint(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        prompt: str,
        *,
        n: int = 1,
        steps: int = 50,
        guidance: float = 3.0,
        sampler: str | None = None,
        resample: int = 1,
        seed: int = 0,
        callback: Any = None,
    ) -> torch.Tensor:
        """Fill ``mask`` (1, H, W; 1 = repaint) of ``image`` (C, H, W, in [-1, 1]).

        Models with 2C + 1 input channels get the SD-inpainting input layout, others
        known-region replacement (with RePaint resampling if ``resample > 1``).
        ``callback(i, t, x)`` runs after each step (progress, cancelling). Returns (n, C, H, W).
        """

        in_ch = getattr(getattr(self.model, "config", None), "in_channels", self.channels)
        mode = "concat" if in_ch == 2 * self.channels + 1 else "replace"
        guide = InpaintingGuide(
            image[None].expand(n, -1, -1, -1),
            mask[None].expand(n, -1, -1, -1),
            self.schedule.alphas_cumprod,
            mode=mode,
            resample=resample,
        )
        return self._run(
            [prompt] * n,
            steps=steps,
            guidance=guidance,
            sampler=sampler or ("ddpm" if resample > 1 else None),
            seed=seed,
            inpaint=guide,
            shape=(n, *image.shape),
            callback=callback,
        )

    def sample_grid(
        self,
        prompts: list[str],
        path: str | os.PathLike,
        *,
        per_prompt: int = 8,
        progress: bool = False,
        **kwargs: Any,
    ) -> Path:
        """A PNG grid with one row of ``per_prompt`` samples for each prompt
        (``progress``: a bar over the sampler steps on stderr)."""
        was_training = self.model.training
        self.model.eval()
        bar = None
        if progress:
            from tqdm import tqdm

            steps = kwargs.get("steps", 50)
            # mininterval 0: every step is drawn (a step takes far longer than drawing)
            bar = tqdm(total=steps, desc="sample grid", leave=False, mininterval=0)
            kwargs["callback"] = lambda i, t, x: bar.update(1)
        try:
            images = self.generate([p for p in prompts for _ in range(per_prompt)], **kwargs)
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        return save_grid(images, path, nrow=per_prompt)
