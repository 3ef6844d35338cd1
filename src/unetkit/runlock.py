"""Run folders have one writer at a time, and a resume continues the same run.

``run_lock(run_dir)`` holds ``RUN/.unetkit.lock`` (``"<pid> <host>"``) while a training runs.
A second writer is refused with the owner's pid; the lock of a process that died (SIGKILL,
power loss) is taken over, so a killed run can always be resumed.

``check_same_run(run_dir, identity)`` compares what defines a run (data, model, targets)
with the run folder's ``config.json``: a re-run with other data or another model would
otherwise "resume" and replace the finished run's checkpoints.

Example:
    >>> with run_lock("runs/a"):                                  # doctest: +SKIP
    ...     train(recipe, "runs/a")
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from unetkit.errors import ConfigError, RunLockedError

LOCK_NAME = ".unetkit.lock"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the run folder's lock for the ``with`` block (the folder is created).

    Args:
        run_dir: the run folder.

    Raises:
        RunLockedError: another live process holds the lock (the message names its pid).
    """
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    _acquire(lock)
    try:
        yield lock
    finally:
        if _owner(lock) == (os.getpid(), socket.gethostname()):
            lock.unlink(missing_ok=True)
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no folder


def _acquire(lock: Path) -> None:
    me = f"{os.getpid()} {socket.gethostname()}\n"
    # write the full content first, then link it into place: link fails if the lock exists,
    # so a reader never sees a half-written lock and two writers never both win
    fd, tmp = tempfile.mkstemp(prefix=".lock.", dir=lock.parent)
    try:
        os.write(fd, me.encode())
        os.close(fd)
        for _ in range(2):
            try:
                os.link(tmp, lock)
                return
            except FileExistsError:
                owner = _owner(lock)
                if owner is not None and _alive(*owner):
                    raise RunLockedError(
                        f"{lock.parent}: in use by process {owner[0]} on {owner[1]} "
                        f"(lock file {lock}); wait for it to finish or choose another --out"
                    ) from None
                # the owner died without cleaning up: take the lock over
                lock.unlink(missing_ok=True)
        raise RunLockedError(f"{lock.parent}: another process took the lock ({lock})")
    finally:
        Path(tmp).unlink(missing_ok=True)


def _owner(lock: Path) -> tuple[int, str] | None:
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None  # missing or unreadable: nobody can be waiting on it


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # cannot tell on a shared file system: assume it still runs
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    """A killed child not yet reaped still answers kill(0); its lock is stale all the same."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] != "Z"


def check_same_run(
    run_dir: str | os.PathLike, identity: Mapping[str, Any], *, flag: str = "--restart"
) -> None:
    """Refuse to resume ``run_dir`` when its saved run differs in ``identity``.

    Args:
        run_dir: a run folder; nothing is checked if it has no saved training state.
        identity: the run-defining settings (e.g. data, model, model_options) as they are
            stored under ``"run"`` in the folder's config.json; "a.b" looks into a dict.
        flag: the option that starts the run over, named in the message.

    Raises:
        ConfigError: naming each setting that differs, old and new value.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / "state.safetensors").is_file():
        return
    try:
        saved = json.loads((run_dir / "config.json").read_text()).get("run", {})
    except (OSError, ValueError, AttributeError):
        return  # no readable config: the trainer's own resume checks still apply
    changed = []
    for key, value in identity.items():
        found, old = _lookup(saved, key)
        if found and not _same(old, value):
            changed.append(f"{key} {old!r} -> {value!r}")
    if changed:
        raise ConfigError(
            f"{run_dir}: holds a run with other settings ({'; '.join(changed)}); "
            f"pass {flag} to start it over or choose another --out"
        )


def _lookup(saved: Any, key: str) -> tuple[bool, Any]:
    """``saved["a"]["b"]`` for the key "a.b"; (False, None) where a part is missing."""
    for part in key.split("."):
        if not isinstance(saved, dict) or part not in saved:
            return False, None
        saved = saved[part]
    return True, saved


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, str) and isinstance(new, str) and old != new:
        with contextlib.suppress(OSError):
            return Path(old).resolve() == Path(new).resolve()  # paths spelt differently
    if isinstance(old, list | tuple) and isinstance(new, list | tuple):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new, strict=True))
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same(old[k], new[k]) for k in old)
    return old == new
