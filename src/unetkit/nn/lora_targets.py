"""LoRA targets: which layers of a model a list of name patterns or a preset selects.

Targets are module-name patterns, so they work on every unetkit model (and on any
``nn.Module``, diffusers' ``UNet2DConditionModel`` included, whose names ours share):

- a glob on the full module name (``fnmatch``): ``"*.attn1.to_q"``, ``"down_blocks.*.conv1"``;
- a regular expression prefixed ``re:`` that must match the whole name:
  ``"re:.*attn[12]\\.to_[qkv]"``;
- a preset: ``"attn"`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``; ViT ``attn.qkv`` and
  ``attn.proj``),
  ``"attn+ff"`` (+ ``ff.net.0.proj``, ``ff.net.2``; ViT ``mlp.fc1`` / ``mlp.fc2``),
  ``"attn+ff+conv"`` (+ every ``nn.Conv1d/2d/3d``: ResNet ``conv1``/``conv2``, shortcuts,
  samplers, and all convs of the segmentation U-Nets).

Used by :func:`unetkit.nn.lora_inject.inject_lora` (which re-exports ``resolve_targets``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import torch.nn as nn

from unetkit.errors import ConfigError, did_you_mean
from unetkit.nn.lora import _CONVS, LoRALayer

__all__ = ["PRESETS", "base_layer_of", "resolve_targets", "wrappable_layers"]

_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "attn.qkv", "attn.proj")
_FF = ("ff.net.0.proj", "ff.net.2", "mlp.fc1", "mlp.fc2")
# preset -> (name suffixes, also every conv layer?)
PRESETS: dict[str, tuple[tuple[str, ...], bool]] = {
    "attn": (_ATTN, False),
    "attn+ff": (_ATTN + _FF, False),
    "attn+ff+conv": (_ATTN + _FF, True),
}


def wrappable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Wrappable layers by name: Linear/ConvNd and existing LoRA layers (not their insides)."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, LoRALayer):
            inside.append(name + ".")
            found[name] = m
        elif isinstance(m, (nn.Linear, *_CONVS)) and name:
            found[name] = m
    return found


def base_layer_of(m: nn.Module) -> nn.Module:
    """The layer a LoRA wrapper adapts (or ``m`` itself when it is no wrapper)."""
    return m.base_layer if isinstance(m, LoRALayer) else m


def _match_one(target: str, candidates: dict[str, nn.Module], model: nn.Module) -> list[str]:
    """Names matched by one target; a preset silently skips grouped convs it cannot adapt."""
    if target in PRESETS:
        suffixes, convs = PRESETS[target]
        return [
            n
            for n, m in candidates.items()
            if any(n == s or n.endswith("." + s) for s in suffixes)
            or (convs and isinstance(base_layer_of(m), _CONVS))
        ]
    if target.startswith("re:"):
        try:
            rx = re.compile(target[3:])
        except re.error as e:
            raise ConfigError(f"LoRA target {target!r}: invalid regular expression ({e})") from None
        hit = [n for n in candidates if rx.fullmatch(n)]
        others = [n for n, _ in model.named_modules() if n and rx.fullmatch(n)]
    else:
        hit = [n for n in candidates if fnmatch.fnmatchcase(n, target)]
        others = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, target)]
    if not hit and others:
        kinds = {type(m).__name__ for n, m in model.named_modules() if n in set(others[:20])}
        raise ConfigError(
            f"LoRA target {target!r} matches {others[:5]} (types {sorted(kinds)}), but LoRA "
            f"wraps only nn.Linear and nn.Conv1d/2d/3d; target their layers, e.g. "
            f"{others[0] + '.*'!r}"
        )
    return hit


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the layers (in model order) that ``targets`` select; errors name what exists.

    Raises:
        ConfigError: a target matches nothing (the message lists available layer names and
            the presets), or matches only modules LoRA cannot wrap.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ConfigError(f"LoRA targets is empty; give patterns or a preset {sorted(PRESETS)}")
    candidates = wrappable_layers(model)
    chosen: set[str] = set()
    for t in targets:
        hit = _match_one(t, candidates, model)
        if not hit:
            names = list(candidates)
            sample = names[:8] + (["..."] if len(names) > 8 else [])
            what = (
                f"preset {t!r} (names ending in {', '.join(PRESETS[t][0])})"
                if t in PRESETS
                else f"{t!r}{did_you_mean(t, list(PRESETS) + names)}"
            )
            raise ConfigError(
                f"LoRA target {what} matches no nn.Linear/nn.ConvNd layer of "
                f"{type(model).__name__}. Layers available ({len(names)}): "
                f"{', '.join(sample)}. Use globs ('*.to_q'), 're:<regex>' or a preset "
                f"{sorted(PRESETS)}"
            )
        chosen.update(hit)
    return [n for n in candidates if n in chosen]
