"""The Kohya sd-scripts LoRA layout (and LyCORIS LoCon), read and written losslessly.

Keys (kohya-ss/sd-scripts ``networks/lora.py``): ``<prefix><module with . → _>`` followed by
``.lora_down.weight`` (= PEFT ``lora_A``), ``.lora_up.weight`` (= ``lora_B``) and ``.alpha``
(0-d tensor; scale = alpha / rank, a missing alpha means alpha = rank as in sd-scripts).
Prefixes: ``lora_unet_`` (the U-Net, diffusers module names for SD 1.x/2.x),
``lora_te_`` / ``lora_te1_`` (the CLIP text encoder) and ``lora_te2_`` (SDXL's second one).
Conv layers (LoCon, also what LyCORIS writes for ``algo=locon``) have a k×k ``lora_down``
and a 1×1 ``lora_up``. Training facts go in ``ss_*`` metadata (``ss_network_dim``,
``ss_network_alpha``, ``ss_base_model_version``...).

Flattened names are mapped back with the module list unetkit writes into the metadata, with
the target model's layer names, or with the name vocabulary of the diffusers U-Net / CLIP.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence

import torch

from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats.lora_adapter import Adapter, meta_json, most_common

log = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
# key prefix -> pipeline component ("unet" or a text encoder)
COMPONENT_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# diffusers U-Net name parts that contain "_" (to undo Kohya's flattening without a model)
UNET_VOCAB = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "class_embedding",
        "add_embedding",
    }
)
# transformers' CLIPTextModel name parts that contain "_"
CLIP_VOCAB = frozenset(
    {"text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection"}
)
_KOHYA_KEY = re.compile(r"^(?P<flat>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def flatten_name(module: str, prefix: str = KOHYA_PREFIX) -> str:
    """Kohya's module id: ``prefix`` (default ``lora_unet_``) + the name with ``.`` → ``_``."""
    return prefix + module.replace(".", "_")


def _unflatten(flat: str, vocab: frozenset[str]) -> str:
    """Undo ``.`` → ``_`` by joining tokens into the longest known name part."""
    tokens, parts, i = flat.split("_"), [], 0
    while i < len(tokens):
        for j in range(len(tokens), i, -1):
            cand = "_".join(tokens[i:j])
            if j == i + 1 or cand in vocab:
                parts.append(cand)
                i = j
                break
    return ".".join(parts)


def _split_prefix(flat: str) -> tuple[str, str] | None:
    for prefix in sorted(COMPONENT_PREFIXES, key=len, reverse=True):
        if flat.startswith(prefix):
            return prefix, flat[len(prefix) :]
    return None


def _group(
    state_dict: Mapping[str, torch.Tensor], source: str
) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, v in state_dict.items():
        m = _KOHYA_KEY.match(k)
        if m is None or _split_prefix(m["flat"]) is None:
            bad.append(k)
        else:
            groups.setdefault(m["flat"], {})[m["part"].split(".")[0]] = v
    lacking = [
        f"{f}.{p}.weight" for f, g in groups.items() for p in ("lora_down", "lora_up") if p not in g
    ]
    if bad or lacking:
        raise CheckpointError(
            f"{source}: unexpected Kohya keys {bad[:10]}, missing keys {lacking[:10]}; expected "
            f"'lora_unet_<module>' / 'lora_te_<module>' + '.lora_down.weight', "
            f"'.lora_up.weight' and '.alpha' (DoRA/LoHa/LoKr/Tucker are not supported)"
        )
    return groups


