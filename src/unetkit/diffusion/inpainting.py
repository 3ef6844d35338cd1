"""Inpainting: fill the masked region of an image, keep the rest.

Two ways, chosen by the model:

* **Known-region replacement** (any noise predictor; Lugmayr et al. 2022, "RePaint"):
  after every sampler step the known pixels are overwritten with the original image noised
  to the step's timestep, so the model only ever invents the masked region and its
  borders agree with the known content. ``resample > 1`` adds RePaint's resampling: the
  step is undone by re-noising and repeated, which harmonises the filled region further.
* **Mask-conditioned input** (the 9-channel SD-inpainting layout): the model receives
  ``[x_t, mask, masked_image]`` on the channel axis (4 + 1 + 4 latent channels in SD; for
  a pixel model with C channels, 2C + 1) and was trained to fill the hole itself.

Mask convention (as in Stable Diffusion's inpainting): 1 = repaint, 0 = keep.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unetkit.errors import ConfigError

MODES = ("replace", "concat")


class InpaintingGuide:
    """Keeps the known region of ``image`` during sampling.

    Args:
        image: (B, C, H, W) the image in the model's data range (e.g. [-1, 1]).
        mask: (B, 1, H, W) or (B, C, H, W), 1 where to generate, 0 where to keep.
        alphas_cumprod: (T,) the noise schedule's cumulative alpha product.
        mode: "replace" (known-region replacement) or "concat" (9-channel input layout).
        resample: RePaint resampling count per step (1 = none).

    Example:
        >>> guide = InpaintingGuide(img, mask, schedule.alphas_cumprod)   # doctest: +SKIP
        >>> out = generate(model, sched, ctx, shape=img.shape, inpaint=guide)  # doctest: +SKIP
    """

    def __init__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        *,
        mode: str = "replace",
        resample: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"inpainting mode {mode!r} is not one of {MODES}")
        if image.ndim != 4 or mask.ndim != 4 or mask.shape[2:] != image.shape[2:]:
            raise ConfigError(
                f"image (B, C, H, W) and mask (B, 1, H, W) must agree; got "
                f"{tuple(image.shape)} and {tuple(mask.shape)}"
            )
        if resample < 1:
            raise ConfigError(f"resample={resample} must be >= 1")
        self.image = image.float()
        self.mask = (mask > 0.5).float()
        self.known = 1.0 - self.mask
        self.alphas_cumprod = alphas_cumprod.double()
        self.mode = mode
        self.resample = resample if mode == "replace" else 1

    def model_channels(self) -> torch.Tensor | None:
        """The extra input channels of the 9-channel layout: [mask, masked image]."""
        if self.mode != "concat":
            return None
        return torch.cat([self.mask[:, :1], self.image * self.known[:, :1]], dim=1)

    def _alpha_bar(self, timesteps: torch.Tensor, i: int) -> float:
        """alpha-bar after step i (1.0 after the last step: the clean image)."""
        if i + 1 >= len(timesteps):
            return 1.0
        return float(self.alphas_cumprod[int(timesteps[i + 1])])

    def keep_known(
        self,
        x: torch.Tensor,
        i: int,
        timesteps: torch.Tensor,
        gen: torch.Generator,
        add_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Overwrite the known pixels of the sample after step ``i`` with the image noised
        to the next timestep by the sampler's own ``add_noise`` (variance-preserving or
        sigma-space), and with the image itself after the last step."""
        if self.mode != "replace":
            return x
        image = self.image.to(x)
        if i + 1 < len(timesteps):
            noise = torch.randn(x.shape, generator=gen).to(x)
            t_next = timesteps[i + 1].expand(x.shape[0])
            image = add_noise(image, noise, t_next)
        return self.known.to(x) * image + self.mask.to(x) * x

    def renoise(
        self, x_prev: torch.Tensor, i: int, timesteps: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """One forward-process jump from the timestep after step ``i`` back to step ``i``'s:
        x_t ~ N(sqrt(ab_t / ab_prev) x_prev, (1 - ab_t / ab_prev) I)."""
        ratio = float(self.alphas_cumprod[int(timesteps[i])]) / self._alpha_bar(timesteps, i)
        noise = torch.randn(x_prev.shape, generator=gen).to(x_prev)
        return ratio**0.5 * x_prev + (1.0 - ratio) ** 0.5 * noise
