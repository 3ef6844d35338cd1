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


# what `unetkit models` must not load: it needs torch and the model families only (torch
# itself loads numpy and tqdm)
HEAVY = (
    "scipy", "skimage", "safetensors", "diffusers", "transformers", "PIL", "tifffile",
    "matplotlib", "onnx", "onnxruntime", "napari", "fastapi", "dask", "zarr",
    "unetkit.data", "unetkit.formats", "unetkit.training", "unetkit.inference",
    "unetkit.workflows",
)  # fmt: skip


def test_models_loads_no_heavy_library() -> None:
    """Start-up: the listing imports no optional or data library (checked on sys.modules in a
    fresh interpreter, not by the clock), and builds one model per family."""
    code = (
        "import sys\nfrom unetkit.cli.main import main\nassert main(['models']) == 0\n"
        f"heavy = {HEAVY!r}\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in heavy "
        "or any(m == h or m.startswith(h + '.') for h in heavy)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    loaded = next(line for line in proc.stdout.splitlines() if line.startswith("LOADED"))
    assert loaded == "LOADED []"
    table = proc.stdout.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["model", "presets"]
    names = [line.split()[0] for line in table[2:]]
    assert names == sorted(set(names)) and "unet" in names  # one row per model
    unet = next(line for line in table if line.startswith("unet "))
    assert "paper" in unet and "7,762,498" in unet  # presets named; the default's count
