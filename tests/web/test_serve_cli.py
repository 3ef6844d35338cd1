"""`unetkit serve`: flags, the warning for a public address, models from --models-dir."""

from __future__ import annotations

import shutil

import pytest

from unetkit.cli import serve
from unetkit.cli.main import main
from unetkit.cli.serve import is_loopback


@pytest.fixture
def served(monkeypatch):
    """Run `unetkit serve` up to the point where uvicorn would start; record its arguments."""
    uvicorn = pytest.importorskip("uvicorn")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    # whether the port is free on this machine is not what these tests check
    monkeypatch.setattr(serve, "check_address", lambda host, port: None)
    return calls


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.2", "::", "example.org"))


def test_binds_loopback_by_default_and_lists_models(served, models_root, tmp_path, caplog):
    folder = tmp_path / "models"
    shutil.copytree(models_root / "seg", folder / "cells")
    shutil.copy(models_root / "diffusion.safetensors", folder / "digits.safetensors")
    (folder / "notes.safetensors").write_bytes(b"not a model")  # skipped with a warning
    work = ["--work-dir", str(tmp_path / "work")]  # uvicorn does not run: nothing cleans up
    assert main(["serve", "--models-dir", str(folder), "--port", "8765", *work]) == 0
    app, options = served[0]
    assert options["host"] == "127.0.0.1" and options["port"] == 8765
    kinds = sorted((m.name, m.kind) for m in app.state.web.models.list())
    assert kinds == [("cells", "segment"), ("models/digits.safetensors", "diffusion")]
    assert "notes.safetensors" in caplog.text
    assert "--host" not in caplog.text  # no public-address warning


def test_public_host_prints_a_warning(served, models_root, tmp_path, caplog):
    work = ["--work-dir", str(tmp_path / "work")]
    assert main(["serve", str(models_root / "seg"), "--host", "0.0.0.0", *work]) == 0
    assert "WARNING: --host 0.0.0.0" in caplog.text and "no login" in caplog.text
    assert served[0][1]["host"] == "0.0.0.0"


def test_bad_flags_are_one_error_line(served, tmp_path, capsys):
    assert main(["serve", "--models-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unetkit serve: error: --models-dir") and "\n" not in err
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "no such run directory or checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's range check
        main(["serve", "--port", "70000"])
    assert exit_info.value.code == 2 and "--port" in capsys.readouterr().err
    assert not served
