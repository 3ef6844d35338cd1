"""One Stable Diffusion 1.x denoising step: unetkit's U-Net vs diffusers, identical weights.

    python benchmarks/sd_step.py --repeats 2                  # SD 1.x size (859.5 M params)
    python benchmarks/sd_step.py --quick --repeats 1          # tiny config, seconds

The workload of ``unetkit generate`` on an SD 1.x pipeline: batch 2 (the prompt and the
negative prompt of classifier-free guidance), 64×64 latents (512×512 images), a 77×768 CLIP
context. The weights are drawn once (seed 0), saved as a diffusers U-Net folder, and each
case loads that folder in a fresh process (so its peak resident memory is its own):

- ``diffusers fp32``: ``UNet2DConditionModel`` as ``from_pretrained`` gives it (the default);
- ``diffusers bf16``: the same with ``torch_dtype=torch.bfloat16`` (diffusers' bf16 way);
- ``unetkit fp32``: our ``DiffusionUNet`` from the same folder;
- ``unetkit bf16``: our U-Net through ``runtime.prepared(model, "bf16")``, what ``generate``
  runs with ``--precision auto`` on a CPU with native bf16 (a frozen copy with prepacked
  weights; elsewhere bf16 autocast), loaded as ``generate`` loads it there: weights read
  tensor by tensor straight into the frozen copy's dtypes (``frozen_dtype``), never all
  in float32.

Each case: ``--warmup`` untimed steps, then ``--repeats`` timed ones; the table shows the
median, speed-ups against both diffusers cases, and peak RSS. On a machine shared with
other jobs the numbers are noisy: state the repeats with the table.

The ceiling: the step's arithmetic is counted (``torch.utils.flop_counter`` on the diffusers
model built on the meta device: convolutions, linear layers, attention products), and this
CPU's large-matrix-product rate is measured in the same run (``torch.mm`` on 4096² bf16
and float32 matrices, best of 5); their ratio is the least time any implementation doing
this arithmetic can take here. Each case's GFLOP/s is given as a share of that rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("diffusers-fp32", "diffusers-bf16", "unetkit-fp32", "unetkit-bf16")
SD15 = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)


def make_weights(folder: Path, quick: bool) -> dict:
    """Random SD-shaped U-Net weights (seed 0) saved as a diffusers folder; its config."""
    import torch
    from diffusers import UNet2DConditionModel

    config = TINY if quick else SD15
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        UNet2DConditionModel(**config).save_pretrained(folder, safe_serialization=True)
    return config


def _load(case: str, folder: Path):
    import torch

    if case.startswith("diffusers"):
        from diffusers import UNet2DConditionModel

        dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype).eval()
    from unetkit.formats.diffusers import load_diffusers_unet
    from unetkit.runtime import fastpath

    store = fastpath.frozen_dtype("bf16") if case == "unetkit-bf16" else None
    return load_diffusers_unet(folder, frozen_dtype=store)


def run_case(case: str, folder: Path, quick: bool, warmup: int, repeats: int) -> dict:
    """Time one case in this process; returns seconds per step and peak RSS (MiB)."""
    import torch

    from unetkit.runtime import prepared

    config = make_weights(folder, quick)
    model = _load(case, folder)
    side = config["sample_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, side, side, generator=g)
    ctx = torch.randn(2, 8 if quick else 77, config["cross_attention_dim"], generator=g)
    t = torch.tensor([500, 500])
    if case == "diffusers-bf16":
        x, ctx = x.bfloat16(), ctx.bfloat16()
    precision = "bf16" if case == "unetkit-bf16" else "fp32"
    times = []
    with prepared(model, precision) if case.startswith("unetkit") else _inference(model) as run:
        for i in range(warmup + repeats):
            start = time.perf_counter()
            out = run(x, t, ctx)
            out = out.sample if hasattr(out, "sample") else out
            float(out.float().abs().mean())  # the result is used: nothing is skipped
            if i >= warmup:
                times.append(time.perf_counter() - start)
    peak = peak_rss_mib()
    params = sum(p.numel() for p in model.parameters())
    return {"case": case, "seconds": times, "peak_rss_mib": peak, "params": params}


def step_flops(quick: bool) -> dict:
    """Floating-point operations of one step (batch 2), by kind, counted on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = TINY if quick else SD15
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
        side = config["sample_size"]
        x = torch.empty(2, 4, side, side)
        ctx = torch.empty(2, 8 if quick else 77, config["cross_attention_dim"])
        with FlopCounterMode(display=False) as counter:
            model(x, torch.zeros(2), ctx)
    kinds = {"convolution": "convolutions", "addmm": "linear", "mm": "linear"}
    out: dict[str, float] = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        kind = kinds.get(str(op).split(".")[-1], "attention")  # bmm / sdpa
        out[kind] = out.get(kind, 0.0) + n
    return out


