"""LoRA injection: wrap named layers of any model, freeze the rest, read/write adapter weights.

Targets (name patterns and presets) are resolved by :mod:`unetkit.nn.lora_targets`.

Adapter state dicts use PEFT's file keys: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from unetkit.errors import CheckpointError, ConfigError
from unetkit.nn.lora import LoRALayer, wrap_layer
from unetkit.nn.lora_targets import PRESETS, base_layer_of, resolve_targets, wrappable_layers

log = logging.getLogger(__name__)

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, LoRALayer]:
    """The LoRA layers of ``model`` by module name (those holding ``adapter_name`` if given)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LoRALayer) and (adapter_name is None or adapter_name in m.lora_A)
    }


def inject_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    r: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> list[str]:
    """Wrap the layers named by ``targets`` in LoRA adapters and freeze everything else.

    A layer already wrapped gets ``adapter_name`` added beside its other adapters. Only the
    new adapter's ``lora_A`` / ``lora_B`` stay trainable. A preset skips grouped convs whose
    ``groups`` does not divide ``r`` (logged); an explicit pattern on one raises.

    Args:
        model: any ``nn.Module`` (modified in place).
        targets: globs on module names, ``"re:<regex>"`` patterns, or preset names
            (``"attn"``, ``"attn+ff"``, ``"attn+ff+conv"``).
        r: rank. alpha: scaling numerator (default ``r``, i.e. scale 1). dropout: on the
            adapter input. adapter_name: the adapter's key in each layer.

    Returns:
        The wrapped module names, in model order.

    Example:
        >>> net = unetkit.create_model("diffusion-unet", preset="tiny")   # doctest: +SKIP
        >>> inject_lora(net, "attn", r=4)[:1]                              # doctest: +SKIP
        ['down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q']
    """
    names = resolve_targets(model, targets)
    from_preset = all(t in PRESETS for t in ([targets] if isinstance(targets, str) else targets))
    todo: list[str] = []
    for name in names:  # check everything before the model is touched
        m = model.get_submodule(name)
        groups = getattr(base_layer_of(m), "groups", 1)
        if r % groups and from_preset:
            log.info("LoRA: skipping %s (groups=%d does not divide r=%d)", name, groups, r)
            continue
        if r % groups:
            raise ConfigError(
                f"LoRA target {name} is a conv with groups={groups}: r={r} must be a multiple "
                f"of it (e.g. r={groups * max(1, round(r / groups))}), or exclude that layer"
            )
        if isinstance(m, LoRALayer) and adapter_name in m.lora_A:
            raise ConfigError(
                f"{name} already holds adapter {adapter_name!r}; inject under another "
                f"adapter_name or target other layers"
            )
        todo.append(name)
    wrapped: list[str] = []
    for name in todo:
        m = model.get_submodule(name)
        if isinstance(m, LoRALayer):
            m.add_adapter(adapter_name, r, alpha, dropout)
        else:
            _set_submodule(model, name, wrap_layer(m, r, alpha, dropout, adapter_name=adapter_name))
        wrapped.append(name)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model, adapter_name).values():
        for p in (
            *layer.lora_A[adapter_name].parameters(),
            *layer.lora_B[adapter_name].parameters(),
        ):
            p.requires_grad_(True)
    log.info("LoRA %r: wrapped %d layers (r=%d)", adapter_name, len(wrapped), r)
    return wrapped


