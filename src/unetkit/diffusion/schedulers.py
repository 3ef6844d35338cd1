"""Samplers of the reverse process, with the verbs users know from diffusers.

Every scheduler wraps a ``NoiseSchedule`` and offers:

* ``set_timesteps(n)``: choose the n timesteps of a sampling run -> ``.timesteps``
  (descending LongTensor);
* ``init_noise_sigma``: the scale of the starting noise;
* ``scale_model_input(x, t)``: what the network sees at step t;
* ``step(model_output, t, sample, generator=None)``: the previous sample x_{t'} as a tensor;
* ``add_noise(x0, noise, t)``: the forward process in the sampler's own parameterisation.

Timestep spacings (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
flawed", table 2): ``"leading"`` = k·(T // n) + steps_offset (Stable Diffusion uses
steps_offset=1), ``"trailing"`` = round(T - k·T/n) - 1 (starts at t = T-1), ``"linspace"``
= round(linspace(0, T-1, n)). Each scheduler follows diffusers' definition, so that a run
compares step by step with the reference library.

This module holds the base class, DDPM (Ho et al. 2020) and DDIM (Song et al. 2021);
DPM-Solver++ 2M is in ``dpm_solver.py``, Euler in ``euler.py``, and ``samplers.py`` builds
any of them by name (``build_scheduler``).

Example:
    >>> from unetkit.diffusion import NoiseSchedule
    >>> sched = DDIMScheduler(NoiseSchedule())
    >>> sched.set_timesteps(4)
    >>> sched.timesteps.tolist()
    [751, 501, 251, 1]
"""

from __future__ import annotations

import math

import numpy as np
import torch

