"""Noise schedules of the discrete-time diffusion process and the conversions between
the quantities a model can predict (ε, v, x₀).

The forward process of DDPM (Ho et al. 2020) noises clean data x₀ in one jump,

    x_t = sqrt(ᾱ_t) x₀ + sqrt(1 - ᾱ_t) ε,    ᾱ_t = ∏_{s<=t} (1 - β_s),  ε ~ N(0, I),

so a schedule is its β table. Three tables are available, spelled as in diffusers except
the cosine one:

* ``"linear"``: β linear in t (DDPM; β from 1e-4 to 0.02 in the paper).
* ``"scaled_linear"``: sqrt(β) linear in t (latent diffusion / Stable Diffusion, 0.00085 to
  0.012).
* ``"cosine"``: ᾱ(t) = cos²(((t/T) + s) / (1 + s) · π/2), s = 0.008, β capped at 0.999
  (Nichol & Dhariwal 2021; diffusers calls it ``"squaredcos_cap_v2"``).

All tables are computed in float64 and only cast to the data's dtype when applied, so a
1000-step cumulative product does not lose the digits that float32 would.

The velocity target of v-prediction (Salimans & Ho 2022) is
v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x₀.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from unetkit import config as cfg
from unetkit.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers' scheduler_config.json spelling -> ours (only the cosine table differs)
_DIFFUSERS_BETA_NAMES = {"squaredcos_cap_v2": "cosine"}
_COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal: keeps β_0 from being vanishingly small
_COSINE_MAX_BETA = 0.999  # their cap, avoids a singular last step at t = T

Timesteps = int | float | torch.Tensor


def _cosine_betas(num_steps: int) -> torch.Tensor:
    def alpha_bar(u: float) -> float:
        return math.cos((u + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), _COSINE_MAX_BETA)
        for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The β / ᾱ tables of a diffusion process and what the model predicts.

    Args:
        num_train_timesteps: T, the number of discrete training timesteps (t = 0 … T-1).
        beta_schedule: "linear", "scaled_linear" or "cosine" (see the module docstring).
        beta_start, beta_end: first and last β of the (scaled) linear tables; unused by
            "cosine".
        prediction_type: what the network outputs: "epsilon" (the noise ε), "v_prediction"
            (v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x₀, Salimans & Ho 2022) or "sample" (x₀ itself).

    The defaults are Stable Diffusion 1.x's. ``betas`` and ``alphas_cumprod`` are float64
    (T,) CPU tensors; treat them as read-only.

    Example:
        >>> s = NoiseSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        >>> x0, eps = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
        >>> xt = s.add_noise(x0, eps, torch.tensor([0, 999]))
        >>> torch.allclose(s.predict_eps(eps, xt, torch.tensor([0, 999])), eps)
        True
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        n = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"num_train_timesteps={n!r} must be an integer >= 2 (e.g. 1000)")
        cfg.check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        cfg.check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.beta_schedule != "cosine" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                f"beta_start={self.beta_start}, beta_end={self.beta_end}: need "
                f"0 < beta_start <= beta_end < 1 (e.g. 0.00085 and 0.012 for scaled_linear)"
            )
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        elif self.beta_schedule == "scaled_linear":
            lo, hi = math.sqrt(self.beta_start), math.sqrt(self.beta_end)
            betas = torch.linspace(lo, hi, n, dtype=torch.float64) ** 2
        else:
            betas = _cosine_betas(n)
        # derived tables are not fields: equality, hashing and to_dict see only the config
        object.__setattr__(self, "_betas", betas)
        object.__setattr__(self, "_alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))
        object.__setattr__(self, "_cast_cache", {})

    # ---- tables -------------------------------------------------------------------------
    @property
    def betas(self) -> torch.Tensor:
        """(T,) float64 β_t."""
        return self._betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64 ᾱ_t = ∏_{s<=t} (1 - β_s)."""
        return self._alphas_cumprod

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # cast on the CPU first: some devices (MPS) have no float64
        key = (str(device), dtype)
        if key not in self._cast_cache:
            self._cast_cache[key] = self._alphas_cumprod.to(dtype).to(device)
        return self._cast_cache[key]

    def alpha_bar(
        self, t: Timesteps, like: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """ᾱ_t for integer timesteps ``t`` (int, 0-d or (B,) tensor).

        With ``like`` (B, ...) the result is shaped (B, 1, …, 1) (or 0-d for a scalar t) in
        ``like``'s dtype and device, ready to broadcast; otherwise it has ``t``'s shape in
        ``dtype`` (default float64).
        """
        if like is not None:
            device, dtype = like.device, like.dtype
        else:
            device = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
            dtype = dtype or torch.float64
        tt = torch.as_tensor(t, device=device)
        if tt.is_floating_point():
            if not torch.equal(tt, tt.round()):
                raise ConfigError(f"timesteps must be integers, got {tt.tolist()}")
            tt = tt.long()
        if tt.numel() and (int(tt.min()) < 0 or int(tt.max()) >= self.num_train_timesteps):
            raise ConfigError(
                f"timesteps {tt.tolist() if tt.numel() < 9 else '…'} are outside "
                f"[0, {self.num_train_timesteps - 1}] (num_train_timesteps="
                f"{self.num_train_timesteps})"
            )
        ab = self._table(device, dtype)[tt]
        if like is not None and ab.ndim == 1:
            if ab.shape[0] != like.shape[0]:
                raise ConfigError(
                    f"timesteps have {ab.shape[0]} entries but the batch has {like.shape[0]}"
                )
            ab = ab.reshape(-1, *([1] * (like.ndim - 1)))
        return ab

    def snr(self, t: Timesteps, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at timesteps ``t`` (shape of ``t``)."""
        ab = self.alpha_bar(t, dtype=dtype)
        return ab / (1.0 - ab)

    # ---- forward process and conversions -------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x₀ + sqrt(1 - ᾱ_t) ε.

        Args:
            x0: (B, C, ...) clean samples.
            noise: ε, same shape.
            t: int, 0-d or (B,) integer timesteps.
        """
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x₀ (Salimans & Ho 2022); shapes as ``add_noise``."""
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * noise - (1.0 - ab).sqrt() * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """What the model should output for ``x_t = add_noise(x0, noise, t)``: ε, v or x₀
        according to ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def predict_x0(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: Timesteps
    ) -> torch.Tensor:
        """x₀ implied by ``model_output`` (B, C, ...) at ``x_t`` and timesteps ``t``."""
        ab = self.alpha_bar(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - (1.0 - ab).sqrt() * model_output) / ab.sqrt()
        if self.prediction_type == "v_prediction":
            return ab.sqrt() * x_t - (1.0 - ab).sqrt() * model_output
        return model_output

    def predict_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: Timesteps
    ) -> torch.Tensor:
        """ε implied by ``model_output`` (B, C, ...) at ``x_t`` and timesteps ``t``."""
        ab = self.alpha_bar(t, x_t)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return ab.sqrt() * model_output + (1.0 - ab).sqrt() * x_t
        return (x_t - ab.sqrt() * model_output) / (1.0 - ab).sqrt()

    # ---- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as JSON scalars (goes into checkpoint metadata)."""
        return cfg.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "schedule") -> NoiseSchedule:
        """Inverse of ``to_dict``; unknown keys raise ConfigError with a did-you-mean."""
        return cfg.from_dict(cls, data, source=source)

    @classmethod
    def from_diffusers_config(
        cls, config: dict[str, Any], *, source: str = "scheduler_config.json"
    ) -> NoiseSchedule:
        """Read the schedule out of a diffusers ``scheduler_config.json`` dict.

        Sampler-specific keys (``steps_offset``, ``clip_sample``, ``set_alpha_to_one``,
        ``timestep_spacing`` …) are ignored here: they are options of the scheduler, see
        ``build_scheduler``. Missing keys take diffusers' defaults (linear 1e-4 … 0.02).

        Example:
            >>> NoiseSchedule.from_diffusers_config({"beta_schedule": "squaredcos_cap_v2"})
            ... # doctest: +ELLIPSIS
            NoiseSchedule(num_train_timesteps=1000, beta_schedule='cosine', ...)
        """
        if config.get("trained_betas") is not None:
            raise ConfigError(f"{source}: explicit 'trained_betas' are not supported")
        if config.get("rescale_betas_zero_snr"):
            raise ConfigError(f"{source}: 'rescale_betas_zero_snr' is not supported")
        name = config.get("beta_schedule", "linear")
        try:
            return cls(
                num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                beta_schedule=_DIFFUSERS_BETA_NAMES.get(name, name),
                beta_start=float(config.get("beta_start", 0.0001)),
                beta_end=float(config.get("beta_end", 0.02)),
                prediction_type=config.get("prediction_type", "epsilon"),
            )
        except (ValueError, TypeError) as e:  # ConfigError too; "many" steps, a null beta
            raise ConfigError(f"{source}: {e}") from None

    def to_diffusers_config(self) -> dict[str, Any]:
        """The schedule's keys in diffusers' ``scheduler_config.json`` spelling."""
        back = {v: k for k, v in _DIFFUSERS_BETA_NAMES.items()}
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": back.get(self.beta_schedule, self.beta_schedule),
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
        }