def trainable_summary(model: nn.Module) -> tuple[int, int, float]:
    """``(trainable parameters, total parameters, trainable fraction)``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, trainable / total if total else 0.0


def _layers_or_error(model: nn.Module, adapter_name: str | None) -> dict[str, LoRALayer]:
    layers = lora_layers(model, adapter_name)
    if not layers:
        held = sorted({a for m in lora_layers(model).values() for a in m.adapter_names})
        what = "no LoRA layers" if not held else f"adapters {held}"
        raise ConfigError(
            f"model holds no LoRA adapter {adapter_name!r} ({what}); "
            f"inject_lora or load an adapter first"
        )
    return layers


def _check_mergeable(layers: Mapping[str, LoRALayer]) -> None:
    """All or nothing: refuse before any layer is merged, naming the layer."""
    for name, layer in layers.items():
        try:
            layer.check_mergeable()
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None


def merge_lora(model: nn.Module, adapter_names: Sequence[str] | None = None) -> int:
    """Merge adapters (default: each layer's active ones) into the base weights; returns #layers."""
    layers = _layers_or_error(model, None)
    _check_mergeable(layers)
    for layer in layers.values():
        names = None if adapter_names is None else [a for a in adapter_names if a in layer.lora_A]
        layer.merge(names)
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Restore every LoRA layer's base weight exactly; returns #layers."""
    layers = _layers_or_error(model, None)
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and replace each LoRA layer by its (merged) base layer.

    The result is a plain model (keys ``to_q.weight`` again) for saving or export. Returns
    ``model`` (modified in place); if ``model`` itself is a LoRA layer, its base layer.
    """
    if isinstance(model, LoRALayer):
        return model.merged_base_layer()
    layers = lora_layers(model)
    _check_mergeable(layers)
    for name, layer in layers.items():
        _set_submodule(model, name, layer.merged_base_layer())
    return model


def set_lora_scale(model: nn.Module, scale: float, adapter_name: str | None = None) -> None:
    """Set the runtime scale of ``adapter_name`` (default: all adapters) in every layer."""
    for layer in _layers_or_error(model, adapter_name).values():
        layer.set_scale(scale, adapter_name)


def set_active_adapters(model: nn.Module, adapter_names: str | Sequence[str]) -> None:
    """Activate exactly ``adapter_names`` in every LoRA layer (layers lacking one skip it)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    layers = lora_layers(model)
    for n in names:
        _layers_or_error(model, n)
    for layer in layers.values():
        layer.set_active_adapters([n for n in names if n in layer.lora_A])


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter weights in PEFT file keys: ``<module>.lora_A.weight``, ``<module>.lora_B.weight``."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in _layers_or_error(model, adapter_name).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().clone()
        out[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().clone()
    return out


def lora_metadata(model: nn.Module, adapter_name: str = "default") -> dict[str, dict[str, float]]:
    """``{module: {"r": r, "alpha": alpha}}`` for every layer holding ``adapter_name``."""
    return {
        n: {"r": m.r[adapter_name], "alpha": m.alpha[adapter_name]}
        for n, m in _layers_or_error(model, adapter_name).items()
    }


def _group_keys(
    state: Mapping[str, torch.Tensor], source: str
) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    for k, v in state.items():
        m = _KEY.match(k)
        if m is None:
            bad.append(k)
        else:
            modules.setdefault(m["module"], {})[m["part"]] = v
    incomplete = [mod for mod, parts in modules.items() if set(parts) != {"A", "B"}]
    if bad or incomplete:
        raise CheckpointError(
            f"{source}: not an adapter state dict in PEFT layout ('<module>.lora_A.weight' + "
            f"'<module>.lora_B.weight'): unexpected keys {bad[:10]}, modules lacking A or B "
            f"{incomplete[:10]}. Convert other layouts with unetkit.formats.lora_files"
        )
    return modules


def load_lora_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    alphas: Mapping[str, float] | None = None,
    adapter_name: str = "default",
    strict: bool = True,
    source: str = "adapter",
) -> list[str]:
    """Inject ``adapter_name`` where ``state`` (PEFT file keys) says and load its weights.

    The rank of each module is read from its ``lora_A`` weight, alpha from ``alphas``
    (module → alpha; default alpha = rank, i.e. scale 1).

    Args:
        model: the model to adapt (modified in place).
        state: ``{module}.lora_A.weight`` / ``{module}.lora_B.weight`` tensors.
        alphas: per-module alpha. adapter_name: the name to load under.
        strict: if True any key naming no wrappable layer raises; if False such keys are
            logged and skipped (a state dict matching nothing still raises).
        source: file name for messages.

    Returns:
        The module names that received the adapter.

    Raises:
        CheckpointError: keys naming no layer (listed), shape mismatches, malformed keys.
    """
    modules = _group_keys(state, source)
    candidates = wrappable_layers(model)
    unmatched = [m for m in modules if m not in candidates]
    if unmatched:
        keys = [f"{m}.lora_{p}.weight" for m in unmatched[:8] for p in "AB"]
        more = f" and the keys of {len(unmatched) - 8} more modules" if len(unmatched) > 8 else ""
        msg = (
            f"{source}: {len(unmatched)} of {len(modules)} adapter modules match no "
            f"nn.Linear/ConvNd layer of {type(model).__name__}: {keys}{more}"
        )
        if len(unmatched) == len(modules):
            raise CheckpointError(msg + f"; the model's layers look like {list(candidates)[:5]}")
        if strict:
            raise CheckpointError(msg + "; pass strict=False to load the matching part")
        log.warning("%s (skipped: strict=False)", msg)
    alphas = dict(alphas or {})
    todo = [(n, parts) for n, parts in modules.items() if n not in unmatched]
    for name, parts in todo:  # check every shape before touching the model
        base = base_layer_of(candidates[name])
        if parts["A"].dim() and parts["A"].shape[0] % getattr(base, "groups", 1):
            raise CheckpointError(
                f"{source}: {name} has rank {parts['A'].shape[0]}, not a multiple of the conv's "
                f"groups={base.groups} (adapters from tools with another grouped-conv layout, "
                f"e.g. PEFT, cannot be loaded)"
            )
        want = _expected_shapes(base, parts["A"].shape[0] if parts["A"].dim() else 0)
        got = (tuple(parts["A"].shape), tuple(parts["B"].shape))
        if got != want:
            raise CheckpointError(
                f"{source}: {name}.lora_A/B.weight have shapes {got[0]} / {got[1]}; the layer "
                f"{base} needs {want[0]} / {want[1]} for rank {want[0][0]}"
            )
    for name, parts in todo:
        layer = model.get_submodule(name)
        r = parts["A"].shape[0]
        if isinstance(layer, LoRALayer):
            layer.add_adapter(adapter_name, r, alphas.get(name))
        else:
            layer = wrap_layer(layer, r, alphas.get(name), adapter_name=adapter_name)
            _set_submodule(model, name, layer)
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(parts["A"])
            layer.lora_B[adapter_name].weight.copy_(parts["B"])
    return [n for n, _ in todo]


def _expected_shapes(base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of lora_A / lora_B weights of rank ``r`` on ``base`` (see LoRALinear/LoRAConv)."""
    if isinstance(base, nn.Linear):
        return (r, base.in_features), (base.out_features, r)
    g, ones = base.groups, (1,) * len(base.kernel_size)
    return (r, base.in_channels // g, *base.kernel_size), (base.out_channels, r // g, *ones)
