"""napari tests: a real X server (Xvfb) when there is no display, else Qt offscreen."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess

import pytest


def _start_xvfb() -> None:
    """Start Xvfb on a free display (``-displayfd`` reports it) before Qt starts."""
    read, write = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x900x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as f:
        display = f.readline().strip()
    if not display:
        proc.kill()
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return
    os.environ["DISPLAY"] = f":{display}"
    atexit.register(proc.terminate)


if not os.environ.get("DISPLAY") and not os.environ.get("QT_QPA_PLATFORM"):
    if shutil.which("Xvfb"):
        _start_xvfb()
    else:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"

pytest.importorskip("napari")
pytest.importorskip("npe2")


@pytest.fixture(scope="session")
def unetkit_manifest():
    """The plugin's manifest registered with npe2 (the editable install predates the
    entry point, so it is registered from the file)."""
    from pathlib import Path

    import npe2

    import unetkit.napari

    path = Path(unetkit.napari.__file__).with_name("napari.yaml")
    pm = npe2.PluginManager.instance()
    try:
        pm.get_manifest("unetkit")
    except KeyError:
        pm.register(npe2.PluginManifest.from_file(path))
    return path
