"""unetkit: the U-Net family end to end — classic, variants, diffusion, LoRA.

Public API (everything the CLI does is one of these calls).
"""

from unetkit._version import __version__
from unetkit.formats.checkpoint import load, read_metadata, save
from unetkit.registry import create_model, list_models, model_info
from unetkit.workflows.segment import predict
from unetkit.workflows.segment_train import make_recipe, train

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "load",
    "make_recipe",
    "model_info",
    "predict",
    "read_metadata",
    "save",
    "train",
]
