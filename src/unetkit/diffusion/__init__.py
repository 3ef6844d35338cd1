"""The diffusion process: noise schedules, samplers and the training objective.

The network lives in ``unetkit.models.diffusion_unet``; everything here is independent of
it (STYLE.md, "the network is apart from the process").

Example:
    >>> from unetkit.diffusion import NoiseSchedule, build_scheduler
    >>> sched = build_scheduler("dpmpp-2m", NoiseSchedule(prediction_type="v_prediction"))
    >>> sched.set_timesteps(20)
"""

from unetkit.diffusion.dpm_solver import DPMSolverMultistepScheduler
from unetkit.diffusion.euler import EulerDiscreteScheduler
from unetkit.diffusion.objectives import diffusion_loss, min_snr_weights
from unetkit.diffusion.samplers import DEFAULT_SAMPLER, SCHEDULER_NAMES, build_scheduler
from unetkit.diffusion.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from unetkit.diffusion.schedules import BETA_SCHEDULES, PREDICTION_TYPES, NoiseSchedule

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "DEFAULT_SAMPLER",
    "SCHEDULER_NAMES",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "NoiseSchedule",
    "Scheduler",
    "build_scheduler",
    "diffusion_loss",
    "min_snr_weights",
]
