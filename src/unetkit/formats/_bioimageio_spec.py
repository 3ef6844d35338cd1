"""Loading ``bioimageio.spec`` (extra ``bio``) and making it work with the pinned pydantic.

bioimageio.spec 0.5.12's wrap serializers call pydantic's handler as ``handler(value,
info)``; the pydantic-core that pydantic 2.14 ships reads the second argument as an index
key and raises TypeError on every dump (packaging, test runs). ``require_spec`` patches
the two serializers once (see ``_tolerate_handler_call``).
"""

from __future__ import annotations

from typing import Any

from unetkit.errors import ConfigError


def require_spec() -> Any:
    try:
        import bioimageio.spec as spec
        from bioimageio.spec._internal import io_packaging
    except ImportError:
        raise ConfigError(
            "bioimage.io packages need bioimageio.spec: pip install 'unetkit[bio]'"
        ) from None
    from bioimageio.spec.model import v0_4

    for serializer in (io_packaging.package_file_descr_serializer, v0_4.package_weights):
        _tolerate_handler_call(serializer)
    return spec


class _TolerantHandler:
    """A pydantic serializer handler that ignores extra positional arguments."""

    def __init__(self, handler: Any) -> None:
        self._handler = handler

    def __call__(self, value: Any, *_ignored: Any) -> Any:
        return self._handler(value)


def _trampoline(value: Any, handler: Any, info: Any) -> Any:
    return _unetkit_original(value, _UnetkitTolerantHandler(handler), info)  # noqa: F821


def _tolerate_handler_call(serializer: Any) -> None:
    """The serializers are bound into the spec's schemas, so their code is swapped for a
    trampoline (one per module, in the module's own globals) that hands the original a
    handler taking ``handler(value)``, the documented call in every pydantic 2 release."""
    if serializer.__code__ is _trampoline.__code__:
        return
    module = serializer.__globals__
    module["_unetkit_original"] = type(serializer)(
        serializer.__code__, module, serializer.__name__, serializer.__defaults__
    )
    module["_UnetkitTolerantHandler"] = _TolerantHandler
    serializer.__code__ = _trampoline.__code__
