"""unetkit: the U-Net family end to end — classic, variants, diffusion, LoRA.

Public API (everything the CLI does is one of these calls).
"""

from unetkit._version import __version__
from unetkit.formats.checkpoint import load, read_metadata, save
from unetkit.registry import create_model, list_models, model_info

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "load",
    "model_info",
    "read_metadata",
    "save",
]
