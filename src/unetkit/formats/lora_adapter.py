"""``Adapter``: one LoRA adapter in canonical form, whatever file layout it came from.

Tensors use PEFT's file keys (``<module>.lora_A.weight`` / ``<module>.lora_B.weight``) and
alpha is stored per module (scale = alpha / rank). A file may also hold adapters for other
components of a Stable Diffusion pipeline (``text_encoder``, ``text_encoder_2``); those go
into ``Adapter.others`` by component name, with module names of that component.
The readers and writers of each layout live in ``lora_layouts`` (PEFT/diffusers, unetkit)
and ``lora_kohya`` (Kohya sd-scripts, LyCORIS LoCon).
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from unetkit.errors import CheckpointError

# pipeline components a LoRA file can address, besides the U-Net
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass
class Adapter:
    """One adapter in canonical form.

    Args:
        tensors: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` tensors (PEFT keys).
        alphas: alpha per module (scale = alpha / rank).
        info: JSON facts: ``targets``, ``base_model``, ``adapter_name`` (optional), and
            ``inference``: prediction settings the adapted model needs instead of its
            base's (e.g. a LoRA run's calibrated ``seed_threshold``; unetkit layout only).
        others: adapters of other pipeline components in the same file, by component
            (``"text_encoder"``, ``"text_encoder_2"``).
    """

    tensors: dict[str, torch.Tensor]
    alphas: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    others: dict[str, Adapter] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {
            k[: -len(".lora_A.weight")]: int(v.shape[0])
            for k, v in self.tensors.items()
            if k.endswith(".lora_A.weight")
        }

    @property
    def modules(self) -> list[str]:
        return list(self.ranks)


def meta_json(meta: Mapping[str, str] | None, key: str, default: Any, source: str) -> Any:
    """A JSON entry of a file's metadata; unreadable JSON is a CheckpointError."""
    raw = (meta or {}).get(key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: metadata {key!r} is not valid JSON ({e})") from None


def most_common(values: Sequence[Any], default: Any) -> Any:
    """The most frequent value (the file-wide default rank/alpha), ``default`` if none."""
    return collections.Counter(values).most_common(1)[0][0] if values else default


def peft_modules(tensors: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Module names of PEFT-keyed tensors; malformed or unpaired keys raise, listing them."""
    parts: dict[str, set[str]] = {}
    bad = []
    for k in tensors:
        m = _PEFT_KEY.match(k)
        if m is None:
            bad.append(k)
        else:
            parts.setdefault(m["module"], set()).add(m["part"])
    lacking = [
        f"{m}.lora_{'B' if p == {'A'} else 'A'}.weight" for m, p in parts.items() if len(p) < 2
    ]
    if bad or lacking:
        raise CheckpointError(
            f"{source}: unexpected keys {bad[:10]}{' ...' if len(bad) > 10 else ''}; missing keys "
            f"{lacking[:10]}. LoRA keys must read '<module>.lora_A.weight' and "
            f"'<module>.lora_B.weight' (DoRA, biases and LoHa/LoKr are not supported)"
        )
    return list(parts)
