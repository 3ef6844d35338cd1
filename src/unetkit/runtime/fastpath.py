"""The inference fast path: a frozen low-precision copy of a model, prepared once.

bf16 autocast re-does two things on every call that inference only needs once: it casts
each float32 weight to bf16, and oneDNN reorders each weight into the blocked layout its
AMX/AVX-512 kernels read. For the small feature maps of a diffusion U-Net (4x4 to 32x32)
that per-call work costs as much as the convolution itself (prepacked bf16 convs ran
2-3x faster on a 2-core Xeon; see benchmarks/). ``freeze`` does it ahead of time:

* LoRA adapters are merged into their base weights;
* BatchNorm (with its running statistics) is folded into the convolution before it, and a
  following ReLU / SiLU / GELU / LeakyReLU / sigmoid runs as a oneDNN post-op of that conv;
* weights are cast to the compute dtype; normalisation layers keep float32 affine
  parameters (they accumulate in float32 either way);
* on CPUs, conv (1-D to 3-D) and linear weights are reordered once into oneDNN's layout
  (``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise``: the kernels that
  ``torch.compile``'s CPU freezing emits) and activations run channels-last;
* the diffusion U-Net's residual and transformer blocks become fused versions
  (``fused_blocks``: residual adds, GEGLU and q/k/v projections folded into fewer kernels).

The result is a new, inference-only module (``FrozenModel``); the original is untouched.
It casts its first input to the compute dtype and floating outputs back to float32, so a
caller sees float32 in and out. ``frozen_for`` caches one frozen copy per model and makes a
new one when the model's weights change (an optimizer step, an EMA swap).
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from unetkit.errors import ConfigError
from unetkit.nn.lora import LoRALayer
from unetkit.nn.lora_inject import merge_and_unload
from unetkit.runtime.fused_blocks import fuse_blocks, replace_modules
from unetkit.runtime.kernels import (
    FusedConvAct,
    PackedConv,
    PackedLinear,
    PairMaxPool,
    is_pair_pool,
    packing_available,
    post_op,
)
from unetkit.runtime.precision import fast_memory_format, model_device, resolve_precision

logger = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- graph rewrites on the copy ----------------------------------------------------------
@torch.no_grad()
def fold_batchnorm(conv: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the conv before it, in place (float64 arithmetic):
    ``w' = w·γ/σ``, ``b' = (b − μ)·γ/σ + β`` with ``σ = sqrt(var + eps)``."""
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight.copy_((conv.weight.double() * scale.view(shape)).to(conv.weight.dtype))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _CONVS)
        and isinstance(bn, _BATCHNORMS)
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
        and not parametrize.is_parametrized(conv)
    )


def _fold_sequentials(model: nn.Module) -> int:
    """In every ``nn.Sequential`` (ConvNormAct, user stacks): conv -> BatchNorm becomes one
    conv; conv (-> BatchNorm) -> fusable activation is marked for a fused post-op."""
    folded = 0
    plain = [m for m in model.modules() if type(m).forward is nn.Sequential.forward]
    for seq in plain:  # subclasses with their own forward may not chain their children
        keys = list(seq._modules)
        i = 0
        while i < len(keys):
            conv = seq._modules[keys[i]]
            j = i + 1
            if j < len(keys) and _foldable(conv, seq._modules[keys[j]]):
                fold_batchnorm(conv, seq._modules[keys[j]])
                seq._modules[keys[j]] = nn.Identity()
                folded += 1
                j += 1
            while j < len(keys) and isinstance(seq._modules[keys[j]], nn.Identity):
                j += 1  # skip the Identity a folded norm (or norm="none") leaves
            if isinstance(conv, _CONVS) and j < len(keys):
                act = seq._modules[keys[j]]
                if post_op(act) is not None and not isinstance(act, nn.Identity):
                    conv._unetkit_post_op = act  # picked up when the conv is replaced
                    seq._modules[keys[j]] = nn.Identity()
            i = j
    return folded


def _merge_lora(model: nn.Module) -> nn.Module:
    layers = [m for m in model.modules() if isinstance(m, LoRALayer)]
    if layers and all(not parametrize.is_parametrized(m.base_layer) for m in layers):
        model = merge_and_unload(model)
    return model


