"""Frozen-dataclass config helpers: to/from dict and JSON, strict about unknown keys.

A model is its config (DESIGN.md): fields are JSON scalars or tuples of them, so a config
round-trips through a checkpoint's metadata exactly.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from unetkit.errors import ConfigError, did_you_mean

C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    """Return the config's fields as a plain dict (tuples become lists in JSON only)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), sort_keys=True)


def _is_tuple_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_type(a) for a in typing.get_args(tp))
    return False


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
    """Build ``cls`` from ``data``; unknown keys raise ConfigError with a did-you-mean hint.

    Lists are turned into tuples so that configs stay hashable and compare equal after a
    JSON round trip.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{source}: unknown option {k!r} for {cls.__name__}{did_you_mean(k, names)}; "
            f"valid options: {', '.join(names)}"
        )
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _freeze(v) if _is_tuple_type(hints.get(k)) or isinstance(v, list) else v
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{source}: {e}") from None


def from_json(cls: type[C], text: str, *, source: str = "config") -> C:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: config is not valid JSON ({e})") from None
    return from_dict(cls, data, source=source)


def replace(config: C, **overrides: Any) -> C:
    """Like dataclasses.replace, but with the strict unknown-key error of from_dict."""
    data = to_dict(config)
    names = list(data)
    for k in overrides:
        if k not in names:
            raise ConfigError(
                f"unknown option {k!r} for {type(config).__name__}{did_you_mean(k, names)}; "
                f"valid options: {', '.join(names)}"
            )
    data.update(overrides)
    return from_dict(type(config), data)


def check_choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    """Raise ConfigError if ``value`` is not one of ``choices`` (with did-you-mean)."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"{name}={value!r} is not supported{did_you_mean(str(value), choices)}; "
            f"choose one of: {', '.join(map(str, choices))}"
        )
