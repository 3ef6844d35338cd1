"""The models the page offers: run folders and files from the command line, every checkpoint
found in ``--models-dir``, and adapters fine-tuned from the page.

The browser only ever sends a model's short id; paths stay on the server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from unetkit.errors import CheckpointError
from unetkit.formats.checkpoint import read_metadata
from unetkit.formats.loading import base_checkpoint, is_adapter_file

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".safetensors", ".onnx")


@dataclass(frozen=True)
class ModelEntry:
    """One choosable model.

    Args:
        id: short stable id (a hash of the resolved path).
        name: what the page shows.
        kind: "segment" or "diffusion".
        path: run folder or model file, as the workflow functions take it.
    """

    id: str
    name: str
    kind: str
    path: Path

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "kind": self.kind}


def model_kind(path: Path) -> str:
    """ "diffusion" or "segment" for a run folder or model file; raises CheckpointError."""
    file = base_checkpoint(path)
    if file.suffix == ".onnx":
        return "segment"
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{path}: not a run folder, .safetensors or .onnx file")
    if is_adapter_file(file):
        return "segment"  # the page fine-tunes segmentation models only
    return "diffusion" if "diffusion" in read_metadata(file) else "segment"


def find_models(models_dir: Path) -> list[Path]:
    """Run folders (with ``checkpoints/``) and loose model files under ``models_dir``;
    the checkpoints inside a run folder are offered as the run, not one by one."""
    found: list[Path] = []
    for root, dirs, files in os.walk(models_dir):
        here = Path(root)
        if (here / "checkpoints").is_dir() and any(
            (here / "checkpoints" / n).is_file() for n in ("best.safetensors", "last.safetensors")
        ):
            found.append(here)
            dirs[:] = [d for d in dirs if d != "checkpoints"]
        found += [here / f for f in sorted(files) if f.endswith(MODEL_SUFFIXES)]
        dirs.sort()
    return found


class ModelList:
    """A thread-safe list of :class:`ModelEntry` (the fine-tune job adds to it).

    Args:
        paths: run folders or model files given on the command line (must be valid).
        models_dir: optional folder searched for more (invalid files there are skipped).
    """

    def __init__(self, paths: list[Path], models_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        for p in paths:
            self.add(Path(p))
        if models_dir is not None:
            if not Path(models_dir).is_dir():
                raise CheckpointError(f"--models-dir {models_dir}: no such folder")
            for p in find_models(Path(models_dir)):
                try:
                    self.add(p)
                except Exception as e:  # a stray file in the folder must not stop the server
                    log.warning("skipping %s: %s", p, e)

    def add(self, path: Path, name: str | None = None) -> ModelEntry:
        """Add a run folder or model file (raises CheckpointError if it is not one)."""
        path = Path(path).resolve()
        kind = model_kind(path)
        model_id = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        label = name or (path.name if path.is_dir() else f"{path.parent.name}/{path.name}")
        entry = ModelEntry(model_id, label, kind, path)
        with self._lock:
            self._entries.setdefault(model_id, entry)
        return entry

    def get(self, model_id: str, kind: str) -> ModelEntry:
        """The entry for ``model_id`` of ``kind``; raises CheckpointError naming the choices."""
        with self._lock:
            entry = self._entries.get(model_id)
            choices = [e.name for e in self._entries.values() if e.kind == kind]
        if entry is None or entry.kind != kind:
            raise CheckpointError(
                f"model {model_id!r}: not a {kind} model of this server (choices: "
                f"{', '.join(choices) or 'none; start `unetkit serve` with a run folder'})"
            )
        return entry

    def list(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())
