from __future__ import annotations

import subprocess
import sys

import pytest

from unetkit.cli.main import main


def test_models_table_shows_paper_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "unet", "--input-size", "572", "572"]) == 0
    out = capsys.readouterr().out
    paper = next(line for line in out.splitlines() if " paper " in line)
    assert "31,030,658" in paper and "388×388" in paper and "valid" in paper


def test_models_invalid_size_names_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "unet", "--input-size", "500"]) == 0
    assert "nearest input 508×508" in capsys.readouterr().out


def test_unknown_model_is_one_clear_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unetkit.cli.main", "models", "unte"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("unetkit models: error: unknown model 'unte' (did you mean 'unet'?)")
    assert "available: " in lines[0] and "unet" in lines[0]
