"""LoRA layers: low-rank adapters wrapped around an existing ``nn.Linear`` / ``nn.ConvNd``.

Implements LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): the
frozen layer ``W`` is augmented by ``scale · B A`` with ``A: in → r``, ``B: r → out``,
``scale = alpha / r`` (times a runtime multiplier). ``B`` starts at zero, so an injected
adapter leaves the model's output unchanged until trained. For convolutions ``A`` carries
the base kernel, stride, padding and dilation and ``B`` is a 1×1 conv (the "LoCon" layout).

Layout and key names follow PEFT: the wrapped layer is ``base_layer`` and each adapter owns
``lora_A[name]`` / ``lora_B[name]``, so a wrapped ``to_q`` holds ``to_q.lora_A.default.weight``
and adapter files hold ``to_q.lora_A.weight``. Several named adapters can live on one layer;
``active_adapters`` selects those applied in ``forward``.

Grouped convolutions use a block-diagonal factorisation: ``A`` and ``B`` are both grouped
with the base layer's ``groups``, so ``B A`` is itself a grouped kernel of the base weight's
shape and merging is exact (PEFT instead uses an ungrouped ``A``, which cannot be merged).
This needs ``r`` divisible by ``groups``.

Merging is explicit (``merge`` / ``unmerge``), never a side effect of ``.eval()``. The delta
is computed in float32 (or wider), and the weight seen before the first merge is kept, so
``unmerge`` restores it bit for bit whatever the dtype.

The injection helpers (``inject_lora``, ``merge_lora``, ``lora_state_dict``...) live in
``unetkit.nn.lora_inject``; which layers a target pattern selects, in ``unetkit.nn.lora_targets``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from unetkit.errors import ConfigError, did_you_mean
from unetkit.nn.init import zero_module

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRALayer(nn.Module):
    """Base of ``LoRALinear`` / ``LoRAConv``: adapter bookkeeping, forward, merge/unmerge.

    Subclasses build the ``A`` / ``B`` modules (``_make_pair``) and the dense weight delta
    (``_delta``); everything else is shared.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scales: dict[str, float] = {}  # runtime multiplier (set_scale), 1.0 by default
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # the base weight before the first merge; non-persistent: never in a state dict
        self.register_buffer("_unmerged_weight", None, persistent=False)

    # --- adapters -------------------------------------------------------------------------
    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_adapter(
        self, adapter_name: str, r: int, alpha: float | None = None, dropout: float = 0.0
    ) -> None:
        """Add (and activate) an adapter ``adapter_name`` of rank ``r``; B starts at zero."""
        if adapter_name in self.lora_A:
            raise ConfigError(
                f"adapter_name={adapter_name!r} already exists on this layer; pick a new name "
                f"or delete_adapter({adapter_name!r}) first"
            )
        if not isinstance(r, int) or r < 1:
            raise ConfigError(f"LoRA rank r={r!r} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"LoRA dropout={dropout!r} must be in [0, 1)")
        alpha = float(r if alpha is None else alpha)
        a, b = self._make_pair(r)
        weight = self.base_layer.weight
        a.to(device=weight.device, dtype=weight.dtype)
        b.to(device=weight.device, dtype=weight.dtype)
        # PEFT's A init (= torch's default Linear init): kaiming-uniform with a = sqrt(5)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        zero_module(b)
        self.lora_A[adapter_name] = a
        self.lora_B[adapter_name] = b
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[adapter_name], self.alpha[adapter_name] = r, alpha
        self.scales[adapter_name] = 1.0
        self.active_adapters.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (it must not be merged)."""
        self._check_names([adapter_name])
        if adapter_name in self.merged_adapters:
            raise ConfigError(f"adapter {adapter_name!r} is merged; call unmerge() first")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[adapter_name]
        for d in (self.r, self.alpha, self.scales):
            del d[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def _check_names(self, names: Sequence[str]) -> None:
        for n in names:
            if n not in self.lora_A:
                raise ConfigError(
                    f"unknown adapter {n!r}{did_you_mean(n, self.adapter_names)}; this layer "
                    f"holds {self.adapter_names}"
                )

    def set_active_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Choose the adapters applied in ``forward`` (merged ones stay in the weight)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        self.active_adapters = names

    def scaling(self, adapter_name: str) -> float:
        """Effective factor on ``B A x``: ``alpha / r`` times the runtime scale."""
        return self.alpha[adapter_name] / self.r[adapter_name] * self.scales[adapter_name]

    def set_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """Set the runtime multiplier of one adapter (default: every adapter on the layer)."""
        names = self.adapter_names if adapter_name is None else [adapter_name]
        self._check_names(names)
        for n in names:
            if n in self.merged_adapters:
                raise ConfigError(
                    f"adapter {n!r} is merged into the weight; unmerge() before changing its scale"
                )
            self.scales[n] = float(scale)

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) for Linear, (B, in, *spatial) for ConvNd; out has the base layer's shape
        out = self.base_layer(x)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue  # already inside base_layer.weight
            a, b = self.lora_A[name], self.lora_B[name]
            h = b(a(self.lora_dropout[name](x.to(a.weight.dtype))))
            out = out + (h * self.scaling(name)).to(out.dtype)
        return out

    # --- merging ----------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scale · B A`` as a dense tensor shaped like the base weight, in float32 or wider."""
        self._check_names([adapter_name])
        wdtype = torch.promote_types(self.base_layer.weight.dtype, torch.float32)
        a = self.lora_A[adapter_name].weight.detach().to(wdtype)
        b = self.lora_B[adapter_name].weight.detach().to(wdtype)
        return self._delta(a, b) * self.scaling(adapter_name)

    @torch.no_grad()
    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Add the adapters' deltas (default: the active ones) into the base weight."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        self._check_names(names)
        todo = [n for n in names if n not in self.merged_adapters]
        if len(todo) < len(names):
            log.warning("adapters %s are already merged; skipped", sorted(set(names) - set(todo)))
        if not todo:
            return
        self.check_mergeable()
        w = self.base_layer.weight
        if self._unmerged_weight is None:
            self._unmerged_weight = w.detach().clone()
        total = sum(self.delta_weight(n) for n in todo)
        w.copy_((w.to(total.dtype) + total).to(w.dtype))
        self.merged_adapters.extend(todo)

    def check_mergeable(self) -> None:
        """Raise if the base weight is computed (a parametrization such as weight
        standardization): ``f(W) + ΔW`` has no ``W'`` with ``f(W') = f(W) + ΔW`` in general."""
        if parametrize.is_parametrized(self.base_layer, "weight"):
            raise ConfigError(
                f"cannot merge LoRA into {type(self.base_layer).__name__}: its weight is "
                f"parametrized (e.g. weight standardization); keep the adapter unmerged "
                f"(forward applies it exactly)"
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first ``merge``."""
        if self._unmerged_weight is not None:
            self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapters = []

    def merged_base_layer(self) -> nn.Module:
        """The base layer with the active adapters merged in, for ``merge_and_unload``."""
        self.merge()
        self._unmerged_weight = None  # the caller keeps the merged layer for good
        return self.base_layer

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, alpha={self.alpha[n]:g}" for n in self.adapter_names]
        return "; ".join(parts) + (
            f"; merged={self.merged_adapters}" if self.merged_adapters else ""
        )


class LoRALinear(LoRALayer):
    """LoRA around an ``nn.Linear``: ``y = W x + b + (alpha / r) · B(A(dropout(x)))``.

    Args:
        base_layer: the ``nn.Linear`` to adapt (its parameters are frozen).
        r: rank of the update.
        alpha: scaling numerator, default ``r`` (scale 1).
        dropout: dropout on the adapter's input.
        adapter_name: name of this first adapter (more can be added with ``add_adapter``).

    Example:
        >>> layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        *,
        adapter_name: str = "default",
    ) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.add_adapter(adapter_name, r, alpha, dropout)

    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        return nn.Linear(base.in_features, r, bias=False), nn.Linear(
            r, base.out_features, bias=False
        )

    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b @ a  # (out, r) @ (r, in) -> (out, in)


class LoRAConv(LoRALayer):
    """LoRA around an ``nn.Conv1d/2d/3d`` (LoCon): ``A`` = conv with the base kernel, stride,
    padding, dilation and groups (in → r); ``B`` = grouped 1×1 conv (r → out).

    With ``groups = g`` both factors are grouped, so the update ``B A`` is block-diagonal
    exactly like the base kernel and ``merge`` is exact; ``r`` must be a multiple of ``g``.

    Args:
        base_layer: the conv to adapt (its parameters are frozen).
        r: rank of the update (a multiple of ``base_layer.groups``).
        alpha: scaling numerator, default ``r``.
        dropout: dropout on the adapter's input.
        adapter_name: name of this first adapter.

    Example:
        >>> layer = LoRAConv(nn.Conv2d(8, 8, 3, padding=1, groups=2), r=4)
        >>> layer(torch.randn(1, 8, 5, 5)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(
        self,
        base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
        r: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        *,
        adapter_name: str = "default",
    ) -> None:
        if not isinstance(base_layer, _CONVS):
            raise ConfigError(
                f"LoRAConv wraps nn.Conv1d/Conv2d/Conv3d, got {type(base_layer).__name__}"
            )
        super().__init__(base_layer)
        self.add_adapter(adapter_name, r, alpha, dropout)

    def _make_pair(self, r: int) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        g = base.groups
        if r % g:
            raise ConfigError(
                f"LoRA rank r={r} on a conv with groups={g}: r must be a multiple of groups "
                f"(the update is block-diagonal per group); use r={g * max(1, round(r / g))}"
            )
        conv = type(base)
        a = conv(
            base.in_channels,
            r,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=g,
            bias=False,
            padding_mode=base.padding_mode,
        )
        b = conv(r, base.out_channels, 1, groups=g, bias=False)
        return a, b

    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a: (r, in/g, *k), b: (out, r/g, 1...) -> per group j: B_j (out/g, r/g) @ A_j (r/g, in/g·K)
        g = self.base_layer.groups
        out_ch, r = b.shape[0], a.shape[0]
        a_g = a.reshape(g, r // g, -1)
        b_g = b.reshape(g, out_ch // g, r // g)
        return torch.bmm(b_g, a_g).reshape(self.base_layer.weight.shape)


def wrap_layer(
    layer: nn.Module,
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    *,
    adapter_name: str = "default",
) -> LoRALayer:
    """Wrap an ``nn.Linear`` or ``nn.ConvNd`` in the matching LoRA layer."""
    if isinstance(layer, nn.Linear):
        return LoRALinear(layer, r, alpha, dropout, adapter_name=adapter_name)
    if isinstance(layer, _CONVS):
        return LoRAConv(layer, r, alpha, dropout, adapter_name=adapter_name)
    raise ConfigError(
        f"LoRA wraps nn.Linear and nn.Conv1d/2d/3d; got {type(layer).__name__} "
        f"(target one of its Linear/Conv sub-layers instead)"
    )


__all__ = ["LoRALayer", "LoRALinear", "LoRAConv", "wrap_layer"]