def matmul_rate(dtype_name: str, size: int = 4096, repeats: int = 5) -> float:
    """This CPU's best large-matrix-product rate in GFLOP/s (``torch.mm``, size² × size²)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN picks and caches its kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def run_ceiling(quick: bool) -> dict:
    return {
        "flops": step_flops(quick),
        "gflops_per_s": {
            d: matmul_rate(d, 512 if quick else 4096) for d in ("bfloat16", "float32")
        },
    }


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` where Linux has it, because
    ``ru_maxrss`` carries the parent's peak across fork + exec (a parent that drew the
    weights would show up in every case)."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _inference:
    """``with _inference(model) as run``: the plain model under inference_mode."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        import torch

        self._ctx = torch.inference_mode()
        self._ctx.__enter__()
        return lambda x, t, c: self.model(x, t, encoder_hidden_states=c)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, StopIteration, subprocess.CalledProcessError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical CPUs"


def table(results: list[dict], repeats: int, quick: bool, ceiling: dict) -> str:
    med = {r["case"]: statistics.median(r["seconds"]) for r in results}
    flops = sum(ceiling["flops"].values())
    rate = ceiling["gflops_per_s"]
    kinds = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in sorted(ceiling["flops"].items()))
    lines = [
        f"SD 1.x U-Net ({results[0]['params'] / 1e6:.1f} M params), one denoising step, "
        f"batch 2, {'tiny config' if quick else '64×64 latents, 77×768 context'}; "
        f"median of {repeats} timed step(s) after warm-up; {cpu_name()}; torch "
        f"{__import__('torch').__version__}",
        "",
        f"A step is {flops / 1e9:,.1f} GFLOP ({kinds}); this CPU's torch.mm rate is "
        f"{rate['bfloat16']:.0f} GFLOP/s in bf16 and {rate['float32']:.0f} in float32, so no "
        f"step can take less than {flops / 1e9 / rate['bfloat16']:.2f} s in bf16 "
        f"({flops / 1e9 / rate['float32']:.2f} s in float32).",
        "",
        "| case | s/step | vs diffusers bf16 | vs diffusers fp32 | GFLOP/s (of mm rate) "
        "| peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        s = med[r["case"]]
        vs = [f"{med[ref] / s:.2f}×" if ref in med else "-" for ref in CASES[1::-1]]
        achieved = flops / 1e9 / s
        share = achieved / rate["float32" if r["case"].endswith("fp32") else "bfloat16"]
        lines.append(
            f"| {r['case']} | {s:.3f} | {vs[0]} | {vs[1]} | {achieved:.0f} ({share:.0%}) "
            f"| {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def _in_fresh_process(args: argparse.Namespace, folder: Path, case: str) -> dict:
    cmd = [sys.executable, __file__, "--_case", case, "--weights", str(folder)]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    cmd += ["--quick"] if args.quick else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny config (a smoke test)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--weights", help="folder for the shared weights (default: a temp folder)")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--inline", action="store_true", help="run the cases in this process")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.weights or tmp)
        if args._case == "ceiling":
            print(json.dumps(run_ceiling(args.quick)))
            return 0
        if args._case:
            res = run_case(args._case, folder, args.quick, args.warmup, args.repeats)
            print(json.dumps(res))
            return 0
        make_weights(folder, args.quick)
        results = []
        for case in args.cases.split(","):
            if args.inline:
                results.append(run_case(case, folder, args.quick, args.warmup, args.repeats))
            else:
                results.append(_in_fresh_process(args, folder, case))
            print(f"{case}: {results[-1]['seconds']}", file=sys.stderr)
        if args.inline:
            ceiling = run_ceiling(args.quick)
        else:
            ceiling = _in_fresh_process(args, folder, "ceiling")
    print(table(results, args.repeats, args.quick, ceiling))
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": results, "ceiling": ceiling}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
