"""DPM-Solver++ 2M: the second-order multistep solver of the diffusion ODE in data-prediction
form (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", algorithm 2), the "DPM++ 2M" sampler of k-diffusion and diffusers.

With α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t), λ_t = log(α_t / σ_t) and the step h = λ_{t'} - λ_t,
one step from x_t with the model's data prediction D₀ = x̂₀(x_t) is

    first order (= DDIM):  x_{t'} = (σ_{t'}/σ_t) x_t - α_{t'} (e^{-h} - 1) D₀
    second order:          ... - ½ α_{t'} (e^{-h} - 1) D₁,   D₁ = (D₀ - D₋₁) / r,
                           r = h₋₁ / h,  h₋₁ = λ_t - λ_{t_prev}

(the "midpoint" variant). The run ends on σ = 0, i.e. on x̂₀ itself; that step and the first
one are first order (there is no history yet, and at σ = 0 the correction term is
undefined), which is diffusers' default (``lower_order_final``, ``final_sigmas_type="zero"``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from unetkit.diffusion.schedulers import Scheduler, Timesteps
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import ConfigError


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ (multistep, order 1 or 2) with diffusers' default final-step handling.

    Stateful: each ``step`` remembers the data prediction for the next one, so a run calls
    ``step`` once per timestep in order (``set_timesteps`` resets the history).

    Args:
        schedule: the training ``NoiseSchedule`` (ε, v or x₀ prediction).
        order: 2 (DPM++ 2M, default) or 1 (equivalent to DDIM with eta=0 on these
            timesteps).
        timestep_spacing, steps_offset: default "linspace" with offset 0 (diffusers'
            defaults for this solver); the timesteps are rounded to integers.

    Example:
        >>> sched = DPMSolverMultistepScheduler(NoiseSchedule())
        >>> sched.set_timesteps(20)
        >>> x = torch.randn(1, 4, 8, 8)
        >>> for t in sched.timesteps:
        ...     x = sched.step(torch.zeros_like(x), t, x)  # model(x, t, ctx) in practice
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        order: int = 2,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        if order not in (1, 2):
            raise ConfigError(f"order={order!r} is not supported; use 1 or 2 (DPM++ 2M)")
        self.order = order
        self._alpha = np.zeros(1)
        self._sigma = np.zeros(1)
        self._history: tuple[int, torch.Tensor] | None = None

    def _timesteps_for(self, n: int) -> np.ndarray:
        big_t = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            # diffusers: n + 1 points over [0, T-1], drop the one at t = 0
            ts = np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            ts = np.arange(n + 1)[::-1][:-1] * (big_t // (n + 1)) + self.steps_offset
        else:
            ts = np.round(np.arange(big_t, 0, -big_t / n)) - 1
        return np.ascontiguousarray(ts).astype(np.int64)

    def _after_set_timesteps(self) -> None:
        ab = self._ab.numpy()[self.timesteps.cpu().numpy()]
        # per step i: α_i, σ_i of x_t = α x₀ + σ ε; the entry after the last is the clean
        # data (α = 1, σ = 0)
        self._alpha = np.append(np.sqrt(ab), 1.0)
        self._sigma = np.append(np.sqrt(1.0 - ab), 0.0)
        self._history = None

    def _lambda(self, i: int) -> float:
        """log(α/σ) at step i (only called where σ > 0)."""
        return math.log(self._alpha[i] / self._sigma[i])

    def step(
        self,
        model_output: torch.Tensor,
        t: Timesteps,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One multistep update from ``sample`` (B, C, ...) at timestep ``t`` to the next
        timestep of the run (``generator`` unused: the solver is deterministic)."""
        i = self._index(t)
        last = i == len(self.timesteps) - 1
        if i == 0:
            self._history = None
        x0 = self.schedule.predict_x0(model_output, sample, int(self.timesteps[i]))
        work = sample.float() if sample.dtype in (torch.float16, torch.bfloat16) else sample
        a_next, s_next, s_now = self._alpha[i + 1], self._sigma[i + 1], self._sigma[i]
        # e^{-h} = (σ'/α') / (σ/α): exact 0 at the final σ = 0, no infinities on the way
        exp_neg_h = (s_next / a_next) / (s_now / self._alpha[i])
        prev_sample = (s_next / s_now) * work - a_next * (exp_neg_h - 1.0) * x0
        use_second = (
            self.order == 2 and not last and self._history is not None and self._history[0] == i - 1
        )
        if use_second:
            x0_prev = self._history[1]
            h = self._lambda(i + 1) - self._lambda(i)
            r = (self._lambda(i) - self._lambda(i - 1)) / h
            d1 = (x0 - x0_prev) / r
            prev_sample = prev_sample - 0.5 * a_next * (exp_neg_h - 1.0) * d1
        self._history = (i, x0)
        return prev_sample.to(model_output.dtype)
