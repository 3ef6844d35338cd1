"""The frozen copy without a second float32 copy: weights cast while copying, blocks
released as they are swapped, the source not pinned; the result identical to casting a
full float32 copy afterwards (the previous way)."""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import unetkit
from unetkit.nn.lora_inject import inject_lora
from unetkit.runtime import fastpath

packed_only = pytest.mark.skipif(
    not fastpath.packing_available(torch.bfloat16), reason="no oneDNN bf16 kernels here"
)


def _random(net: nn.Module) -> nn.Module:
    """Every weight non-trivial: zero-initialised outputs, LoRA B and fresh BatchNorm
    statistics would let a wrong cast or merge order go unseen."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (p if p.ndim == 1 else 0))
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def _diffusion(lora: bool) -> tuple[nn.Module, tuple]:
    net = unetkit.create_model("diffusion-unet", preset="tiny")
    if lora:
        inject_lora(net, targets="attn", r=4)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    return _random(net), (x, torch.tensor([10.0, 777.5]), ctx)


def _batchnorm_unet() -> tuple[nn.Module, tuple]:
    net = unetkit.create_model("unet", channels=(8, 16), norm="batch")
    return _random(net), (torch.rand(1, 1, 32, 32),)


CASES = {
    "diffusion": lambda: _diffusion(False),
    "diffusion+lora": lambda: _diffusion(True),
    "batchnorm-unet": _batchnorm_unet,
}


@packed_only
@pytest.mark.parametrize("case", sorted(CASES))
def test_casting_while_copying_gives_the_same_frozen_copy(case: str, monkeypatch) -> None:
    net, inputs = CASES[case]()
    with torch.no_grad():
        fast = fastpath.freeze(net)(*inputs)
        # the previous way: a full float32 copy, merged, folded and cast afterwards
        monkeypatch.setattr(fastpath, "_copy_cast", lambda model, dtype: copy.deepcopy(model))
        before = fastpath.freeze(net)(*inputs)
    assert torch.equal(fast, before)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the source is untouched


@packed_only
def test_weights_stored_for_the_fast_path_freeze_to_the_same_copy() -> None:
    net, inputs = _diffusion(False)
    stored = fastpath.cast_weights(copy.deepcopy(net), torch.bfloat16)
    dtypes = {n: p.dtype for n, p in stored.named_parameters()}
    assert {dtypes[n] for n in dtypes if ".norm" in n or n.startswith("conv_norm")} == {
        torch.float32
    }
    assert dtypes["conv_in.weight"] == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(fastpath.freeze(stored)(*inputs), fastpath.freeze(net)(*inputs))


def test_the_frozen_copy_does_not_pin_its_source() -> None:
    net, _ = _diffusion(False)
    frozen = fastpath.frozen_for(net)
    source = weakref.ref(net)
    del net
    gc.collect()
    assert source() is None  # the cache holds it weakly and the copy has no path to it
    assert isinstance(frozen, fastpath.FrozenModel)


def test_frozen_dtype_is_what_prepared_freezes_to() -> None:
    assert fastpath.frozen_dtype("fp32") is None
    packs = fastpath.packing_available(torch.bfloat16)
    assert fastpath.frozen_dtype("bf16") == (torch.bfloat16 if packs else None)
    net = unetkit.create_model("unet", channels=(4, 8))
    with unetkit.runtime.prepared(net, "bf16") as runner:
        assert runner.frozen == (fastpath.frozen_dtype("bf16") is not None)


_PEAK = """
import ctypes, gc, json, torch, unetkit
from unetkit.runtime import fastpath
# count what is allocated, not huge pages the kernel had free (PR_SET_THP_DISABLE = 41)
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)

def status(key):  # kB -> bytes; VmHWM is this process's own peak (ru_maxrss is inherited)
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024

torch.manual_seed(0)
net = unetkit.create_model("diffusion-unet", preset="tiny", channels=(192, 384),
                           cross_attention_dim=384).eval()
weights = sum(p.numel() * 4 for p in net.parameters())
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
before = status("VmRSS")
frozen = fastpath.freeze(net)
print(json.dumps({"weights": weights, "extra": status("VmHWM") - before}))
"""


@packed_only
@pytest.mark.skipif(not Path("/proc/self/clear_refs").is_file(), reason="needs Linux /proc")
def test_freezing_needs_about_the_bf16_copy_not_a_float32_one() -> None:
    """Peak memory of ``freeze`` on a float32 model, in a fresh process: the bf16 copy (half
    the float32 weights) plus one block, where a float32 copy cast afterwards needed the
    float32 weights again (1x-1.5x)."""
    # large blocks mapped and unmapped one by one: the peak is what was alive, not what
    # the allocator kept
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", _PEAK],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=env,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["weights"] > 100e6  # big enough for the allocator's noise not to matter
    assert got["extra"] < 0.8 * got["weights"], got
