"""Make docs/img/napari.png: the Segment widget's result on the synthetic-cells sample.

Run under a display (e.g. ``xvfb-run -a python docs/napari_screenshot.py``); it trains a
small model for about a minute on the CPU (or takes ``--run RUN_DIR``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import npe2
from napari._qt.dialogs.qt_notification import NapariQtNotification
from qtpy.QtWidgets import QApplication

import napari
import unetkit.napari
from unetkit.data.io import write_image
from unetkit.napari._widget import SegmentWidget


def train(root: Path) -> Path:
    from unetkit.data.synthetic import write_synthetic_folder
    from unetkit.workflows import segment_train as R

    write_synthetic_folder(root / "data", 8, shape=(128, 128), seed=3)
    recipe = R.make_recipe(
        "modern",
        data=str(root / "data"),
        model_options={"channels": (8, 16, 32)},
        epochs=6,
        batch_size=4,
        crop=96,
        samples_per_epoch=32,
    )
    R.train(recipe, root / "base", progress=False)
    return root / "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, help="a trained run directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img" / "napari.png")
    args = parser.parse_args()
    run = args.run or train(Path(tempfile.mkdtemp(prefix="unetkit-shot-")))
    manifest = Path(unetkit.napari.__file__).with_name("napari.yaml")
    pm = npe2.PluginManager.instance()
    try:
        pm.get_manifest("unetkit")
    except KeyError:
        pm.register(npe2.PluginManifest.from_file(manifest))
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1280, 800)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="unetkit: Segment")
    viewer.open_sample("unetkit", "cells")
    viewer.layers.selection.active = viewer.layers["synthetic cells"]
    widget.checkpoint.value = run
    widget.segment()
    app = QApplication.instance()
    while not widget.segment_button.enabled:
        app.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # e.g. napari's PyQt5 deprecation notice: not part of the picture
    app.processEvents()
    write_image(args.out, viewer.screenshot(canvas_only=False, flash=False))
    print(f"wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
