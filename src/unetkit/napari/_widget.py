"""The "Segment" dock widget: segment the active image, fine-tune on corrected labels.

Both jobs run in napari's ``thread_worker`` so the viewer stays responsive; both call
``unetkit.workflows.interactive`` (``Segmenter``, ``finetune_on_labels``), the API the web
page shares. Problems (no image, a checkpoint of another family, an image with the wrong
number of channels) become a napari notification naming them, not a console traceback.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from unetkit.errors import UnetkitError
from unetkit.inference import TileOptions
from unetkit.runtime import DEFAULT_PRECISION, PRECISIONS
from unetkit.workflows.interactive import Segmenter, SegmentResult, finetune_on_labels

if TYPE_CHECKING:
    import napari

TABLE_COLUMNS = ("label", "area", "centroid_y", "centroid_x", "mean_intensity")
# exported files hold no trainable unetkit checkpoint for an adapter to point at
_NOT_TRAINABLE = (".onnx", ".zip")


class _Relay(QObject):
    """Carries training progress from the worker thread to the GUI thread (queued)."""

    step = Signal(int, int, float)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    return message if isinstance(error, UnetkitError) else f"{type(error).__name__}: {message}"


class SegmentWidget(Container):
    """Dock widget: checkpoint, tile size, TTA, precision; Segment; Fine-tune.

    Args:
        viewer: the napari viewer (npe2 passes it).

    Example:
        >>> widget = SegmentWidget(viewer)  # doctest: +SKIP
        >>> widget.checkpoint.value = "runs/demo"  # doctest: +SKIP
        >>> widget.segment()  # a started worker  # doctest: +SKIP
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer
        self.checkpoint = FileEdit(
            label="model",
            mode="r",
            filter="*.safetensors *.onnx *.zip",
            tooltip="a run directory (type it), checkpoint, LoRA adapter, .onnx or "
            "bioimage.io .zip",
        )
        tile = TileOptions.default("tile") or 0  # 0: None, the whole image if it fits
        self.tile = SpinBox(label="tile (0 = whole)", min=0, max=8192, step=16, value=tile)
        self.tta = CheckBox(text="flip TTA", value=TileOptions.default("tta"))
        self.precision = ComboBox(label="precision", choices=PRECISIONS, value=DEFAULT_PRECISION)
        self.segment_button = PushButton(text="Segment")
        self.steps = SpinBox(label="fine-tune steps", min=1, max=5000, value=50)
        self.lr = FloatSpinBox(
            label="learning rate",
            min=0.0,
            max=1.0,
            step=1e-3,
            value=0.0,
            tooltip="0 = the LoRA recipe's default",
        )
        self.finetune_button = PushButton(text="Fine-tune on my corrections")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(min=0, max=1, value=0, label="progress")
        self.status = Label(value="")
        self.table = Table(value={c: [] for c in TABLE_COLUMNS})
        super().__init__(
            widgets=[
                self.checkpoint,
                self.tile,
                self.tta,
                self.precision,
                self.segment_button,
                self.steps,
                self.lr,
                self.finetune_button,
                self.cancel_button,
                self.progress,
                self.status,
                self.table,
            ]
        )
        self._segmenter: Segmenter | None = None
        self._source: Image | None = None  # the image the results belong to
        self._labels: Labels | None = None
        self._points: Any = None
        self._cancel = False
        self._finetunes = 0
        self._relay = _Relay()
        self._relay.step.connect(self._on_step)
        self.segment_button.changed.connect(self.segment)
        self.finetune_button.changed.connect(self.finetune)
        self.cancel_button.changed.connect(self._ask_cancel)

    # --- inputs ---------------------------------------------------------------------------
    def _image_layer(self) -> Image:
        active = self.viewer.layers.selection.active
        if isinstance(active, Image):
            return active
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        if not images:
            raise UnetkitError("no Image layer to segment: open an image first")
        return images[-1]

    def _model_path(self) -> Path:
        path = Path(self.checkpoint.value)
        if not str(self.checkpoint.value) or str(path) == "." or not path.exists():
            raise UnetkitError(f"model {str(path)!r}: choose a checkpoint or run directory")
        return path

    def _open(self, path: Path) -> Segmenter:
        if self._segmenter is None or self._segmenter.path != path:
            self._segmenter = Segmenter(path)
        return self._segmenter

    def _options(self) -> dict[str, Any]:
        return {
            "tiles": TileOptions(tile=self.tile.value or None, tta=self.tta.value),
            "precision": self.precision.value,
        }

    # --- jobs -----------------------------------------------------------------------------
    def _start(self, job: Any, *args: Any, on_done: Any) -> Any:
        worker = thread_worker(job, start_thread=False, ignore_errors=True)(*args)
        worker.returned.connect(on_done)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._busy(True)
        worker.start()
        return worker

    def segment(self, *_: Any) -> Any:
        """Segment the active Image layer in a worker thread; returns the worker (or None
        after a notification when the inputs are wrong)."""
        try:
            layer, path = self._image_layer(), self._model_path()
        except UnetkitError as e:
            show_error(f"unetkit: {e}")
            return None
        self._source = layer
        image, options = np.asarray(layer.data), self._options()
        self.status.value = f"segmenting {layer.name} ..."

        def job() -> SegmentResult:
            return self._open(path).segment(image, **options)

        return self._start(job, on_done=self._show)

    def finetune(self, *_: Any) -> Any:
        """Train a LoRA adapter on the edited Labels layer, then segment again with it."""
        try:
            path = self._model_path()
            if path.suffix.lower() in _NOT_TRAINABLE:
                raise UnetkitError(
                    f"{path.name}: fine-tuning needs a run directory, checkpoint or adapter "
                    f"(.safetensors), not a {path.suffix} file"
                )
            labels = self._labels_layer()
            layer = self._source or self._image_layer()
        except UnetkitError as e:
            show_error(f"unetkit: {e}")
            return None
        image, corrected = np.asarray(layer.data), np.asarray(labels.data).astype(np.int32)
        run_dir, options, steps = self._finetune_dir(path), self._options(), self.steps.value
        lr = self.lr.value or None
        self._cancel = False
        self.progress.max, self.progress.value = steps, 0
        self.status.value = f"fine-tuning on {labels.name} ..."

        def job() -> tuple[Path, SegmentResult]:
            adapter = finetune_on_labels(
                path,
                [image],
                [corrected],
                run_dir,
                steps=steps,
                lr=lr,
                progress=self._relay.step.emit,
                should_stop=lambda: self._cancel,
            )
            return adapter, Segmenter(adapter).segment(image, **options)

        return self._start(job, on_done=self._finetuned)

    def _labels_layer(self) -> Labels:
        active = self.viewer.layers.selection.active
        if isinstance(active, Labels):
            return active
        if self._labels is not None and self._labels in self.viewer.layers:
            return self._labels
        raise UnetkitError("no Labels layer to learn from: segment first, correct the labels")

    def _finetune_dir(self, path: Path) -> Path:
        """``<run>-finetune-<k>`` next to the run (``<file stem>-finetune-<k>`` next to a
        checkpoint outside a run; a temporary folder if that is read-only)."""
        run = path if path.is_dir() else path.parent
        if run.name == "checkpoints":
            run = run.parent
        elif path.is_file():
            run = path.parent / path.stem
        while True:
            self._finetunes += 1
            target = run.parent / f"{run.name}-finetune-{self._finetunes}"
            if not target.exists():
                break
        try:
            target.mkdir(parents=True)
        except OSError:
            target = Path(tempfile.mkdtemp(prefix=f"{run.name}-finetune-"))
        return target

    # --- results --------------------------------------------------------------------------
    def _show(self, result: SegmentResult) -> None:
        name = self._source.name if self._source is not None else "image"
        if self._labels is not None and self._labels in self.viewer.layers:
            self._labels.data = result.instances
        else:
            self._labels = self.viewer.add_labels(result.instances, name=f"{name} instances")
        centroids = np.array(
            [[row["centroid_y"], row["centroid_x"]] for row in result.table], dtype=float
        ).reshape(-1, 2)
        title = f"{name} cells: {result.count}"
        if self._points is not None and self._points in self.viewer.layers:
            self._points.data, self._points.name = centroids, title
        else:
            self._points = self.viewer.add_points(
                centroids, name=title, size=4, face_color="yellow"
            )
        self._points.features = {c: [row.get(c) for row in result.table] for c in TABLE_COLUMNS}
        self.table.value = {c: [row.get(c) for row in result.table] for c in TABLE_COLUMNS}
        self.status.value = f"{result.count} objects in {name}"

    def _finetuned(self, done: tuple[Path, SegmentResult]) -> None:
        adapter, result = done
        self.checkpoint.value = adapter
        self._show(result)
        show_info(f"unetkit: fine-tuned adapter saved to {adapter}")

    def _on_step(self, step: int, total: int, loss: float) -> None:
        self.progress.max, self.progress.value = total, step
        self.status.value = f"fine-tuning step {step}/{total}, loss {loss:.4f}"

    def _on_error(self, error: BaseException) -> None:
        self.status.value = "failed"
        show_error(f"unetkit: {_one_line(error)}")

    def _on_finished(self) -> None:
        self._busy(False)

    def _busy(self, busy: bool) -> None:
        self.segment_button.enabled = self.finetune_button.enabled = not busy
        self.cancel_button.enabled = busy

    def _ask_cancel(self, *_: Any) -> None:
        self._cancel = True