def from_kohya(
    state_dict: Mapping[str, torch.Tensor],
    *,
    module_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
    source: str = "adapter",
) -> Adapter:
    """Read the Kohya layout into an ``Adapter`` (text-encoder parts into ``others``).

    U-Net names are resolved, in this order, with the module list unetkit stores in the
    file metadata (``unetkit_modules``), with ``module_names`` (the target model's layers),
    else with the diffusers U-Net vocabulary (``UNET_VOCAB``); text-encoder names with the
    CLIP vocabulary. A missing ``.alpha`` means alpha = rank (logged as an assumption).
    ``strict`` is accepted for signature parity with the other readers.
    """
    del strict  # every Kohya prefix maps to a component; nothing to drop
    groups = _group(state_dict, source)
    names = meta_json(metadata, "unetkit_modules", None, source) or list(module_names or [])
    unet_table = {n.replace(".", "_"): n for n in names}
    unet_vocab = UNET_VOCAB | {p for n in names for p in n.split(".") if "_" in p}
    parts: dict[str, tuple[dict[str, torch.Tensor], dict[str, float]]] = {}
    no_alpha = []
    for flat, g in groups.items():
        prefix, rest = _split_prefix(flat)  # type: ignore[misc]  # _group checked it
        component = COMPONENT_PREFIXES[prefix]
        if component == "unet":
            module = unet_table.get(rest) or _unflatten(rest, unet_vocab)
        else:
            module = _unflatten(rest, CLIP_VOCAB)
        tensors, alphas = parts.setdefault(component, ({}, {}))
        tensors[f"{module}.lora_A.weight"] = g["lora_down"]
        tensors[f"{module}.lora_B.weight"] = g["lora_up"]
        if "alpha" in g:
            alphas[module] = float(g["alpha"].item())
        else:
            alphas[module] = float(g["lora_down"].shape[0])
            no_alpha.append(flat)
    if no_alpha:
        log.warning(
            "%s: %d Kohya layers have no '.alpha' (e.g. %s); assumed alpha = rank (scale 1), "
            "as sd-scripts does",
            source,
            len(no_alpha),
            no_alpha[0],
        )
    unet_tensors, unet_alphas = parts.pop("unet", ({}, {}))
    exact = meta_json(metadata, "unetkit_alphas", {}, source)
    for m, a in exact.items():  # alpha as written (the tensor holds it in float32)
        if m in unet_alphas and float(torch.tensor(a, dtype=torch.float32)) == unet_alphas[m]:
            unet_alphas[m] = float(a)
    info = {"base_model": (metadata or {}).get("ss_base_model_version") or None}
    others = {c: Adapter(t, a, {}) for c, (t, a) in parts.items()}
    return Adapter(unet_tensors, unet_alphas, info, others)


def _write(out: dict[str, torch.Tensor], adapter: Adapter, prefix: str) -> None:
    flats: dict[str, str] = {}
    for m in adapter.modules:
        flat = flatten_name(m, prefix)
        if flat in flats:
            raise ConfigError(f"modules {flats[flat]!r} and {m!r} both flatten to Kohya {flat!r}")
        flats[flat] = m
        out[f"{flat}.lora_down.weight"] = adapter.tensors[f"{m}.lora_A.weight"]
        out[f"{flat}.lora_up.weight"] = adapter.tensors[f"{m}.lora_B.weight"]
        out[f"{flat}.alpha"] = torch.tensor(adapter.alphas[m], dtype=torch.float32)


def to_kohya(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Kohya tensors (``lora_down``/``lora_up``/``alpha``) and metadata to invert the names."""
    out: dict[str, torch.Tensor] = {}
    _write(out, adapter, KOHYA_PREFIX)
    te1 = "lora_te1_" if "text_encoder_2" in adapter.others else "lora_te_"
    for component, part in adapter.others.items():
        _write(out, part, te1 if component == "text_encoder" else "lora_te2_")
    ranks = adapter.ranks
    meta = {
        "unetkit_modules": json.dumps(adapter.modules),
        "unetkit_alphas": json.dumps(adapter.alphas),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(most_common(list(ranks.values()), 0)),
        "ss_network_alpha": str(most_common(list(adapter.alphas.values()), 0.0)),
    }
    if adapter.info.get("base_model"):
        meta["ss_base_model_version"] = str(adapter.info["base_model"])
    return out, meta
