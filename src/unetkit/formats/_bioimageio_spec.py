"""Loading ``bioimageio.spec`` (extra ``bio``) and making it work with the pinned pydantic.

bioimageio.spec 0.5.12's wrap serializers call pydantic's handler as ``handler(value,
info)``; the pydantic-core that pydantic 2.14 ships reads the second argument as an index
key and raises TypeError on every dump (packaging, test runs). ``require_spec`` patches
the two serializers once (see ``_tolerate_handler_call``). ``check_package_fields`` checks
the fields a person types (licence, authors, DOIs) with the spec's own types.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def check_package_fields(
    license: str, authors: Sequence[str], cite: Sequence[tuple[str, str]]
) -> None:
    """ConfigError naming the flag of a field the bioimage.io spec refuses (an unknown
    licence, a DOI that is not one, an author name with a slash); the spec's own types
    decide, so unetkit and the model zoo agree."""
    from bioimageio.spec.model import v0_5 as v5
    from pydantic import ValidationError

    fields = [("--license", v5.LicenseId, license, "an SPDX id, e.g. MIT or CC-BY-4.0")]
    fields += [("--authors", lambda a: v5.Author(name=a), a.strip(), "a name") for a in authors]
    fields += [("--cite", v5.Doi, doi, "a DOI such as 10.1038/nmeth.4473") for _, doi in cite]
    for flag, build, value, expected in fields:
        try:
            build(value)
        except ValidationError:
            raise ConfigError(
                f"{flag} {value!r}: not valid in a bioimage.io package; expected {expected}"
            ) from None


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
