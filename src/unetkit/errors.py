"""Error types. Every message names the argument or file, what was received, and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UnetkitError(Exception):
    """Base class of all unetkit errors."""


class ConfigError(UnetkitError, ValueError):
    """A model or run configuration is invalid (unknown key, bad value)."""


class InputSizeError(UnetkitError, ValueError):
    """An input's spatial size does not fit the model; the message names valid sizes."""


class CheckpointError(UnetkitError, ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


class DataError(UnetkitError, ValueError):
    """An input file or data set is missing, unreadable or has invalid content."""


class OutputError(UnetkitError, ValueError):
    """An output path is refused: wrong kind (file vs folder), unwritable, or an input."""


class RunLockedError(UnetkitError, RuntimeError):
    """A run folder is in use by another live process (the message names its pid)."""


class NonFiniteError(UnetkitError, ValueError):
    """Weights, pixels or a numeric option hold NaN or infinity."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
