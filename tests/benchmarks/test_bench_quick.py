"""Smoke test of the benchmark harness (tiny sizes) and checks of its ratio/goal logic."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load_report():
    spec = importlib.util.spec_from_file_location("_bench_report", BENCH / "_bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # runs the harness in a subprocess: minutes on a shared 2-core runner
def test_quick_harness_times_unetkit_and_monai_on_matched_models(tmp_path: Path) -> None:
    pytest.importorskip("monai")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, str(BENCH / "bench.py"), "--quick", "--only", "unet,smp"]
    cmd += ["--tasks", "forward", "--json", str(out_json), "--markdown", str(out_md)]
    # no wall-clock timeout: on a busy runner the harness may take minutes, and how fast
    # the machine is must never decide a test (timings belong in the benchmark report)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out_json.read_text())
    runs = {(r["lib"], r.get("precision")): r for r in payload["results"]}
    assert {("unetkit", "fp32"), ("monai", "fp32"), ("monai", "bf16"), ("smp", None)} <= set(runs)
    smp = runs[("smp", None)]
    installed = importlib.util.find_spec("segmentation_models_pytorch") is not None
    assert installed or (smp["status"], smp["note"]) == (
        "skipped",
        "segmentation_models_pytorch not installed",
    )
    ours, peer = runs[("unetkit", "fp32")], runs[("monai", "fp32")]
    for r in (ours, peer):
        assert r["status"] == "ok" and 0 < r["min"] <= r["median"] <= r["max"]
        assert r["peak_mib"] >= 0 and r["flops"] > 0
    # Matched widths: same parameter count within 1% and same conv work within 15%
    # (BasicUNet's last up-block keeps the full width, so it does slightly more).
    assert abs(ours["params"] - peer["params"]) / peer["params"] < 0.01
    assert 0.85 < ours["flops"] / peer["flops"] < 1.0
    report = out_md.read_text()
    assert "| unet | forward | monai | BasicUNet | fp32 |" in report
    assert "## Goals" in report and "not installed" in report


def _result(lib, precision, median, flops, peak, group="unet", task="forward", **kw):
    return dict(
        group=group,
        task=task,
        lib=lib,
        precision=precision,
        status="ok",
        median=median,
        min=median,
        max=median,
        flops=flops,
        peak_mib=peak,
        items=2,
        **kw,
    )


def test_ratios_and_goals_are_computed_from_the_results() -> None:
    report = _load_report()
    peaks = dict(
        group="peaks", lib="torch", status="ok", fp32_conv=200.0, bf16_conv=400.0, bf16_matmul=450.0
    )
    results = [
        peaks,
        _result("unetkit", "fp32", 1.0, 200e9, 100),
        _result("unetkit", "bf16", 0.5, 170e9, 50),  # 340 GFLOP/s = 85% of the bf16 peak
        _result("monai", "fp32", 2.0, 220e9, 200),
        _result("monai", "bf16", 1.0, 220e9, 100),
        _result("unetkit", "bf16", 2.0, 1e12, 30, group="tiling", task="predict", variant="banded"),
        _result("monai", "fp32", 5.0, 1e12, 100, group="tiling", task="predict", variant="plain"),
    ]
    rows = {(c["group"], c["label"]): c for c in report.comparisons(results)}
    fast = rows[("unet", "fast path vs MONAI default (fp32)")]
    assert fast["speedup"] == pytest.approx(4.0)
    assert fast["flop_ratio"] == pytest.approx((170 / 0.5) / (220 / 2.0))  # equal-FLOP ratio
    assert fast["memory_ratio"] == pytest.approx(0.25)
    goals = {g["goal"]: g for g in report.goals(results)}
    inference = goals["U-Net inference vs MONAI BasicUNet, equal FLOPs (x)"]
    assert inference["value"] == pytest.approx(340 / 110) and inference["status"] == "pass"
    assert goals["U-Net forward, fraction of measured conv peak"]["value"] == pytest.approx(0.85)
    assert goals["U-Net train step vs MONAI BasicUNet, equal FLOPs (x)"]["status"] == "n/a"
    tiled = goals["Tiled 4096² speed-up vs MONAI sliding_window_inference (x)"]
    assert tiled["value"] == pytest.approx(2.5) and tiled["status"] == "pass"
    memory = goals["Tiled 4096² peak memory / MONAI's"]
    assert memory["value"] == pytest.approx(0.3) and memory["status"] == "pass"
    text = report.render(
        dict(
            command="bench",
            date="d",
            cpu="c",
            cores=2,
            threads=2,
            torch="t",
            python="p",
            allocator="tuned",
            fast_path="bf16",
        ),
        results,
    )
    assert (
        "| unet | forward | fast path vs MONAI default (fp32) | 4.00x | 4.00x | 3.09x | 0.25 |"
        in text
    )


@pytest.mark.slow  # runs the harness in a subprocess: minutes on a shared 2-core runner
def test_quick_diffusion_cases_time_the_frozen_copy_and_both_diffusers_bf16_modes(
    tmp_path: Path,
) -> None:
    pytest.importorskip("diffusers")
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH / "bench.py"), "--quick", "--only", "diffusion"]
    proc = subprocess.run(cmd + ["--json", str(out_json)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {(r["lib"], r["precision"], r.get("variant")): r
            for r in json.loads(out_json.read_text())["results"]}  # fmt: skip
    want = {("diffusers", "fp32", None), ("diffusers", "bf16", "autocast"),
            ("diffusers", "bf16", "weights"), ("unetkit", "fp32", None)}  # fmt: skip
    assert want <= set(runs)
    assert all(runs[k]["status"] == "ok" for k in want)
    flops = {r["flops"] for r in runs.values() if r["status"] == "ok"}
    assert len(flops) == 1 and flops.pop() > 0  # one FLOP count: the same work everywhere


def test_diffusion_bf16_is_compared_with_the_faster_diffusers_mode() -> None:
    report = _load_report()
    k = dict(group="diffusion", task="step")
    results = [
        _result("diffusers", "fp32", 0.3, 1e9, 10, **k),
        _result("diffusers", "bf16", 0.2, 1e9, 10, variant="autocast", **k),
        _result("diffusers", "bf16", 0.15, 1e9, 10, variant="weights", **k),
        _result("unetkit", "fp32", 0.3, 1e9, 10, **k),
        _result("unetkit", "bf16", 0.1, 1e9, 10, variant="frozen", **k),
    ]
    rows = {c["label"]: c for c in report.comparisons(results)}
    assert rows["bf16 vs diffusers bf16 (faster variant)"]["speedup"] == pytest.approx(1.5)
    assert rows["fast path vs diffusers default (fp32)"]["speedup"] == pytest.approx(3.0)
    goals = {g["goal"]: g for g in report.goals(results)}
    same = goals["Diffusion step vs diffusers, same precision (worst of fp32/bf16) (x)"]
    assert same["value"] == pytest.approx(1.0) and same["status"] == "FAIL"
