"""The run directory: everything needed to inspect, compare, reproduce and resume a run.

Layout::

    run_dir/
      config.json                    resolved run configuration (JSON)
      metrics.csv                    a row per epoch: epoch, step, train/loss, lr, val/..., seconds
      curves.png                     loss, validation-metric and learning-rate curves
      checkpoints/last.safetensors   model after the latest epoch   (``unetkit.load`` reads it)
      checkpoints/best.safetensors   model at the best ``monitor`` value
      checkpoints/state.safetensors  full training state for resume (one file, one commit)

Every file is written atomically (temp file + fsync + rename), so a run killed at any
moment (SIGKILL included) leaves each file either old or new, never half-written. Only rank
0 writes; on other ranks the writing methods do nothing.

Example:
    >>> run = RunDirectory("runs/demo")                       # doctest: +SKIP
    >>> run.write_metrics([{"epoch": 1, "step": 10, "train/loss": 0.7}])   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from unetkit._atomic import atomic_path, atomic_write_text
from unetkit.config import check_choice
from unetkit.errors import DataError
from unetkit.formats import checkpoint as ckpt
from unetkit.training import distributed

logger = logging.getLogger(__name__)
Row = Mapping[str, Any]
ModelSaver = Callable[[nn.Module, Path, dict[str, Any]], Any]
FIRST_COLUMNS = ("epoch", "step", "train/loss", "lr")
LAST_COLUMNS = ("seconds",)
_INT_COLUMNS = ("epoch", "step")


def _default_saver(model: nn.Module, path: Path, extra: dict[str, Any]) -> Any:
    return ckpt.save(model, path, extra=extra)


def csv_columns(history: Sequence[Row]) -> list[str]:
    """Column order: epoch, step, train/loss, lr, the rest in first-seen order, seconds."""
    seen: list[str] = []
    for row in history:
        seen.extend(k for k in row if k not in seen)
    first = [c for c in FIRST_COLUMNS if c in seen]
    last = [c for c in LAST_COLUMNS if c in seen]
    return first + [c for c in seen if c not in first and c not in last] + last


class RunDirectory:
    """Reads and writes one run's folder (see the module docstring for the layout).

    Args:
        path: the run folder; created on first write.
        main: whether this process writes; default: rank 0 of the process group.
    """

    def __init__(self, path: str | os.PathLike, *, main: bool | None = None) -> None:
        self.path = Path(path)
        self.main = distributed.is_main() if main is None else main

    # --- paths ------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def curves_path(self) -> Path:
        return self.path / "curves.png"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_path(self) -> Path:
        return self.checkpoint_dir / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.checkpoint_dir / "best.safetensors"

    @property
    def state_path(self) -> Path:
        return self.checkpoint_dir / "state.safetensors"

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    # --- set-up -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the folders and delete temp files left by a process that was killed."""
        if not self.main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"run_dir {self.path} is a file; pass a folder (new or a run's)")
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.checkpoint_dir):
            for stale in folder.glob(".*.tmp"):  # the pattern of unetkit._atomic's temp files
                stale.unlink(missing_ok=True)

    # --- config -----------------------------------------------------------------------
    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write the resolved run config; values JSON cannot hold are written as repr()."""
        if self.main:
            text = json.dumps(config, indent=2, sort_keys=True, default=repr)
            atomic_write_text(self.config_path, text + "\n")

    def read_config(self) -> dict[str, Any]:
        """The run's config.json (DataError if it is missing or not JSON)."""
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.config_path}: no run config; is this a run folder?") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{self.config_path}: not valid JSON ({e})") from None

    # --- metrics ----------------------------------------------------------------------
    def write_metrics(self, history: Sequence[Row]) -> None:
        """Rewrite metrics.csv from the whole history (one row per epoch), atomically."""
        if not self.main:
            return
        columns = csv_columns(history)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in history:
            writer.writerow([_format(row.get(c)) for c in columns])
        atomic_write_text(self.metrics_path, buf.getvalue())

    def read_metrics(self) -> list[dict[str, float | int | None]]:
        """metrics.csv as rows of numbers (epoch/step as int, missing cells as None)."""
        try:
            text = self.metrics_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{self.metrics_path}: no metrics yet") from None
        rows = []
        for raw in csv.DictReader(io.StringIO(text)):
            rows.append({k: _parse(k, v) for k, v in raw.items()})
        return rows

    def plot_curves(self, history: Sequence[Row]) -> Path | None:
        """Draw loss, validation-metric and learning-rate curves into curves.png."""
        if not self.main or not history:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        epochs = [row["epoch"] for row in history]
        columns = csv_columns(history)
        losses = [c for c in columns if c.endswith("loss")]
        metrics = [c for c in columns if c.startswith("val/") and c not in losses]
        panels = [("loss", losses), ("validation metrics", metrics), ("learning rate", ["lr"])]
        panels = [(t, cols) for t, cols in panels if any(c in columns for c in cols)]
        fig = Figure(figsize=(4.5 * len(panels), 3.6))
        FigureCanvasAgg(fig)
        # fixed margins: a layout engine would triple the drawing time
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.28)
        for i, (title, cols) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for c in cols:
                ys = [_as_float(row.get(c)) for row in history]
                ax.plot(epochs, ys, marker="o" if len(epochs) < 30 else None, label=c)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if title == "loss" and all(_as_float(row.get(c)) > 0 for c in cols for row in history):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        with atomic_path(self.curves_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        return self.curves_path

    # --- checkpoints ------------------------------------------------------------------
    def save_model(
        self,
        model: nn.Module,
        which: str,
        *,
        extra: Mapping[str, Any] | None = None,
        saver: ModelSaver | None = None,
    ) -> Path | None:
        """Write ``checkpoints/{which}.safetensors`` ("last" or "best").

        Args:
            model: the model (DDP/compile wrappers are unwrapped by the saver).
            extra: JSON metadata stored in the file (``unetkit.read_metadata`` returns it).
            saver: ``(model, path, extra) -> Any``; default ``unetkit.save`` (registered
                models). A LoRA run can pass one that writes the adapter file only.
        """
        check_choice("which", which, ("last", "best"))
        if not self.main:
            return None
        path = self.last_path if which == "last" else self.best_path
        (saver or _default_saver)(model, path, dict(extra or {}))
        return path

    def has_state(self) -> bool:
        """True if a training state to resume from exists."""
        return self.state_path.is_file()

    def save_state(self, state: Mapping[str, Any]) -> Path | None:
        """Atomically write the training state (the commit point of an epoch)."""
        if not self.main:
            return None
        return ckpt.save_state(self.state_path, dict(state))

    def load_state(self) -> dict[str, Any]:
        """The training state written by ``save_state`` (CheckpointError if unreadable)."""
        return ckpt.load_state(self.state_path)


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    return str(value)


def _parse(column: str, text: str | None) -> float | int | None:
    if text is None or text == "":
        return None
    return int(text) if column in _INT_COLUMNS else float(text)


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)
