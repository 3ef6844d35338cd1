"""Samplers by name: the one list of sampler names (``SCHEDULER_NAMES``) and ``build_scheduler``.

Apart from ``schedulers.py`` because the σ-space samplers (``dpm_solver.py``, ``euler.py``)
build on its base class: the factory that names them all sits above the three.

Example:
    >>> from unetkit.diffusion import NoiseSchedule
    >>> sched = build_scheduler("ddim", NoiseSchedule())
    >>> sched.set_timesteps(4)
    >>> sched.timesteps.tolist()
    [751, 501, 251, 1]
"""

from __future__ import annotations

import inspect
from typing import Any

from unetkit.diffusion.dpm_solver import DPMSolverMultistepScheduler
from unetkit.diffusion.euler import EulerDiscreteScheduler
from unetkit.diffusion.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.errors import ConfigError, did_you_mean

_CLASSES: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
SCHEDULER_NAMES = tuple(_CLASSES)  # every sampler name: library and CLI choices
DEFAULT_SAMPLER = "ddim"


def build_scheduler(name: str, schedule: NoiseSchedule, **options: Any) -> Scheduler:
    """Build a sampler by name: "ddpm", "ddim", "dpmpp-2m" (DPM-Solver++ 2M) or "euler".

    Args:
        name: the sampler's short name, one of ``SCHEDULER_NAMES``.
        schedule: the training ``NoiseSchedule``.
        **options: keyword options of that class (e.g. ``eta=0.5`` for "ddim",
            ``timestep_spacing="trailing"``).

    Example:
        >>> build_scheduler("dpmpp-2m", NoiseSchedule())  # doctest: +ELLIPSIS
        DPMSolverMultistepScheduler(...)
    """
    if name not in _CLASSES:
        raise ConfigError(
            f"sampler {name!r} is not known{did_you_mean(str(name), _CLASSES)}; "
            f"choose one of: {', '.join(_CLASSES)}"
        )
    cls = _CLASSES[name]
    valid = [p for p in inspect.signature(cls).parameters if p != "schedule"]
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"sampler {name!r} has no option {key!r}{did_you_mean(key, valid)}; "
                f"its options: {', '.join(valid)}"
            )
    return cls(schedule, **options)
