"""Time unetkit against its peers on identical work, one table.

    python benchmarks/bench.py                       # everything but the 512³ volume
    python benchmarks/bench.py --quick               # tiny sizes, a smoke test (seconds)
    python benchmarks/bench.py --only unet,tiling --markdown bench.md --json bench.json
    python benchmarks/bench.py --only tiling3d       # 512³ volume (slow)

Groups: peaks (the machine's fp32 conv / bf16 channels-last conv / bf16 matmul GFLOP/s),
unet / attention_unet / vnet (forward and training step vs MONAI BasicUNet / AttentionUnet /
VNet with matched widths), smp (segmentation_models_pytorch, if installed), tiling (4096²
sliding window vs monai.inferers.sliding_window_inference), tiling3d (512³), diffusion (one
denoising step vs diffusers UNet2DConditionModel on the same weights).

Every case runs in a fresh process with the same environment and allocator setting
(``--allocator tuned``: unetkit's glibc tuning, applied to the peers too), so peak memory
and allocator state belong to that case. Precisions: fp32 eager for both; unetkit's default
fast path where the CPU has native bf16 (inference: the frozen bf16 copy with prepacked
weights that predict/generate run, ``unetkit.runtime.fastpath``; training: bf16 autocast
+ channels-last) against the peer's default (fp32) and against the peer in bf16 (MONAI:
autocast + channels-last; diffusers: autocast, and bf16 weights as ``torch_dtype`` gives,
compared with the faster of the two). A training step is forward +
cross-entropy + backward + AdamW step. FLOPs are counted once per case by FlopCounterMode.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench_report import GROUPS, goals, render  # noqa: E402

from unetkit._atomic import atomic_write_text  # noqa: E402

DEFAULT_GROUPS = ("peaks", "unet", "attention_unet", "vnet", "smp", "tiling", "diffusion")


def fast_precision() -> str:
    """unetkit's default precision on this CPU: bf16 where computed natively, else fp32."""
    import torch

    from unetkit.runtime import resolve_precision

    return "bf16" if resolve_precision("auto", torch.device("cpu")) is not None else "fp32"


def build_cases(groups: list[str], fast: str) -> list[dict]:
    cases: list[dict] = []
    for group in groups:
        if group == "peaks":
            cases.append(dict(group="peaks", lib="torch", model="conv/matmul", task="peak"))
        elif group in ("unet", "attention_unet", "vnet"):
            for task in ("forward", "train"):
                for lib, precision in (("unetkit", "fp32"), ("unetkit", fast)):
                    frozen = task == "forward" and precision == "bf16"  # predict's fast path
                    cases.append(dict(group=group, lib=lib, model=group, task=task,
                                      precision=precision, variant="frozen" if frozen else None,
                                      profile=group == "unet" and precision == fast))  # fmt: skip
                for precision in ("fp32", "bf16"):
                    cases.append(dict(group=group, lib="monai", model=GROUPS[group]["peer"],
                                      task=task, precision=precision))  # fmt: skip
        elif group in ("tiling", "tiling3d"):
            for lib, precision, variant in (
                ("monai", "fp32", "plain"),
                ("monai", "bf16", "plain"),
                ("unetkit", "fp32", "plain"),
                ("unetkit", "fp32", "banded"),
                ("unetkit", fast, "banded"),
            ):
                cases.append(dict(group=group, lib=lib, model="unet-small", task="predict",
                                  precision=precision, variant=variant))  # fmt: skip
        elif group == "diffusion":
            for lib, precision, variant in (
                ("diffusers", "fp32", None),
                ("diffusers", "bf16", "autocast"),
                ("diffusers", "bf16", "weights"),
                ("unetkit", "fp32", None),
                ("unetkit", "bf16", "frozen"),
            ):
                cases.append(dict(group=group, lib=lib, model="UNet2DCondition", task="step",
                                  precision=precision, variant=variant,
                                  profile=lib == "unetkit" and precision == fast))  # fmt: skip
        elif group == "smp":
            cases.append(dict(group="smp", lib="smp", model="Unet", task="forward"))
    return cases


def run_case(spec: dict, timeout: float) -> dict:
    """Run one case in a fresh interpreter; its last stdout line carries the result."""
    if spec["group"] == "smp" and importlib.util.find_spec("segmentation_models_pytorch") is None:
        return dict(spec, status="skipped", note="segmentation_models_pytorch not installed")
    if spec["group"] == "smp":
        return dict(spec, status="skipped", note="installed, but no matched case is defined")
    cmd = [sys.executable, str(HERE / "_bench_cases.py"), json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ)
    except subprocess.TimeoutExpired:
        return dict(spec, status="error", note=f"timed out after {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(spec, status="error", note=" | ".join(tail)[:300])
    result = dict(spec, **json.loads(lines[-1][len("BENCH_RESULT ") :]))
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke test")
    ap.add_argument("--only", help=f"comma list of groups (default: {','.join(DEFAULT_GROUPS)})")
    ap.add_argument("--tasks", help="comma list: forward,train,predict,step,peak (default all)")
    ap.add_argument("--repeats", type=int, help="timed calls per case (default 5; quick 1)")
    ap.add_argument("--allocator", choices=["tuned", "system"], default="tuned")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("--render", type=Path, help="only re-render the tables of a saved --json")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        meta = saved.get("meta") or dict(_meta(args, "?"), command=f"(partial run) {args.render}")
        report = render(meta, saved["results"])
        print(report)
        if args.markdown:
            atomic_write_text(args.markdown, report)
        return 0
    groups = args.only.split(",") if args.only else list(DEFAULT_GROUPS)
    known = (*DEFAULT_GROUPS, "tiling3d")
    bad = [g for g in groups if g not in known]
    if bad:
        ap.error(f"unknown group(s) {bad}; choose from {', '.join(known)}")
    fast = fast_precision()
    repeats = args.repeats or (1 if args.quick else 5)
    common = dict(quick=args.quick, repeats=repeats, warmup=1, allocator=args.allocator)
    common["threads"] = args.threads
    results = []
    tasks = set(args.tasks.split(",")) if args.tasks else None
    for spec in build_cases(groups, fast):
        if tasks is not None and spec["task"] not in tasks:
            continue
        spec = dict(common, **spec)
        if spec["group"] != "unet" and not args.quick and not args.repeats:
            spec["repeats"] = min(repeats, 3)  # long cases: 3 timed runs
        result = run_case(spec, args.timeout)
        results.append(result)
        if args.json:  # after every case: a long run stopped early keeps what it measured
            atomic_write_text(args.json, json.dumps(dict(results=results), indent=1))
        print(
            f"[{result['group']}] {result['lib']} {result.get('task')} "
            f"{result.get('precision', '')} {result.get('variant', '')}: {result['status']} "
            f"{result.get('median', '') or result.get('note', '')}",
            file=sys.stderr,
            flush=True,
        )
    meta = _meta(args, fast)
    meta["command"] = "python benchmarks/bench.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report = render(meta, results)
    print(report)
    if args.markdown:
        atomic_write_text(args.markdown, report)
    if args.json:
        payload = dict(meta=meta, results=results, goals=goals(results))
        atomic_write_text(args.json, json.dumps(payload, indent=1))
    return 0 if all(r["status"] != "error" for r in results) else 1


def _meta(args: argparse.Namespace, fast: str) -> dict:
    import torch

    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpu=_cpu_name(),
        cores=os.cpu_count(),
        threads=args.threads or torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        allocator=args.allocator,
        fast_path=fast + ("+channels_last" if fast == "bf16" else ""),
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
