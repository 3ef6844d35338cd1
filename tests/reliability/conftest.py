"""Registers badinputs.py as the module ``badinputs`` (the tests run with
--import-mode=importlib, so this folder is not on sys.path) and builds the zoo once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if "badinputs" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "badinputs", Path(__file__).with_name("badinputs.py")
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["badinputs"] = _module
    _spec.loader.exec_module(_module)

import badinputs  # noqa: E402


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> badinputs.Zoo:
    return badinputs.build_zoo(tmp_path_factory.mktemp("zoo"))
