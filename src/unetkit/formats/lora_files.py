"""LoRA adapter files: read, write, convert, load into a model, verify.

Every supported layout (``"unetkit"``, ``"diffusers"``, ``"kohya"``; see
``unetkit.formats.lora_layouts``) is read into one ``Adapter`` and loaded by module name, so
a file made by diffusers/PEFT or Kohya's scripts loads into any model with the same layer
names, and ``convert_adapter`` rewrites a file in another layout with bit-equal tensors.
A path may be a file, a diffusers LoRA folder (``pytorch_lora_weights.safetensors``) or a
PEFT ``save_pretrained`` folder (``adapter_model.safetensors`` + ``adapter_config.json``,
also one level down, where PEFT puts adapters not named "default").
Files are ``.safetensors`` only (never unpickled) and written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from unetkit._atomic import atomic_path
from unetkit.errors import CheckpointError, ConfigError
from unetkit.finite import check_finite_tensors
from unetkit.formats.lora_adapter import Adapter
from unetkit.formats.lora_kohya import flatten_name
from unetkit.formats.lora_layouts import (
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_WEIGHT_NAME,
    FORMATS,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHT_NAME,
    convert,
    detect_format,
    parse_adapter,
)
from unetkit.nn.lora import LoRALayer
from unetkit.nn.lora_inject import (
    _set_submodule,
    load_lora_state_dict,
    lora_metadata,
    lora_state_dict,
)
from unetkit.nn.lora_targets import wrappable_layers

log = logging.getLogger(__name__)


def adapter_file(path: str | os.PathLike) -> Path:
    """The weights file a LoRA path means: itself, or the file inside a diffusers/PEFT
    folder (what output checks compare against: writing it would destroy the adapter)."""
    return _file(path)


def _file(path: str | os.PathLike) -> Path:
    """The weights file of ``path``: itself, or the LoRA file inside a diffusers/PEFT folder."""
    path = Path(path)
    if path.is_dir():
        names = (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME)
        found = [path / n for n in names if (path / n).is_file()]
        if not found:  # PEFT saves adapter "x" (not "default") in the subfolder x/
            found = sorted(path.glob(f"*/{PEFT_WEIGHT_NAME}"))
        if len(found) > 1:
            raise CheckpointError(
                f"{path}: holds several LoRA files {[str(f.relative_to(path)) for f in found]}; "
                f"name one of them"
            )
        if not found:
            bins = sorted(p.name for p in path.glob("**/*.bin"))
            hint = f" (pickled {bins[0]} is never read; save with safetensors)" if bins else ""
            raise CheckpointError(
                f"{path}: a folder without {DIFFUSERS_WEIGHT_NAME} or {PEFT_WEIGHT_NAME}{hint}"
            )
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    return path


def _peft_config(path: Path) -> str | None:
    """The ``adapter_config.json`` text beside a PEFT ``adapter_model.safetensors``."""
    config = path.with_name(PEFT_CONFIG_NAME)
    return config.read_text() if config.is_file() else None


def _check_peft_config(path: Path, text: str) -> None:
    """CheckpointError naming ``adapter_config.json`` when it is not a LoraConfig object
    whose ``r``/``lora_alpha`` are numbers (an edited or damaged file)."""
    try:
        config = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object (PEFT's LoraConfig)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise CheckpointError(f"{path}: {key}={value!r} is not a number")


def read_adapter(
    path: str | os.PathLike, *, module_names: Sequence[str] | None = None, strict: bool = True
) -> Adapter:
    """Read a LoRA ``.safetensors`` file or a diffusers/PEFT LoRA folder of any layout."""
    path = _file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({e}); unetkit never unpickles files"
        ) from None
    check_finite_tensors(tensors, source=str(path), what="adapter weights")
    config = _peft_config(path)
    if config is not None and DIFFUSERS_METADATA_KEY not in metadata:
        _check_peft_config(path.with_name(PEFT_CONFIG_NAME), config)
        metadata[DIFFUSERS_METADATA_KEY] = config  # PEFT keeps the LoraConfig beside the file
    try:
        return parse_adapter(
            tensors, metadata, module_names=module_names, strict=strict, source=str(path)
        )
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as e:
        # tensors of impossible shapes (0-d, rank 0, A/B that do not multiply): found by
        # fuzzing; a damaged or hand-made file, never one a LoRA trainer writes
        raise CheckpointError(
            f"{path}: malformed LoRA tensors ({type(e).__name__}: {e}); the file is damaged "
            f"or not a LoRA adapter"
        ) from None


def write_adapter(adapter: Adapter, path: str | os.PathLike, *, format: str = "unetkit") -> Path:
    """Write ``adapter`` in layout ``format`` (atomic). A folder gets diffusers' file name."""
    tensors, meta = convert(adapter, format)
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        path = path / DIFFUSERS_WEIGHT_NAME
    # clone: safetensors refuses views and shared storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    log.info("wrote %s LoRA (%d layers) to %s", format, len(adapter.modules), path)
    return path


