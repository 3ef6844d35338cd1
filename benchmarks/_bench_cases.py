"""One benchmark case per process: build the model (unetkit or a peer), time it, print JSON.

Run by ``benchmarks/bench.py`` as ``python benchmarks/_bench_cases.py '<spec json>'``; a
fresh process per case keeps the peak-memory mark and the allocator state clean. The last
stdout line is ``BENCH_RESULT {...}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

from unetkit import perf

# --- sizes -------------------------------------------------------------------------------
SEG = {  # family -> (unetkit name, kwargs, monai class, kwargs, input shape), full / quick
    "unet": dict(
        full=((64, 128, 256, 512, 1024), (2, 1, 256, 256)),
        quick=((4, 8, 16, 32, 64), (2, 1, 32, 32)),
    ),
    "attention_unet": dict(
        full=((32, 64, 128, 256, 512), (2, 1, 256, 256)), quick=((8, 16, 32), (2, 1, 32, 32))
    ),
    "vnet": dict(full=(None, (1, 1, 64, 64, 64)), quick=(None, (2, 1, 16, 16, 16))),
}
PEER = {"unet": "BasicUNet", "attention_unet": "AttentionUnet", "vnet": "VNet"}


def build_segmentation(family: str, lib: str, quick: bool) -> tuple[torch.nn.Module, tuple]:
    """Matched unetkit / MONAI models (same widths, norm, activation, up/down-sampling)."""
    channels, shape = SEG[family]["quick" if quick else "full"]
    if lib == "unetkit":
        import unetkit

        if family == "unet":
            return unetkit.create_model("unet", channels=channels, norm="batch"), shape
        if family == "attention_unet":  # MONAI down-samples with strided convs
            return unetkit.create_model("attention_unet", channels=channels, down="conv"), shape
        return unetkit.create_model("vnet", preset="vnet_pytorch", act="elu"), shape
    from monai.networks import nets

    if family == "unet":
        features = (*channels, channels[0])
        return nets.BasicUNet(2, 1, 2, features=features, act="relu", norm="batch"), shape
    if family == "attention_unet":
        strides = (2,) * (len(channels) - 1)
        return nets.AttentionUnet(2, 1, 2, channels=channels, strides=strides), shape
    drop = dict(dropout_prob_down=0.0, dropout_prob_up=(0.0, 0.0))
    return nets.VNet(3, 1, 2, **drop), shape


def release_freed_memory() -> None:
    """Hand memory freed so far back to the OS (glibc ``malloc_trim``), so the peak-RSS
    rise of a case counts its own working memory, not pages left over by set-up (freezing a
    model frees its float32 copy, which the timed passes would otherwise reuse unseen)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


