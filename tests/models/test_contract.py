"""One contract for every registered segmentation model, at each supported ``dims``.

A new family registered with ``@register_model`` gets these checks for free: forward and
backward at odd sizes, output size vs the size planner, save→load identity, determinism.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unetkit
from unetkit import registry

CASES = [
    (name, dims, padding)
    for name in registry.list_models(task="segmentation")
    for dims in registry.get_entry(name).dims
    for padding in (
        ("same", "valid")
        if "padding" in registry.get_entry(name).test_overrides or name == "unet"
        else ("same",)
    )
]
ODD = {1: (29,), 2: (19, 23), 3: (9, 11, 7)}


def _tiny(name: str, dims: int, padding: str) -> torch.nn.Module:
    overrides = dict(registry.get_entry(name).test_overrides)
    overrides.update(dims=dims, in_channels=2, out_channels=3)
    if padding == "valid":
        overrides["padding"] = "valid"
    return unetkit.create_model(name, **overrides)


@pytest.mark.parametrize(("name", "dims", "padding"), CASES)
def test_forward_backward_odd_sizes(name: str, dims: int, padding: str) -> None:
    model = _tiny(name, dims, padding)
    size = ODD[dims]
    if padding == "valid":
        size = model.nearest_valid_input(tuple(s + 40 for s in size))
    x = torch.randn(2, 2, *size, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 3, *model.output_size_for(size))
    if padding == "same":
        assert y.shape[2:] == x.shape[2:]
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None


@pytest.mark.parametrize(("name", "dims", "padding"), CASES)
def test_save_load_identity(name: str, dims: int, padding: str, tmp_path: Path) -> None:
    model = _tiny(name, dims, padding).eval()
    for p in model.parameters():  # make non-trivial buffers/params
        p.data.normal_()
    path = unetkit.save(model, tmp_path / "m.safetensors")
    loaded = unetkit.load(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    size = (
        model.nearest_valid_input(ODD[dims])
        if padding == "same"
        else model.nearest_valid_input(tuple(s + 40 for s in ODD[dims]))
    )
    x = torch.randn(1, 2, *size)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "dims", "padding"), CASES[:: max(1, len(CASES) // 4)])
def test_deterministic_construction(name: str, dims: int, padding: str) -> None:
    torch.manual_seed(3)
    a = _tiny(name, dims, padding).state_dict()
    torch.manual_seed(3)
    b = _tiny(name, dims, padding).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_registry_lists_every_model_with_info() -> None:
    names = unetkit.list_models()
    assert "unet" in names
    for n in names:
        info = unetkit.model_info(n)
        assert info["parameters"] > 0 and info["description"]