def convert_adapter(
    src: str | os.PathLike, dst: str | os.PathLike, *, format: str, strict: bool = True
) -> Path:
    """Convert a LoRA file to layout ``format`` (tensors bit-equal, alphas kept)."""
    return write_adapter(read_adapter(src, strict=strict), dst, format=format)


def adapter_from_model(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    targets: Sequence[str] | None = None,
    base_model: str | None = None,
) -> Adapter:
    """The ``Adapter`` held by ``model`` under ``adapter_name``."""
    meta = lora_metadata(model, adapter_name)
    info = {
        "targets": list(targets) if targets else None,
        "base_model": base_model,
        "adapter_name": adapter_name,
    }
    return Adapter(
        lora_state_dict(model, adapter_name), {m: float(v["alpha"]) for m, v in meta.items()}, info
    )


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    format: str = "unetkit",
    targets: Sequence[str] | None = None,
    base_model: str | None = None,
) -> Path:
    """Save one adapter of ``model`` as a small ``.safetensors`` file (atomic).

    Example:
        >>> inject_lora(net, "attn", r=8)                                  # doctest: +SKIP
        >>> save_adapter(net, "style.safetensors", targets=["attn"])       # doctest: +SKIP
    """
    adapter = adapter_from_model(model, adapter_name, targets=targets, base_model=base_model)
    return write_adapter(adapter, path, format=format)


