"""Checkpoints: one ``.safetensors`` file, the model config and version in its metadata.

Nothing is ever unpickled. Writes are atomic (temp file + fsync + rename), so a run killed
mid-write leaves the previous checkpoint intact.

Training state (optimizer, scheduler, RNG, counters) uses the same container: nested
dicts/lists are flattened, tensors stored by path, everything else kept as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from unetkit import config as cfg
from unetkit import registry
from unetkit._atomic import atomic_path
from unetkit._version import __version__
from unetkit.errors import CheckpointError, UnetkitError
from unetkit.finite import check_finite_tensors

FORMAT = "unetkit-checkpoint"
STATE_FORMAT = "unetkit-state"
# the metadata keys ``save`` writes itself (ONNX exports too): never user metadata
RESERVED_METADATA_KEYS = ("format", "model", "config", "unetkit_version")


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    path = Path(path)
    # clone: safetensors refuses tensors that share storage (tied or viewed weights)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    return path


# pickle containers: loading one can run arbitrary code, so they are refused by name
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def _readable(path: Path) -> None:
    if not path.is_file():
        what = "a folder, not a checkpoint file" if path.is_dir() else "no such checkpoint file"
        raise CheckpointError(f"{path}: {what}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: a pickled {path.suffix} file; unetkit never unpickles (loading a pickle "
            f"can run code): save the weights as .safetensors with a tool you trust"
        )


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable .safetensors file ({error}); it is empty, truncated or "
        f"another format (unetkit never unpickles files)"
    )


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file without reading its tensors.

    Raises:
        CheckpointError: one line naming the file when it is missing, pickled, empty,
            truncated or not safetensors at all.
    """
    path = Path(path)
    _readable(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    _readable(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    return tensors, meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata: model name, config dict, version, and any extras (JSON)."""
    _, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a unetkit model checkpoint (format={meta.get('format')!r})"
        )
    return {
        k: (v if k in ("format", "model", "unetkit_version") else _json(v, k, path))
        for k, v in meta.items()
    }


def _json(text: str, key: str, path: str | os.PathLike) -> Any:
    """A metadata value as JSON; CheckpointError naming the file and key if it is not."""
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, or a number too large to convert
        raise CheckpointError(
            f"{path}: metadata {key!r} is not valid JSON ({e}); the file was edited or damaged"
        ) from None


def save(model: nn.Module, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Save a registered model to one ``.safetensors`` file (atomic).

    Args:
        model: any model from ``unetkit.create_model`` (DDP/compiled wrappers are unwrapped).
        path: file to write; parent folders are created.
        extra: JSON-serialisable facts for later use (e.g. normalisation, class names).

    Example:
        >>> unetkit.save(net, "run/best.safetensors")   # doctest: +SKIP
    """
    model = unwrap(model)
    meta = {
        "format": FORMAT,
        "unetkit_version": __version__,
        "model": registry.name_of(model),
        "config": cfg.to_json(model.config),
    }
    for k, v in (extra or {}).items():
        if k in RESERVED_METADATA_KEYS:
            raise CheckpointError(f"extra key {k!r} is reserved")
        meta[k] = json.dumps(v)
    return _write(path, model.state_dict(), meta)


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a checkpoint written by ``save``; returned in eval mode."""
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(
            f"{path}: safetensors file has no unetkit metadata (a bare state dict?); "
            f"for diffusers/LDM weights use `unetkit convert`"
        )
    try:
        config = _json(meta["config"], "config", path) if "config" in meta else None
        if not isinstance(config, dict):
            raise CheckpointError(f"metadata 'config' is {type(config).__name__}, not an object")
        model = registry.model_from_config(meta["model"], config, source=str(path))
    except UnetkitError as e:
        raise CheckpointError(f"{path}: cannot rebuild the model: {e}") from None
    load_state_dict_strict(model, tensors, source=str(path))
    check_finite_tensors(tensors, source=str(path))  # NaN weights predict silently wrong
    return model.to(map_location).eval()


def check_state_dict(
    own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], *, source: str
) -> None:
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches of
    ``tensors`` (meta tensors will do) against a model's state dict ``own``."""
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{title} keys: {', '.join(items[:10])}{more}")
        raise CheckpointError(f"{source}: weights do not match the model; " + "; ".join(parts))


def load_state_dict_strict(
    model: nn.Module, tensors: dict[str, torch.Tensor], *, source: str
) -> None:
    """Load ``tensors`` into ``model``; a key or shape mismatch raises CheckpointError."""
    check_state_dict(model.state_dict(), tensors, source=source)
    model.load_state_dict(tensors, strict=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# --- training state: nested containers of tensors and JSON values ----------------------
def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        items = [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: v for k, v in items}}
        return {"__items__": items}  # e.g. optimizer state keyed by int
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store {type(obj).__name__} at {prefix!r} in a state file")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return [_unflatten(v, tensors) for v in obj["__list__"]]


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically save a nested training state (tensors + JSON scalars) as safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors)
    return _write(
        path,
        tensors,
        {"format": STATE_FORMAT, "unetkit_version": __version__, "tree": json.dumps(tree)},
    )


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Inverse of ``save_state``."""
    tensors, meta = _read(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a unetkit training-state file")
    return _unflatten(json.loads(meta["tree"]), tensors)
