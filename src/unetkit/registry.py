"""The model registry: ``@register_model``, ``create_model``, ``list_models``, ``model_info``.

The registry drives tests (one contract test over every entry), the CLI and the docs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from unetkit import config as cfg
from unetkit.errors import ConfigError, did_you_mean


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    model_cls: type[nn.Module]
    config_cls: type
    description: str
    presets: dict[str, dict[str, Any]]
    dims: tuple[int, ...]
    task: str
    test_overrides: dict[str, Any]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    config: type,
    description: str,
    presets: dict[str, dict[str, Any]] | None = None,
    dims: tuple[int, ...] = (1, 2, 3),
    task: str = "segmentation",
    test_overrides: dict[str, Any] | None = None,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a model built as ``model_cls(config)``.

    ``test_overrides`` make a tiny instance for the contract test (narrow channels).
    """

    def decorator(model_cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ConfigError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(
            name,
            model_cls,
            config,
            description,
            dict(presets or {}),
            tuple(dims),
            task,
            dict(test_overrides or {}),
        )
        model_cls.registry_name = name
        return model_cls

    return decorator


def _ensure_loaded() -> None:
    # why: the built-in families register on first use; they import this module's decorator
    import unetkit.models  # noqa: F401


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r}{did_you_mean(name, _REGISTRY)}; "
            f"available: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def list_models(task: str | None = None) -> list[str]:
    """Names of all registered models (optionally only those of one ``task``)."""
    _ensure_loaded()
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def build_config(name: str, *, preset: str | None = None, **overrides: Any) -> Any:
    """The frozen config for ``name``: defaults, then ``preset``, then ``overrides``."""
    entry = get_entry(name)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in entry.presets:
            raise ConfigError(
                f"unknown preset {preset!r} for model {name!r}"
                f"{did_you_mean(preset, entry.presets)}; "
                f"available: {', '.join(sorted(entry.presets)) or 'none'}"
            )
        values.update(entry.presets[preset])
    values.update(overrides)
    return cfg.from_dict(entry.config_cls, values, source=f"model {name!r}")


def create_model(name: str, *, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Example:
        >>> import unetkit
        >>> net = unetkit.create_model("unet", preset="paper")
        >>> net.output_size_for((572, 572))
        (388, 388)
    """
    entry = get_entry(name)
    return entry.model_cls(build_config(name, preset=preset, **overrides))


def model_from_config(
    name: str, config_dict: dict[str, Any], *, source: str = "config"
) -> nn.Module:
    entry = get_entry(name)
    return entry.model_cls(cfg.from_dict(entry.config_cls, config_dict, source=source))


def name_of(model: nn.Module) -> str:
    name = getattr(type(model), "registry_name", None)
    if name is None:
        raise ConfigError(f"{type(model).__name__} is not a registered unetkit model")
    return name


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_info(name: str, *, preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Name, description, parameter count and sizes of a model, built on the meta device."""
    entry = get_entry(name)
    with torch.device("meta"):
        model = create_model(name, preset=preset, **overrides)
    return {
        "name": name,
        "task": entry.task,
        "description": entry.description,
        "dims": entry.dims,
        "presets": sorted(entry.presets),
        "parameters": count_parameters(model),
        "config": cfg.to_dict(model.config),
        "model": model,
    }