def load_adapter(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, torch.Tensor] | Adapter,
    *,
    adapter_name: str = "default",
    strict: bool = True,
    scale: float = 1.0,
    text_encoders: Mapping[str, nn.Module] | None = None,
) -> list[str]:
    """Load a LoRA file (any layout) or state dict into ``model`` as ``adapter_name``.

    Args:
        model: the model to adapt (in place); its layer names resolve Kohya names.
        path_or_state: a file, a diffusers/PEFT LoRA folder, a state dict (layout
            detected), or an ``Adapter``.
        adapter_name: name of the new adapter (must not exist yet).
        strict: keys naming no layer raise ``CheckpointError`` listing them; with False they
            are logged and skipped. A file matching no layer at all always raises.
        scale: runtime multiplier of the adapter (``--lora file:0.8``).
        text_encoders: ``{"text_encoder": module, ...}`` to receive the file's text-encoder
            parts; parts without a module are listed in one warning and not applied.

    Returns:
        The module names of ``model`` that received the adapter.

    Example:
        >>> load_adapter(unet, "lora.safetensors", adapter_name="style")  # doctest: +SKIP
    """
    names = list(wrappable_layers(model))
    if isinstance(path_or_state, Adapter):
        adapter, source = path_or_state, "adapter"
    elif isinstance(path_or_state, Mapping):
        adapter, source = (
            parse_adapter(path_or_state, module_names=names, strict=strict),
            "state_dict",
        )
    else:
        adapter = read_adapter(path_or_state, module_names=names, strict=strict)
        source = str(_file(path_or_state))
    targets = {"unet": (model, adapter)}
    skipped = []
    for component, part in adapter.others.items():
        if text_encoders and text_encoders.get(component) is not None:
            targets[component] = (text_encoders[component], part)
        else:
            skipped.append(f"{component} ({len(part.modules)} layers, e.g. {part.modules[0]})")
    if skipped:
        log.warning(
            "%s: text-encoder LoRA parts not applied (no text encoder loaded): %s",
            source,
            "; ".join(skipped),
        )
    loaded: list[str] = []
    for component, (module, part) in targets.items():
        if component == "unet" and not part.tensors and adapter.others:
            continue  # a text-encoder-only file
        try:
            done = load_lora_state_dict(
                module,
                part.tensors,
                alphas=part.alphas,
                adapter_name=adapter_name,
                strict=strict,
                source=source if component == "unet" else f"{source} [{component}]",
            )
        except CheckpointError as e:
            base = adapter.info.get("base_model")  # e.g. Kohya's ss_base_model_version
            raise CheckpointError(
                f"{e} (the file names its base: {base})" if base else str(e)
            ) from None
        for name in done:
            module.get_submodule(name).set_scale(scale, adapter_name)
        if component == "unet":
            loaded = done
    return loaded


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):  # diffusers' output dataclasses
        return out.sample
    if isinstance(out, Mapping):
        return _first_tensor(next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    raise ConfigError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def verify_adapter(
    model: nn.Module,
    path: str | os.PathLike | Mapping[str, torch.Tensor],
    sample_inputs: torch.Tensor | Sequence[Any] | Mapping[str, Any],
) -> dict[str, Any]:
    """Load an adapter temporarily, run ``sample_inputs`` with and without it, report.

    The model is left as it was (the temporary adapter is removed, wrappers it added are
    unwrapped). Keys naming no layer are reported, not raised, unless none match.

    Returns:
        ``{"modules_touched": n, "modules": [...], "unmatched_modules": [...],
        "ranks": sorted ranks, "relative_change": ||y_lora − y|| / ||y||,
        "max_abs_change": float}``.
    """
    names = list(wrappable_layers(model))
    adapter = (
        read_adapter(path, module_names=names, strict=False)
        if not isinstance(path, Mapping)
        else parse_adapter(path, module_names=names, strict=False)
    )
    args, kwargs = (
        ((), dict(sample_inputs))
        if isinstance(sample_inputs, Mapping)
        else (
            ((sample_inputs,) if isinstance(sample_inputs, torch.Tensor) else tuple(sample_inputs)),
            {},
        )
    )
    was_training = model.training
    model.eval()
    tmp = "_unetkit_verify"
    try:
        with torch.no_grad():
            before = _first_tensor(model(*args, **kwargs)).float()
            touched = load_lora_state_dict(
                model,
                adapter.tensors,
                alphas=adapter.alphas,
                adapter_name=tmp,
                strict=False,
                source=str(path),
            )
            try:
                after = _first_tensor(model(*args, **kwargs)).float()
            finally:
                _remove_adapter(model, touched, tmp)
    finally:
        model.train(was_training)
    diff = after - before
    return {
        "modules_touched": len(touched),
        "modules": touched,
        "unmatched_modules": [m for m in adapter.modules if m not in touched],
        "ranks": sorted(set(adapter.ranks.values())),
        "relative_change": float(diff.norm() / before.norm().clamp_min(1e-30)),
        "max_abs_change": float(diff.abs().max()),
    }


def _remove_adapter(model: nn.Module, names: Sequence[str], adapter_name: str) -> None:
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, LoRALayer):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:  # the wrapper was added just for this adapter
                _set_submodule(model, name, layer.base_layer)


__all__ = [
    "Adapter",
    "FORMATS",
    "adapter_from_model",
    "convert",
    "convert_adapter",
    "detect_format",
    "flatten_name",
    "load_adapter",
    "parse_adapter",
    "read_adapter",
    "save_adapter",
    "verify_adapter",
    "write_adapter",
]
