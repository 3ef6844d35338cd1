"""The denoising training objective: sample t and ε, noise x₀, regress the target.

L = E_{t, ε} [ w(t) · ‖model(x_t, t, c) - target‖² ],  x_t = sqrt(ᾱ_t) x₀ + sqrt(1-ᾱ_t) ε,

with target ε (Ho et al. 2020, "L_simple"), v (Salimans & Ho 2022) or x₀, per the
schedule's ``prediction_type``, and w(t) = 1 or the min-SNR-γ weight of Hang et al. 2023
("Efficient Diffusion Training via Min-SNR Weighting Strategy"): the loss of the x₀
reconstruction is weighted by min(SNR(t), γ), which in terms of the trained target is

    ε-prediction: min(SNR, γ) / SNR,   v-prediction: min(SNR, γ) / (SNR + 1),
    x₀-prediction: min(SNR, γ).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import ConfigError


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-γ loss weights (Hang et al. 2023) for the schedule's target.

    Args:
        schedule: gives SNR(t) = ᾱ_t / (1 - ᾱ_t) and the prediction type.
        t: (B,) integer timesteps.
        gamma: the clamp γ (5 in the paper).

    Returns:
        (B,) float64 weights on ``t``'s device.

    Example:
        >>> s = NoiseSchedule()
        >>> w = min_snr_weights(s, torch.tensor([10, 900]), 5.0)  # low t: SNR > 5, w < 1
    """
    if not gamma > 0:
        raise ConfigError(f"min_snr_gamma={gamma} must be > 0 (5.0 in Hang et al. 2023)")
    snr = schedule.snr(t)
    clipped = snr.clamp(max=gamma)
    if schedule.prediction_type == "epsilon":
        return clipped / snr
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def _draw(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    # on the generator's device, so a seeded CPU generator gives the same draw on any device
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    context: torch.Tensor | None,
    schedule: NoiseSchedule,
    *,
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar denoising loss of ``model`` on the clean batch ``x0``.

    Draws (in this order, from ``generator`` when given) t ~ U{0, …, T-1} per sample and
    ε ~ N(0, I), forms x_t, calls ``model(x_t, t, context)`` (plus
    ``class_labels=class_labels`` when given) and returns the (weighted) mean squared error
    to the schedule's target, computed in float32.

    Args:
        model: noise predictor, e.g. ``DiffusionUNet``.
        x0: (B, C, ...) clean samples (images or latents, typically in [-1, 1]).
        context: (B, L, D) conditioning (text embeddings) or None.
        schedule: the ``NoiseSchedule``; its ``prediction_type`` picks the target.
        generator: makes t and ε reproducible (e.g. fixed validation draws).
        class_labels: (B,) class ids for class-conditional models.
        min_snr_gamma: γ of min-SNR weighting; None = plain MSE (every t weighted 1).
        timesteps: (B,) fixed timesteps instead of random ones.
        noise: fixed ε (same shape as ``x0``) instead of a random draw.

    Example:
        >>> net = lambda x, t, c: torch.zeros_like(x)
        >>> loss = diffusion_loss(net, torch.zeros(2, 1, 8, 8), None, NoiseSchedule())
        >>> round(loss.item(), 1)  # ε-target, zero prediction: E[ε²] ≈ 1
        1.0
    """
    if x0.ndim < 2:
        raise ConfigError(f"x0 must be a batch (B, C, ...), got shape {tuple(x0.shape)}")
    b, device = x0.shape[0], x0.device
    big_t = schedule.num_train_timesteps
    if timesteps is None:
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, big_t, (b,), generator=generator, device=gen_device).to(device)
    else:
        t = torch.as_tensor(timesteps, device=device).long().reshape(-1)
        if t.shape[0] != b:
            raise ConfigError(f"timesteps has {t.shape[0]} entries, the batch has {b}")
    if noise is None:
        noise = _draw(tuple(x0.shape), generator, device).to(x0.dtype)
    elif noise.shape != x0.shape:
        raise ConfigError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    if class_labels is None:
        pred = model(x_t, t, context)
    else:
        pred = model(x_t, t, context, class_labels=class_labels)
    if pred.shape != target.shape:
        raise ConfigError(
            f"model output shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; "
            f"out_channels must equal the input's {x0.shape[1]} channels"
        )
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if min_snr_gamma is None:
        return err.mean()
    per_sample = err.reshape(b, -1).mean(dim=1)
    weights = min_snr_weights(schedule, t, min_snr_gamma).to(per_sample.dtype)
    return (per_sample * weights).mean()
