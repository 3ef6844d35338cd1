"""unetkit: the U-Net family end to end — classic, variants, diffusion, LoRA.

Public API (everything the CLI does is one of these calls). The names load on first use,
so that ``import unetkit`` (and ``unetkit --help``) does not import torch.
"""

import importlib
from typing import Any

from unetkit._version import __version__

# public name -> the module that defines it
_API = {
    "create_model": "unetkit.registry",
    "list_models": "unetkit.registry",
    "model_info": "unetkit.registry",
    "load": "unetkit.formats.checkpoint",
    "read_metadata": "unetkit.formats.checkpoint",
    "save": "unetkit.formats.checkpoint",
    "predict": "unetkit.workflows.segment",
    "make_recipe": "unetkit.workflows.segment_recipe",
    "train": "unetkit.workflows.segment_train",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    # why: start-up time (PEP 562): the API's modules import torch and the workflows
    if name not in _API:
        raise AttributeError(f"module 'unetkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
