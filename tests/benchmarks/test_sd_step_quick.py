"""benchmarks/sd_step.py runs end to end on a tiny config (the real run is by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.compare
pytest.importorskip("diffusers")


def test_quick_run_times_every_case(
    benchmark_script, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sd_step = benchmark_script("sd_step")
    out = tmp_path / "r.json"
    args = ["--quick", "--repeats", "1", "--warmup", "0", "--inline", "--json", str(out)]
    args += ["--weights", str(tmp_path / "w")]
    assert sd_step.main(args) == 0
    report = json.loads(out.read_text())
    results = report["cases"]
    assert [r["case"] for r in results] == list(sd_step.CASES)
    assert set(report["ceiling"]["gflops_per_s"]) == {"bfloat16", "float32"}
    assert len({r["params"] for r in results}) == 1  # the same network on both sides
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + len(sd_step.CASES)


def test_step_flops_match_a_count_by_layer_shapes(benchmark_script) -> None:
    """The ceiling's arithmetic (torch's flop counter on the meta device) against 2 × the
    multiply-adds of every Conv2d and Linear layer, counted from their shapes on a real run."""
    import torch
    from diffusers import UNet2DConditionModel

    sd_step = benchmark_script("sd_step")
    counted = sd_step.step_flops(quick=True)
    model = UNet2DConditionModel(**sd_step.TINY).eval()
    by_shape = {"convolutions": 0, "linear": 0}

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            by_shape["convolutions"] += 2 * output.numel() * k
        else:
            by_shape["linear"] += 2 * output.numel() * module.in_features

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    side = sd_step.TINY["sample_size"]
    with torch.no_grad():
        model(torch.randn(2, 4, side, side), torch.zeros(2), torch.randn(2, 8, 32))
    assert counted["convolutions"] == by_shape["convolutions"]
    assert counted["linear"] == by_shape["linear"]
    assert counted["attention"] > 0
