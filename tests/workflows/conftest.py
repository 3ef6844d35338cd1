"""Registers sd_tiny.py as the module ``sd_tiny`` (the tests run with
--import-mode=importlib, so this folder is not on sys.path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if "sd_tiny" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "sd_tiny", Path(__file__).with_name("sd_tiny.py")
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["sd_tiny"] = _module
    _spec.loader.exec_module(_module)
