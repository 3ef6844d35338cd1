"""Task-agnostic training: fit(), tasks, optimisers, run directories, torch.distributed."""

from unetkit.training.fit_config import FitConfig, FitResult
from unetkit.training.logging import RunDirectory
from unetkit.training.optim import build_optimizer, build_scheduler
from unetkit.training.tasks import SupervisedTask, Task
from unetkit.training.trainer import fit

__all__ = [
    "FitConfig",
    "FitResult",
    "RunDirectory",
    "SupervisedTask",
    "Task",
    "build_optimizer",
    "build_scheduler",
    "fit",
]
