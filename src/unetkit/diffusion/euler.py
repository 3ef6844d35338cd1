"""Euler sampler of the probability-flow ODE in σ-space (Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models", algorithm 1 without churn): the
"Euler" sampler of k-diffusion and diffusers' ``EulerDiscreteScheduler``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from unetkit.diffusion.schedulers import Scheduler, spaced_timesteps
from unetkit.diffusion.schedules import NoiseSchedule, Timesteps


class EulerDiscreteScheduler(Scheduler):
    """Euler sampler of the probability-flow ODE in σ-space (Karras et al. 2022, alg. 1
    without churn), the "Euler" of k-diffusion and diffusers.

    The sample lives in the variance-exploding parameterisation x = x_VP · sqrt(1 + σ²) with
    σ_t = sqrt((1-ᾱ_t)/ᾱ_t); hence ``init_noise_sigma`` > 1 and ``scale_model_input``
    divides by sqrt(1 + σ²) before the network sees it. The last step goes to σ = 0.

    Args:
        schedule: the training ``NoiseSchedule``.
        timestep_spacing, steps_offset: default "leading" with offset 1 (SD's config).
            With "linspace" the timesteps are fractional (float32, as in diffusers) and σ
            is interpolated linearly between table entries.

    Example:
        >>> sched = EulerDiscreteScheduler(NoiseSchedule())
        >>> sched.set_timesteps(10)
        >>> x = torch.randn(1, 4, 8, 8) * sched.init_noise_sigma
        >>> for t in sched.timesteps:
        ...     out = torch.zeros_like(x)  # model(sched.scale_model_input(x, t), t, ctx)
        ...     x = sched.step(out, t, x)
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
    ) -> None:
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        ab = schedule.alphas_cumprod.numpy()
        self._all_sigmas = np.sqrt((1.0 - ab) / ab)  # float64, index = training timestep
        # before set_timesteps: the whole table (what init_noise_sigma reports then)
        self.sigmas = np.append(self._all_sigmas[::-1], 0.0)

    def _timesteps_for(self, n: int) -> np.ndarray:
        ts = spaced_timesteps(self.num_train_timesteps, n, self.timestep_spacing, self.steps_offset)
        if self.timestep_spacing == "linspace":
            return ts.astype(np.float32)
        return np.round(ts).astype(np.int64)

    def _after_set_timesteps(self) -> None:
        ts = self.timesteps.cpu().double().numpy()
        grid = np.arange(len(self._all_sigmas))
        self.sigmas = np.append(np.interp(ts, grid, self._all_sigmas), 0.0)

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        """The scale of x at the first step: σ_max, or sqrt(σ_max² + 1) for "leading"
        spacing, whose first timestep is below T-1 (diffusers' convention)."""
        smax = float(self.sigmas.max())
        return smax if self.timestep_spacing != "leading" else math.sqrt(smax**2 + 1.0)

    def scale_model_input(self, sample: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """x / sqrt(σ_t² + 1): the variance-preserving input the network was trained on."""
        sigma = self.sigmas[self._index(t)]
        return sample / math.sqrt(sigma**2 + 1.0)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """x₀ + σ_t ε (the σ-space forward process), for timesteps of the current run."""
        values = torch.as_tensor(t).flatten().tolist()
        sig = torch.tensor([self.sigmas[self._index(v)] for v in values], dtype=x0.dtype)
        sig = sig.to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        return x0 + (sig if len(values) > 1 else sig.flatten()[0]) * noise

    def step(
        self,
        model_output: torch.Tensor,
        t: Timesteps,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One Euler step dx/dσ = (x - x̂₀)/σ from σ_t to the next σ (``generator`` unused)."""
        i = self._index(t)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        work = sample.float() if sample.dtype in (torch.float16, torch.bfloat16) else sample
        pt = self.schedule.prediction_type
        if pt == "epsilon":
            x0 = work - sigma * model_output
        elif pt == "v_prediction":
            c = math.sqrt(sigma**2 + 1.0)
            x0 = model_output * (-sigma / c) + work / c**2
        else:
            x0 = model_output
        derivative = (work - x0) / sigma
        return (work + derivative * (sigma_next - sigma)).to(model_output.dtype)
