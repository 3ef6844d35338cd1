"""benchmarks/sd_image.py runs end to end on tiny components (the real run is by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.compare
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def test_quick_run_times_every_case(
    benchmark_script, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sd_image = benchmark_script("sd_image")
    out = tmp_path / "r.json"
    args = ["--quick", "--steps", "3", "--inline", "--json", str(out)]
    args += ["--pipeline", str(tmp_path / "sd"), "--cases", "unetkit,diffusers-bf16,unetkit"]
    assert sd_image.main(args) == 0
    results = json.loads(out.read_text())
    assert [r["case"] for r in results] == ["unetkit", "diffusers-bf16", "unetkit"]
    assert (tmp_path / "sd" / "model_index.json").is_file()
    for r in results:  # one image each; two step gaps timed by the callbacks
        assert len(r["seconds"]) == 1 and r["seconds"][0] > r["step_seconds"][0] > 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + 2  # header + one row per case, the repeated case merged


def test_vae_mode_times_both_precisions(benchmark_script, capsys: pytest.CaptureFixture) -> None:
    sd_image = benchmark_script("sd_image")
    assert sd_image.main(["--vae", "--quick"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["float32", "bf16 autocast"]