def weight_dtype(module: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype the frozen copy keeps ``module``'s floating weights in: ``dtype``, except
    normalisation layers, which keep float32 affine parameters (they accumulate in float32
    either way, and the CPU kernels take bf16 inputs with float32 weights)."""
    return torch.float32 if isinstance(module, _NORMS) else dtype


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s floating parameters and buffers in place to the dtypes the frozen
    copy keeps them in (``weight_dtype``), one tensor at a time, so the float32 weights are
    released as they go; returns ``model``. ``freeze`` on the result makes the same frozen
    copy as on the float32 model (without LoRA adapters or BatchNorm, which are merged and
    folded in float32 first), from half the memory.

    Args:
        model: any module; its parameters come out with ``requires_grad=False``.
        dtype: the compute dtype (``torch.bfloat16`` for the CPU fast path).
    """
    for m in model.modules():
        to = weight_dtype(m, dtype)
        for name, p in m.named_parameters(recurse=False):
            if p.is_floating_point():
                setattr(m, name, nn.Parameter(p.detach().to(to), requires_grad=False))
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                m._buffers[name] = b.to(to)
    return model


def _copy_cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``copy.deepcopy(model)`` with each weight cast to ``dtype`` as it is copied, so the
    copy never holds a float32 version of them (an SD U-Net: 1.7 GB instead of 3.4 GB on
    top of the original). Weights that are merged or folded in float32 first (inside LoRA
    layers; every conv of a model with BatchNorm) and normalisation layers are copied as
    they are; ``cast_weights`` handles them after the merge and the folding."""
    if dtype == torch.float32:
        return copy.deepcopy(model)
    has_bn = any(isinstance(m, _BATCHNORMS) for m in model.modules())
    keep: set[int] = set()
    for m in model.modules():
        if isinstance(m, LoRALayer):
            keep.update(id(p) for p in m.parameters())
        elif weight_dtype(m, dtype) != dtype or (has_bn and isinstance(m, _CONVS)):
            keep.update(id(p) for p in m.parameters(recurse=False))
    memo: dict[int, Any] = {
        id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for p in model.parameters()
        if p.is_floating_point() and p.dtype != dtype and id(p) not in keep
    }
    return copy.deepcopy(model, memo)


def _replace(model: nn.Module, pack: bool) -> int:
    """Swap convs and linears for packed (or plain fused) modules; returns how many."""

    def fast(child: nn.Module) -> nn.Module | None:
        act = getattr(child, "_unetkit_post_op", None)
        if pack and _packable(child):
            if isinstance(child, nn.Linear):
                return PackedLinear.of(child)
            return PackedConv(child, post_op(act or nn.Identity()))
        if act is not None:
            return FusedConvAct(child, act)
        if pack and is_pair_pool(child):
            return PairMaxPool(2 if isinstance(child, nn.MaxPool2d) else 3)
        return None

    return replace_modules(model, fast)


def _packable(m: nn.Module) -> bool:
    if parametrize.is_parametrized(m):
        return False
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, _CONVS) and m.padding_mode == "zeros" and not isinstance(m.padding, str)


# --- the frozen model --------------------------------------------------------------------
class FrozenModel(nn.Module):
    """An inference-only, pre-optimised copy of a model (see the module docstring).

    Call it like the original: the first argument (image or noisy sample) is cast to the
    compute dtype and channels-last; the model casts the rest itself (a diffusion U-Net
    embeds float timesteps in float32); floating outputs come back as float32. Attributes
    the engines ask for (``dims``, size planner, ``config``) come from the original.

    Example:
        >>> net = unetkit.create_model("unet", channels=(8, 16), norm="batch").eval()
        >>> fast = freeze(net)
        >>> fast(torch.rand(1, 1, 32, 32)).dtype
        torch.float32
    """

    def __init__(self, inner: nn.Module, dtype: torch.dtype, fmt: Any) -> None:
        super().__init__()
        self.inner = inner
        self.dtype, self.memory_format = dtype, fmt
        super().train(False)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the copy keeps the original's attributes and methods
            return getattr(self._modules["inner"], name)

    def train(self, mode: bool = True) -> FrozenModel:
        if mode:
            raise ConfigError("a frozen model is for inference only; train the original model")
        return super().train(False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and x.requires_grad:
            raise ConfigError(
                "a frozen model computes no gradients; call the original model to backpropagate"
            )
        x = x.to(self.dtype)
        if self.memory_format is not None and x.dim() in (4, 5):
            x = x.contiguous(memory_format=self.memory_format)
        with torch.no_grad():
            return _to_float(self.inner(x, *args, **kwargs))


def _to_float(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple | list):
        return type(out)(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


def freeze(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, *, pack: bool | None = None
) -> FrozenModel:
    """A frozen inference copy of ``model`` computing in ``dtype``.

    Args:
        model: any module (a segmentation or diffusion U-Net, with or without LoRA).
        dtype: compute dtype, ``torch.bfloat16`` (the CPU fast path) or ``torch.float32``
            (BatchNorm folding and fused activations only).
        pack: prepack weights for oneDNN; None: where this CPU and torch build support it.

    Returns:
        A ``FrozenModel`` in eval mode; ``model`` itself is not changed.

    Example:
        >>> fast = freeze(unetkit.create_model("diffusion-unet", preset="tiny"))
        >>> fast(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 3, 32)).shape
        torch.Size([1, 4, 16, 16])
    """
    if dtype not in (torch.bfloat16, torch.float32):
        raise ConfigError(f"freeze: dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    on_cpu = model_device(model).type == "cpu"
    pack = packing_available(dtype) and on_cpu if pack is None else pack
    if pack and not packing_available(dtype):
        raise ConfigError(f"weight prepacking for {dtype} is not available in this torch build")
    inner = _merge_lora(_copy_cast(model, dtype)).eval().requires_grad_(False)
    folded = _fold_sequentials(inner)
    if dtype != torch.float32:
        cast_weights(inner, dtype)
    if pack:
        fuse_blocks(inner, PackedConv)
    swapped = _replace(inner, pack)
    fmt = fast_memory_format(inner) if dtype != torch.float32 else None
    if fmt is not None:
        inner = inner.to(memory_format=fmt)
    logger.debug("froze %s: %d BatchNorms folded, %d layers swapped (packed=%s)",
                 type(model).__name__, folded, swapped, pack)  # fmt: skip
    return FrozenModel(inner, dtype, fmt)


# --- one frozen copy per model, renewed when its weights change --------------------------
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, FrozenModel]] = weakref.WeakKeyDictionary()


def _weights_signature(model: nn.Module, dtype: torch.dtype) -> tuple:
    # in-place updates bump a tensor's version; reassignments change its storage
    state = [(t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values()]
    return dtype, tuple(state)


def frozen_for(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> FrozenModel:
    """``freeze(model, dtype)``, cached while the model's weights stay the same."""
    sig = _weights_signature(model, dtype)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    frozen = freeze(model, dtype)
    _CACHE[model] = (sig, frozen)
    return frozen


