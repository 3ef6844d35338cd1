"""unetkit.perf: allocator switch, peak-RSS measurement and FLOP counting."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from unetkit import perf
from unetkit.errors import ConfigError


def test_count_flops_matches_hand_count() -> None:
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.rand(2, 3, 8, 8)
    # 2 FLOPs per multiply-add: batch × out × in × kernel × output pixels
    assert perf.count_flops(lambda: conv(x)) == 2 * 2 * 5 * 3 * 9 * 64
    a, b = torch.rand(4, 6, requires_grad=True), torch.rand(6, 7)
    # forward a@b, backward grad_a = g @ b.T: both 2·4·6·7
    assert perf.count_flops(lambda: (a @ b).sum().backward()) == 2 * (2 * 4 * 6 * 7)


_PEAK_CHILD = """
import torch
from unetkit import perf
with perf.peak_memory() as mem:
    x = torch.ones(16 << 20)  # 64 MiB, allocated by torch outside Python's allocator
    del x
with perf.peak_memory() as small:  # the mark was reset: the old peak is not reported
    torch.ones(1 << 10)
print(mem["peak_bytes"], small["peak_bytes"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_peak_memory_sees_torch_allocations_and_resets() -> None:
    # a fresh process: in this one, earlier tests (and a tuned allocator) may have left
    # freed pages resident, which a new allocation reuses without raising the peak
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD], capture_output=True, text=True, check=True
    ).stdout.split()
    big, small = int(out[-2]), int(out[-1])
    assert big >= 60 << 20
    assert small < 16 << 20


def test_tune_allocator_modes() -> None:
    assert perf.tune_allocator("system") is False
    with pytest.raises(ConfigError, match="UNETKIT_ALLOCATOR='fast'.*'tuned'"):
        perf.tune_allocator("fast")
    # Applied in a child so this test process keeps glibc's defaults.
    code = "from unetkit import perf; print(perf.tune_allocator())"
    env = {"UNETKIT_ALLOCATOR": "tuned", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    expected = "True" if sys.platform.startswith("linux") else "False"
    assert out.stdout.strip() == expected, out.stderr