# --- timing ------------------------------------------------------------------------------
def fast_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def precision_ctx(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def measure(
    step: Callable[[], object], spec: dict, flops_of: Callable[[], object] | None = None
) -> dict:
    """Warm up, time ``repeats`` calls (peak RSS over all), then count FLOPs of one call
    (of ``flops_of``, the same work in eager float32, where ``step`` runs kernels the
    FLOP counter cannot see: unetkit's frozen copy with prepacked oneDNN weights)."""
    with perf.peak_memory() as mem:
        for _ in range(spec["warmup"]):
            step()
        times = []
        for _ in range(spec["repeats"]):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    out = dict(
        times=times,
        median=statistics.median(times),
        min=min(times),
        max=max(times),
        peak_mib=mem["peak_bytes"] / 2**20,
        hwm_mib=mem["hwm_bytes"] / 2**20,
    )
    if spec.get("count_flops", True):
        out["flops"] = perf.count_flops(flops_of or step)
    if spec.get("profile"):
        out["profile"] = top_ops(step)
    return out


def top_ops(step: Callable[[], object], k: int = 8) -> list[list]:
    """The ``k`` ops with most self CPU time in one call: [name, ms, % of total]."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    return [[e.key, e.self_cpu_time_total / 1e3, 100 * e.self_cpu_time_total / total] for e in rows]


def segmentation_case(spec: dict) -> dict:
    model, shape = build_segmentation(spec["group"], spec["lib"], spec["quick"])
    bf16 = spec["precision"] == "bf16"
    x = torch.randn(shape)
    target = torch.randint(0, 2, (shape[0], *shape[2:]))
    if bf16:  # the fast path: bf16 autocast on channels-last data and weights
        fmt = fast_format(x)
        model = model.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)
    flops_of = None
    if spec["task"] == "forward" and bf16 and spec["lib"] == "unetkit":
        from unetkit.runtime.fastpath import freeze

        eager, frozen = model.eval(), freeze(model)  # what predict runs on this CPU
        release_freed_memory()

        def step() -> object:
            with torch.inference_mode():
                return frozen(x)

        def flops_of() -> object:
            with torch.inference_mode():
                return eager(x)
    elif spec["task"] == "forward":
        model.eval()

        def step() -> object:
            with torch.inference_mode(), precision_ctx(bf16):
                return model(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> object:
            opt.zero_grad(set_to_none=True)
            with precision_ctx(bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), target)
            loss.backward()
            opt.step()
            return loss

    result = measure(step, spec, flops_of)
    result.update(params=sum(p.numel() for p in model.parameters()), items=shape[0])
    return result


# --- tiling ------------------------------------------------------------------------------
def tiling_case(spec: dict) -> dict:
    import unetkit
    from unetkit import runtime
    from unetkit.inference import TileOptions
    from unetkit.inference.grid import TileGrid
    from unetkit.inference.tiling import predict_tiled

    dims = 3 if spec["group"] == "tiling3d" else 2
    if dims == 2:
        size, tile, channels = (
            (256, 64, (4, 8)) if spec["quick"] else (4096, 256, (16, 32, 64, 128))
        )
    else:
        size, tile, channels = (32, 16, (4, 8)) if spec["quick"] else (512, 128, (8, 16, 32, 64))
    torch.manual_seed(0)
    model = unetkit.create_model("unet", dims=dims, channels=channels, norm="batch").eval()
    image = torch.rand(1, *(size,) * dims)
    bf16 = spec["precision"] == "bf16"
    overlap, batch = 0.25, 4
    if spec["lib"] == "unetkit":
        precision = "bf16" if bf16 else "fp32"
        reduce = "argmax" if spec["variant"] == "banded" else None

        def run(img: torch.Tensor) -> torch.Tensor:
            with runtime.prepared(model, precision) as runner:
                options = TileOptions(tile=tile, overlap=overlap, batch_size=batch)
                y = predict_tiled(model, img, options, runner=runner, reduce=reduce)
            return y if reduce else y.argmax(0).to(torch.uint8)

        windows = len(TileGrid.sliding((size,) * dims, (tile,) * dims, overlap))
    else:
        from monai.inferers import sliding_window_inference

        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        if bf16:
            model = model.to(memory_format=fmt)

        def predictor(x: torch.Tensor) -> torch.Tensor:
            if bf16:
                x = x.contiguous(memory_format=fmt)
            with precision_ctx(bf16):
                return torch.softmax(model(x).float(), dim=1)

        def run(img: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                y = sliding_window_inference(
                    img[None], tile, batch, predictor, overlap=overlap, mode="gaussian",
                    sigma_scale=0.125,
                )  # fmt: skip
                return y[0].argmax(0).to(torch.uint8)

        interval = int(tile * (1 - overlap))
        windows = (math.ceil((size - tile) / interval) + 1) ** dims
    small = image[(slice(None), *(slice(0, 2 * tile),) * dims)]
    run(small)  # warm-up on a crop: allocator and oneDNN kernels ready, little memory kept
    spec = dict(spec, warmup=0, count_flops=False)
    result = measure(lambda: run(image), spec)
    with torch.inference_mode():
        one = perf.count_flops(lambda: model(image[(slice(None), *(slice(0, tile),) * dims)][None]))
    result.update(flops=one * windows, windows=windows, items=size**dims / 1e6)
    return result


# --- diffusion ---------------------------------------------------------------------------
def diffusers_config(quick: bool) -> dict:
    if quick:
        return dict(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
        )  # fmt: skip
    return dict(
        sample_size=32, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8,
    )  # fmt: skip


def diffusion_case(spec: dict) -> dict:
    from diffusers import UNet2DConditionModel

    config = diffusers_config(spec["quick"])
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config)
    if spec["lib"] == "unetkit":
        try:
            from unetkit.formats.diffusers import load_diffusers_unet
        except ImportError as exc:
            raise ImportError(f"unetkit diffusion model not available ({exc})") from exc
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            model = load_diffusers_unet(tmp)
    model.eval()
    batch, side = (1, 16) if spec["quick"] else (2, 32)
    sample = torch.randn(batch, 4, side, side)
    context = torch.randn(batch, 8 if spec["quick"] else 77, config["cross_attention_dim"])
    t = torch.full((batch,), 500, dtype=torch.long)
    bf16 = spec["precision"] == "bf16"
    eager, autocast = model, bf16
    if bf16 and spec["lib"] == "unetkit":  # what generate runs on this CPU
        from unetkit.runtime.fastpath import freeze

        model, autocast = freeze(model), False
        release_freed_memory()
    elif bf16:
        model = model.to(memory_format=torch.channels_last)
        sample = sample.contiguous(memory_format=torch.channels_last)
        if spec.get("variant") == "weights":  # diffusers' own way: torch_dtype=bfloat16
            model, autocast = model.to(torch.bfloat16), False
            sample, context = sample.to(torch.bfloat16), context.to(torch.bfloat16)

    def call(net: torch.nn.Module, ac: bool) -> object:
        with torch.inference_mode(), precision_ctx(ac):
            y = net(sample, t, encoder_hidden_states=context)
            return y.sample if hasattr(y, "sample") else y

    def flops_of() -> object:
        return call(eager, False)

    result = measure(lambda: call(model, autocast), spec, flops_of)
    result.update(params=sum(p.numel() for p in model.parameters()), items=batch)
    return result


# --- machine peaks -----------------------------------------------------------------------
def peaks_case(spec: dict) -> dict:
    """Best-of-N GFLOP/s of a big fp32 conv, a bf16 channels-last conv and a bf16 matmul."""
    n, c, s = (2, 64, 32) if spec["quick"] else (8, 128, 64)
    m = 512 if spec["quick"] else 2048
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
    x = torch.randn(n, c, s, s)
    conv_cl = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
    conv_cl = conv_cl.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(m, m, dtype=torch.bfloat16), torch.randn(m, m, dtype=torch.bfloat16)
    conv_flops = 2 * n * c * c * 9 * s * s

    def best(fn: Callable[[], object], flops: int) -> float:
        with torch.inference_mode():
            fn()
            times = []
            for _ in range(spec["repeats"] + 2):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return flops / min(times) / 1e9

    def conv_bf16() -> object:
        with precision_ctx(True):
            return conv_cl(x_cl)

    return dict(
        fp32_conv=best(lambda: conv(x), conv_flops),
        bf16_conv=best(conv_bf16, conv_flops),
        bf16_matmul=best(lambda: a @ b, 2 * m**3),
    )


def main() -> None:
    spec = json.loads(sys.argv[1])
    perf.tune_allocator(spec["allocator"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    runner = {
        "peaks": peaks_case,
        "tiling": tiling_case,
        "tiling3d": tiling_case,
        "diffusion": diffusion_case,
    }.get(spec["group"], segmentation_case)
    try:
        result = dict(status="ok", **runner(spec))
    except ImportError as exc:
        result = dict(status="skipped", note=str(exc)[:300])
    except Exception as exc:  # report the failure in the table, keep the other cases
        traceback.print_exc()
        result = dict(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
    print("BENCH_RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