from unetkit import config as cfg
from unetkit.diffusion.schedules import NoiseSchedule, Timesteps
from unetkit.errors import ConfigError

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
def spaced_timesteps(num_train: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """The n descending sampling timesteps of a T-step process (float64; integral except
    for "linspace" before rounding, see callers)."""
    cfg.check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if spacing == "leading":
        return (np.arange(n)[::-1] * (num_train // n) + steps_offset).astype(np.float64)
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / n)) - 1.0
    return np.linspace(0, num_train - 1, n)[::-1].copy()


def random_noise(
    like: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device (so a CPU
    generator gives the same numbers for a GPU run) and moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=dtype or like.dtype)
    return noise.to(like.device)


class Scheduler:
    """Base class: timestep bookkeeping shared by all samplers.

    Args:
        schedule: the training ``NoiseSchedule`` (prediction type included).
        timestep_spacing: "leading", "trailing" or "linspace" (see the module docstring).
        steps_offset: added to "leading" timesteps (1 in Stable Diffusion's config).
    """

    init_noise_sigma: float = 1.0

    def __init__(
        self, schedule: NoiseSchedule, *, timestep_spacing: str = "leading", steps_offset: int = 0
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise ConfigError(
                f"schedule must be a NoiseSchedule, got {type(schedule).__name__}; build one "
                f"with NoiseSchedule(...) or NoiseSchedule.from_diffusers_config(...)"
            )
        cfg.check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.schedule = schedule
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.zeros(0, dtype=torch.long)
        self._ab = schedule.alphas_cumprod  # float64 (T,)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None):
        """Choose the timesteps of an ``num_inference_steps``-step run (``.timesteps``)."""
        n, big_t = int(num_inference_steps), self.num_train_timesteps
        if not 1 <= n <= big_t:
            raise ConfigError(
                f"num_inference_steps={num_inference_steps} must be in [1, {big_t}] "
                f"(num_train_timesteps of the schedule)"
            )
        ts = self._timesteps_for(n)
        if ts.max() > big_t - 1 or ts.min() < 0:
            raise ConfigError(
                f"{n} steps with timestep_spacing={self.timestep_spacing!r} and steps_offset="
                f"{self.steps_offset} give timesteps outside [0, {big_t - 1}]; use fewer "
                f"steps, steps_offset=0 or timestep_spacing='trailing'"
            )
        self.num_inference_steps = n
        self.timesteps = torch.from_numpy(ts).to(device or "cpu")
        self._after_set_timesteps()

    def _timesteps_for(self, n: int) -> np.ndarray:
        """Descending int64 timesteps (subclasses with other rules override)."""
        ts = spaced_timesteps(self.num_train_timesteps, n, self.timestep_spacing, self.steps_offset)
        return np.round(ts).astype(np.int64)

    def _after_set_timesteps(self) -> None:
        """Hook for per-run state (sigma tables, solver history)."""

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ConfigError(f"{type(self).__name__}: call set_timesteps(n) before step()")

    def _index(self, t: Timesteps) -> int:
        """Position of timestep ``t`` in ``self.timesteps``."""
        self._require_timesteps()
        value = _scalar(t)
        hits = (self.timesteps.cpu().double() == value).nonzero()
        if len(hits) == 0:
            raise ConfigError(
                f"timestep {value:g} is not one of this run's timesteps "
                f"{self.timesteps.tolist()[:8]}…; pass the values of scheduler.timesteps"
            )
        return int(hits[0])

    def scale_model_input(self, sample: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """The network input at step ``t`` (identity for variance-preserving samplers)."""
        return sample

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """The forward process q(x_t | x₀) (see ``NoiseSchedule.add_noise``)."""
        return self.schedule.add_noise(x0, noise, t)

    def step(
        self,
        model_output: torch.Tensor,
        t: Timesteps,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _alpha_bar(self, t: int) -> float:
        return float(self._ab[t])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.schedule!r}, steps={self.num_inference_steps})"


def _scalar(t: Timesteps) -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            flat = t.flatten()
            if not bool((flat == flat[0]).all()):
                raise ConfigError(f"step() takes one timestep for the batch, got {t.tolist()}")
            t = flat[0]
        return float(t.item())
    return float(t)


def _clip(x0: torch.Tensor, clip_sample: bool, clip_range: float) -> torch.Tensor:
    return x0.clamp(-clip_range, clip_range) if clip_sample else x0


class DDPMScheduler(Scheduler):
    """Ancestral sampling of DDPM (Ho et al. 2020, eq. 6-7): x_{t'} ~ q(x_{t'} | x_t, x̂₀).

    With fewer steps than T the posterior is the one between consecutive chosen timesteps
    (as in diffusers). ``variance_type="fixed_small"`` uses the posterior variance β̃
    (the paper's σ² = β̃ choice), ``"fixed_large"`` uses β.

    Args:
        schedule: the training ``NoiseSchedule``.
        variance_type: "fixed_small" or "fixed_large".
        clip_sample: clamp x̂₀ to [-clip_sample_range, clip_sample_range] (off for latents).
        timestep_spacing, steps_offset: see ``Scheduler``; default leading, offset 0, so
            ``set_timesteps(T)`` is the full chain T-1 … 0 (also the state after __init__).

    Example:
        >>> sched = DDPMScheduler(NoiseSchedule(beta_schedule="linear",
        ...                       beta_start=1e-4, beta_end=0.02))
        >>> x = torch.randn(1, 1, 4, 4)
        >>> x = sched.step(torch.zeros_like(x), 999, x, generator=torch.Generator())
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        variance_type: str = "fixed_small",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ) -> None:
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        cfg.check_choice("variance_type", variance_type, ("fixed_small", "fixed_large"))
        self.variance_type = variance_type
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)
        # usable without set_timesteps: the full chain T-1 ... 0, as in diffusers
        self.num_inference_steps = schedule.num_train_timesteps
        self.timesteps = torch.arange(schedule.num_train_timesteps - 1, -1, -1)

    def step(
        self,
        model_output: torch.Tensor,
        t: Timesteps,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One ancestral step from ``sample`` (B, C, ...) at timestep ``t``; adds fresh noise
        drawn from ``generator`` except at the last step."""
        i = self._index(t)
        tt = int(self.timesteps[i])
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        ab_t = self._alpha_bar(tt)
        ab_prev = self._alpha_bar(prev) if prev >= 0 else 1.0
        alpha = ab_t / ab_prev  # ᾱ_t / ᾱ_{t'}: one "effective" step between t' and t
        beta = 1.0 - alpha
        x0 = self.schedule.predict_x0(model_output, sample, tt)
        x0 = _clip(x0, self.clip_sample, self.clip_sample_range)
        # posterior mean μ̃(x_t, x₀), eq. 7 of Ho et al.
        c0 = math.sqrt(ab_prev) * beta / (1.0 - ab_t)
        ct = math.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab_t)
        mean = c0 * x0 + ct * sample
        if tt == 0:
            return mean
        if self.variance_type == "fixed_small":
            var = max((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20)
        else:
            var = beta
        return mean + math.sqrt(var) * random_noise(model_output, generator)


class DDIMScheduler(Scheduler):
    """DDIM (Song et al. 2021, eq. 12): deterministic for ``eta=0``, DDPM-like for ``eta=1``.

    x_{t'} = sqrt(ᾱ_{t'}) x̂₀ + sqrt(1 - ᾱ_{t'} - σ²) ε̂ + σ z,
    σ = eta · sqrt((1-ᾱ_{t'})/(1-ᾱ_t)) · sqrt(1 - ᾱ_t/ᾱ_{t'}), with t' = t - T // n.

    Args:
        schedule: the training ``NoiseSchedule``.
        eta: stochasticity (0 = DDIM, 1 = DDPM posterior variance).
        set_alpha_to_one: ᾱ after the last step is 1 (True) or ᾱ_0 (False, as in SD).
        clip_sample / clip_sample_range: clamp x̂₀ (off by default, as for SD latents).
        timestep_spacing, steps_offset: default "leading" with offset 1 (SD's config);
            "trailing" starts at t = T-1.

    Example:
        >>> sched = DDIMScheduler(NoiseSchedule(), eta=0.0)
        >>> sched.set_timesteps(10)
        >>> x = torch.randn(1, 4, 8, 8)
        >>> for t in sched.timesteps:
        ...     x = sched.step(torch.zeros_like(x), t, x)
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        eta: float = 0.0,
        set_alpha_to_one: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
    ) -> None:
        super().__init__(schedule, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"eta={eta} must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM)")
        self.eta = float(eta)
        self.final_alpha_bar = 1.0 if set_alpha_to_one else self._alpha_bar(0)
        self.clip_sample, self.clip_sample_range = bool(clip_sample), float(clip_sample_range)

    def step(
        self,
        model_output: torch.Tensor,
        t: Timesteps,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM step from ``sample`` (B, C, ...) at timestep ``t``."""
        self._require_timesteps()
        tt = int(_scalar(t))
        # diffusers' rule (also for "trailing"): the previous timestep is t - T // n
        prev = tt - self.num_train_timesteps // self.num_inference_steps
        ab_t = self._alpha_bar(tt)
        ab_prev = self._alpha_bar(prev) if prev >= 0 else self.final_alpha_bar
        x0 = self.schedule.predict_x0(model_output, sample, tt)
        eps = self.schedule.predict_eps(model_output, sample, tt)
        x0 = _clip(x0, self.clip_sample, self.clip_sample_range)
        var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
        std = self.eta * math.sqrt(var)
        prev_sample = math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev - std**2) * eps
        if self.eta > 0:
            prev_sample = prev_sample + std * random_noise(model_output, generator)
        return prev_sample
