"""Atomic file writes: a temp file in the target's folder, fsync, then rename.

A reader (or a run killed with SIGKILL) sees either the old file or the complete new one,
never a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from unetkit.errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    Example:
        >>> with atomic_path("out.png") as tmp:   # doctest: +SKIP
        ...     image.save(tmp, format="PNG")
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail after the work, naming the temp file
        raise OutputError(f"{path}: is a folder; cannot write a file there")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp (or a writer replacing the temp file) leaves 0600: give the usual mode
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    A file name that is not valid UTF-8 (POSIX names are bytes; Python reads the odd bytes
    as surrogates) is written as its own bytes, so a table that lists it names the file.
    """
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))
