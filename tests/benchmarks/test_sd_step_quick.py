"""benchmarks/sd_step.py runs end to end on a tiny config (the real run is by hand)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.compare
pytest.importorskip("diffusers")

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "sd_step.py"


def test_quick_run_times_every_case(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("sd_step", SCRIPT)
    sd_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sd_step)
    out = tmp_path / "r.json"
    args = ["--quick", "--repeats", "1", "--warmup", "0", "--inline", "--json", str(out)]
    args += ["--weights", str(tmp_path / "w")]
    assert sd_step.main(args) == 0
    results = json.loads(out.read_text())
    assert [r["case"] for r in results] == list(sd_step.CASES)
    assert len({r["params"] for r in results}) == 1  # the same network on both sides
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + len(sd_step.CASES)
