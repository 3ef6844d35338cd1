"""``generate``: the sampler loop with classifier-free guidance and optional inpainting.

Classifier-free guidance (Ho & Salimans 2022): the model is trained with the condition
dropped (replaced by the empty caption's embedding) for a fraction of the samples; at
sampling time both predictions come from one batched forward and are mixed as
``uncond + guidance * (cond - uncond)``. ``guidance=1`` is the plain conditional model and
skips the unconditional half.

Example:
    >>> from unetkit.diffusion import NoiseSchedule, build_scheduler
    >>> sched = build_scheduler("ddim", NoiseSchedule())               # doctest: +SKIP
    >>> images = generate(model, sched, context, uncond_context=null,  # doctest: +SKIP
    ...                   shape=(16, 1, 32, 32), steps=50, guidance=3.0, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from unetkit.diffusion.inpainting import InpaintingGuide
from unetkit.errors import ConfigError
from unetkit.runtime import model_device

StepCallback = Callable[[int, int, torch.Tensor], None]


def guided_output(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor | None,
    uncond_context: torch.Tensor | None,
    guidance: float,
    *,
    class_labels: torch.Tensor | None = None,
    extra_channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """One (guided) model prediction for the batch ``x`` (B, C, ...) at timestep ``t``.

    ``extra_channels`` (B, E, ...) are concatenated after ``x`` on the channel axis: the
    mask and masked image of the 9-channel SD-inpainting layout.
    """
    inp = x if extra_channels is None else torch.cat([x, extra_channels], dim=1)
    tt = t.expand(x.shape[0]) if t.ndim == 0 else t
    if guidance == 1.0 or uncond_context is None:
        return _call(model, inp, tt, context, class_labels)
    # one forward for both halves: [conditional; unconditional]
    ctx = torch.cat([context, uncond_context.expand_as(context)]) if context is not None else None
    labels = None if class_labels is None else torch.cat([class_labels, class_labels])
    out = _call(model, torch.cat([inp, inp]), torch.cat([tt, tt]), ctx, labels)
    cond, uncond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def _call(model, x, t, context, class_labels):
    if class_labels is None:
        return model(x, t, context)
    return model(x, t, context, class_labels=class_labels)


@torch.inference_mode()
def generate(
    model: nn.Module,
    scheduler: Any,
    context: torch.Tensor | None,
    *,
    shape: tuple[int, ...],
    steps: int = 50,
    guidance: float = 1.0,
    uncond_context: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    seed: int | None = 0,
    noise: torch.Tensor | None = None,
    inpaint: InpaintingGuide | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample ``shape`` (B, C, H, W) from noise with ``scheduler`` in ``steps`` steps.

    Args:
        model: noise predictor ``model(x_t, t, context)`` (e.g. ``DiffusionUNet``).
        scheduler: a scheduler from ``unetkit.diffusion`` (DDPM, DDIM, DPM-Solver++ 2M…).
        context: (B, L, D) text embeddings, or None for an unconditional model.
        shape: output shape; B must equal the context's batch.
        steps: number of sampler steps.
        guidance: classifier-free guidance scale (1 = none; needs ``uncond_context``).
        uncond_context: (1, L, D) or (B, L, D) embedding of the empty caption.
        class_labels: (B,) class ids for class-conditional models.
        seed: seeds the initial noise and the stochastic samplers.
        noise: explicit initial noise (B, C, H, W), overrides ``seed`` for the start.
        inpaint: an ``InpaintingGuide`` that keeps the known region (see inpainting.py).
        callback: ``callback(i, t, x)`` after each step (progress bars, previews).

    Returns:
        (B, C, H, W) samples in the model's data range (e.g. [-1, 1]).
    """
    if guidance != 1.0 and uncond_context is None:
        raise ConfigError(
            f"guidance={guidance} needs uncond_context (the empty caption's embedding)"
        )
    if context is not None and context.shape[0] != shape[0]:
        raise ConfigError(f"context batch {context.shape[0]} != sample batch {shape[0]}")
    device = model_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed if seed is not None else 0)
    x = noise if noise is not None else torch.randn(shape, generator=gen)
    scheduler.set_timesteps(steps)  # first: Euler's init_noise_sigma depends on it
    timesteps = scheduler.timesteps
    x = x.to(device) * scheduler.init_noise_sigma
    extra = inpaint.model_channels() if inpaint is not None else None
    repeats = inpaint.resample if inpaint is not None else 1
    if repeats > 1 and type(scheduler).__name__ not in ("DDPMScheduler", "DDIMScheduler"):
        raise ConfigError(
            f"RePaint resampling needs a single-step sampler (ddpm or ddim), not "
            f"{type(scheduler).__name__}; use resample=1 or another sampler"
        )
    for i, t in enumerate(timesteps):
        for r in range(repeats):
            out = guided_output(
                model,
                scheduler.scale_model_input(x, t),
                t.to(device),
                context,
                uncond_context,
                guidance,
                class_labels=class_labels,
                extra_channels=extra,
            )
            x_prev = scheduler.step(out.float(), t, x, generator=gen)
            if inpaint is not None:
                x_prev = inpaint.keep_known(x_prev, i, timesteps, gen, scheduler.add_noise)
                if r < repeats - 1:  # RePaint: jump back to t and denoise again
                    x = inpaint.renoise(x_prev, i, timesteps, gen)
        x = x_prev
        if callback is not None:
            callback(i, int(t), x)
    return x
