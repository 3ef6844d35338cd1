"""Registers trainer_toy.py as the module ``trainer_toy`` (the tests run with
--import-mode=importlib, so this folder is not on sys.path) and gives its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOY = Path(__file__).with_name("trainer_toy.py")

if "trainer_toy" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("trainer_toy", TOY)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["trainer_toy"] = _module
    _spec.loader.exec_module(_module)