def frozen_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype ``runtime.prepared(model, precision)`` freezes an eager module on
    ``device`` to, or None where it runs no frozen copy. A loader that knows its model
    will only run at ``precision`` stores the weights in it (``cast_weights``), so the
    float32 weights need not stay in memory next to the frozen copy.

    Example:
        >>> frozen_dtype("fp32") is None
        True
    """
    device = torch.device(device)
    dtype = resolve_precision(precision, device)
    ok = dtype == torch.bfloat16 and device.type == "cpu" and packing_available(dtype)
    return dtype if ok else None


def can_freeze(model: Any, dtype: torch.dtype | None) -> bool:
    """Whether the fast path runs a frozen copy of ``model`` for ``dtype``: bf16 on a CPU
    whose oneDNN has bf16 kernels, for an eager module with weights (not a compiled or
    onnxruntime wrapper, which set ``freezable = False`` or have no parameters)."""
    return (
        dtype == torch.bfloat16
        and isinstance(model, nn.Module)
        and not isinstance(model, FrozenModel)
        and getattr(model, "freezable", True)
        and next(iter(model.parameters()), None) is not None
        and model_device(model).type == "cpu"
        and packing_available(dtype)
    )


__all__ = [
    "FrozenModel",
    "PackedConv",
    "PackedLinear",
    "fold_batchnorm",
    "can_freeze",
    "cast_weights",
    "freeze",
    "frozen_dtype",
    "frozen_for",
    "packing_available",
    "weight_dtype",
]
