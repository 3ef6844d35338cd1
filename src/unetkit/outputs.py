"""One guard for every output path, checked before any work is done.

Every command that writes calls ``output_file`` or ``output_folder`` first. They refuse, with
one line naming the flag and the path:

* a file where a folder is needed and the reverse (also a file in the way of a parent folder);
* places that cannot be written (read-only file system, no permission);
* an output that is one of the inputs (``export ck.safetensors --onnx ck.safetensors`` would
  destroy the checkpoint), compared after resolving symlinks, and for existing files by
  inode too (hard links).

Nothing is created here: the writers create folders and write atomically (``unetkit._atomic``)
once the work is done, so a refused or crashed run leaves nothing behind.

Example:
    >>> output_file("m.onnx", flag="--onnx", inputs=["m.safetensors"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from unetkit.errors import DataError, OutputError

PathLike = str | os.PathLike


def output_file(path: PathLike, *, flag: str, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Check that ``path`` can be written as a file and is none of ``inputs``.

    Args:
        path: the output file.
        flag: the flag or argument that named it, for the message (e.g. ``--onnx``).
        inputs: paths the command reads (None entries are ignored).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder; give a file path")
    _check_parent(path, flag)
    _check_not_input(path, flag, inputs)
    return path


def output_folder(path: PathLike, *, flag: str, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Check that ``path`` is (or can become) a writable folder and is none of ``inputs``.

    Args:
        path: the output folder (it need not exist yet).
        flag: the flag or argument that named it, for the message (e.g. ``--out``).
        inputs: paths the command reads (None entries are ignored).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is a file; give a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {path}: folder is not writable")
    else:
        _check_parent(path, flag)
    _check_not_input(path, flag, inputs)
    return path


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor must be a writable folder (the rest is created)."""
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {ancestor} (read-only or no permission)")


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise DataError(f"{what}{path}: cannot be resolved ({e})") from None


def _check_not_input(path: Path, flag: str, inputs: Iterable[PathLike | None]) -> None:
    target = _resolve(path, f"{flag} ")
    for given in inputs:
        if given is None:
            continue
        source = Path(given)
        same = _resolve(source, "") == target
        if not same and path.exists() and source.exists():
            same = os.path.samefile(path, source)
        if same:
            raise OutputError(
                f"{flag} {path}: is an input of this command ({given}); writing it would "
                f"destroy the input, choose another path"
            )
