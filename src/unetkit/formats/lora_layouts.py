"""LoRA key layouts: unetkit, PEFT/diffusers and Kohya, converted losslessly.

Three layouts of the same tensors (``A``: r × in[/g] × k…, ``B``: out × r[/g] × 1…):

- ``"unetkit"``: PEFT file keys ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` in a
  ``.safetensors`` file whose metadata holds ``format = "unetkit-lora"``, the common ``r`` and
  ``alpha``, ``alphas`` (JSON, only the modules whose alpha differs), ``targets`` and
  ``base_model``.
- ``"diffusers"``: PEFT keys as diffusers and PEFT write them, all read the same way:
  ``StableDiffusionPipeline.save_lora_weights`` (``pytorch_lora_weights.safetensors``, keys
  ``unet.<module>.lora_A.weight`` and ``text_encoder.<module>...``, alpha in the metadata
  entry ``lora_adapter_metadata`` = JSON of the PEFT ``LoraConfig`` with keys prefixed by the
  component: ``unet.lora_alpha``, ``unet.alpha_pattern``...), ``UNet2DConditionModel.
  save_lora_adapter`` (the same without prefixes), and PEFT's ``save_pretrained`` folders
  (``adapter_model.safetensors`` with keys ``base_model.model.<module>...`` and the config in
  ``adapter_config.json``; ``use_rslora`` honoured). Files without a config mean
  alpha = rank (scale 1), as in diffusers; that assumption is logged as a warning.
- ``"kohya"``: ``lora_unet_<module with . → _>.lora_down.weight`` etc.; see
  ``unetkit.formats.lora_kohya``.

All layouts read into one ``Adapter`` (tensors in PEFT keys + alpha per module; text-encoder
parts in ``Adapter.others``), so any conversion is a rename: tensors are passed through
untouched (bit-equal) and alpha kept. Files and models are handled in
``unetkit.formats.lora_files``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unetkit._version import __version__
from unetkit.errors import CheckpointError, ConfigError, did_you_mean
from unetkit.formats.lora_adapter import (
    TEXT_COMPONENTS,
    Adapter,
    meta_json,
    most_common,
    peft_modules,
)
from unetkit.formats.lora_kohya import COMPONENT_PREFIXES, from_kohya, to_kohya

log = logging.getLogger(__name__)

FORMATS = ("unetkit", "diffusers", "kohya")
UNETKIT_FORMAT = "unetkit-lora"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


# --- detection -------------------------------------------------------------------------------
def detect_format(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> str:
    """``"unetkit"``, ``"diffusers"`` or ``"kohya"`` from the keys (and file metadata).

    Raises:
        CheckpointError: the keys fit none of them (the message shows some keys).
    """
    keys = list(state_dict)
    metadata = metadata or {}
    if metadata.get("format") == UNETKIT_FORMAT:
        return "unetkit"
    if any(k.startswith(tuple(COMPONENT_PREFIXES)) or ".lora_down." in k for k in keys):
        return "kohya"
    prefixes = ("unet.", PEFT_PREFIX, *(c + "." for c in TEXT_COMPONENTS))
    if DIFFUSERS_METADATA_KEY in metadata or any(
        k.startswith(prefixes) or ".lora.down." in k or "_lora.down." in k for k in keys
    ):
        return "diffusers"
    if any(".lora_A." in k for k in keys):
        return "unetkit"
    raise CheckpointError(
        f"not a LoRA state dict in a known layout; keys start {keys[:5]}; expected "
        f"'<module>.lora_A.weight' (unetkit/PEFT), 'unet.<module>.lora_A.weight' (diffusers) or "
        f"'lora_unet_<module>.lora_down.weight' (Kohya)"
    )


# --- diffusers / PEFT -------------------------------------------------------------------------
# older diffusers keys: '<attn>.processor.to_q_lora.down.weight' (attention processors),
# '<module>.lora.down.weight' (what convert_state_dict_to_diffusers makes of to_q/k/v/out) and
# '<module>.lora_linear_layer.down.weight' (text-encoder MLPs)
_OLD_PROC = re.compile(
    r"^(?P<m>.+?)(?:\.processor)?\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<p>down|up)\.weight$"
)
_OLD_LORA = re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.(?P<p>down|up)\.weight$")
# CLIP attention projections in the old diffusers text-encoder spelling
_CLIP_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _peft_key(key: str, component: str) -> str:
    if m := _OLD_PROC.match(key):
        if component == "unet":
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        else:
            proj = _CLIP_PROJ[m["proj"]]
        return f"{m['m']}.{proj}.lora_{'A' if m['p'] == 'down' else 'B'}.weight"
    if m := _OLD_LORA.match(key):
        return f"{m['m']}.lora_{'A' if m['p'] == 'down' else 'B'}.weight"
    return key


def _pattern_alpha(name: str, patterns: Mapping[str, float]) -> float | None:
    for key, alpha in patterns.items():  # PEFT's rule: the pattern matches a name suffix
        if re.match(rf"(.*\.)?({key})$", name):
            return float(alpha)
    return None


def _split_component(key: str) -> tuple[str, str]:
    """``(component, key without its prefix)``; unprefixed keys belong to the U-Net."""
    key = key.removeprefix(PEFT_PREFIX)
    for component in ("unet", *TEXT_COMPONENTS):
        if key.startswith(component + "."):
            return component, key[len(component) + 1 :]
    return "unet", key


def _component_config(metadata: Mapping[str, Any], component: str) -> dict[str, Any]:
    """The LoraConfig of ``component``: its prefixed entries, or the unprefixed config."""
    prefixed = {
        k[len(component) + 1 :]: v for k, v in metadata.items() if k.startswith(component + ".")
    }
    if prefixed:
        return prefixed
    known = ("unet", *TEXT_COMPONENTS)
    if any(k.startswith(tuple(c + "." for c in known)) for k in metadata):
        return {}  # a pipeline file without an entry for this component
    return dict(metadata)


def _alphas(
    modules: list[str], ranks: dict[str, int], cfg: Mapping[str, Any]
) -> dict[str, float] | None:
    """Alpha per module from a LoraConfig dict (None without ``lora_alpha``)."""
    if "lora_alpha" not in cfg:
        return None
    patterns = cfg.get("alpha_pattern") or {}
    alphas = {}
    for m in modules:
        a = _pattern_alpha(m, patterns)
        a = float(cfg["lora_alpha"]) if a is None else a
        # rsLoRA scales by alpha / sqrt(r); ours is alpha / r, so store alpha * sqrt(r)
        alphas[m] = a * math.sqrt(ranks[m]) if cfg.get("use_rslora") else a
    return alphas


def from_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    strict: bool = True,
    source: str = "adapter",
) -> Adapter:
    """Read diffusers/PEFT LoRA keys (any prefix, older spellings) into an ``Adapter``.

    Args:
        state_dict: the file's tensors; ``unet.``/``text_encoder.``/``text_encoder_2.`` and
            PEFT's ``base_model.model.`` prefixes are optional.
        metadata: the parsed LoraConfig JSON: ``lora_adapter_metadata`` (keys prefixed per
            component, or not) or a PEFT ``adapter_config.json``.
        strict: accepted for signature parity; text-encoder parts go to ``Adapter.others``.
    """
    del strict
    split: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        component, key = _split_component(k)
        split.setdefault(component, {})[_peft_key(key, component)] = v
    parts, guessed = {}, []
    for component, tensors in split.items():
        where = source if component == "unet" else f"{source} [{component}]"
        modules = peft_modules(tensors, where)
        ranks = {m: int(tensors[f"{m}.lora_A.weight"].shape[0]) for m in modules}
        alphas = _alphas(modules, ranks, _component_config(metadata or {}, component))
        if alphas is None:  # diffusers' convention without a config: W + B A, alpha = rank
            alphas = {m: float(r) for m, r in ranks.items()}
            guessed.append(component)
        parts[component] = Adapter(tensors, alphas, {})
    if guessed:
        log.warning(
            "%s: no LoRA alpha stored for %s (no lora_adapter_metadata / adapter_config.json); "
            "assumed alpha = rank (scale 1), diffusers' convention",
            source,
            " and ".join(guessed),
        )
    unet = parts.pop("unet", Adapter({}, {}, {}))
    unet.others = parts
    return unet


def to_diffusers(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (``unet.``/``text_encoder.``-prefixed) and metadata as diffusers writes them."""
    meta, tensors = {}, {}
    for component, part in {"unet": adapter, **adapter.others}.items():
        ranks, alphas = part.ranks, part.alphas
        r = most_common(list(ranks.values()), 4)
        alpha = most_common([alphas[m] for m in ranks], float(r))
        config = {
            "r": r,
            "lora_alpha": alpha,
            # '^' + escaped full name: PEFT matches '(.*\.)?(key)$', so this selects one layer
            "rank_pattern": {"^" + re.escape(m): v for m, v in ranks.items() if v != r},
            "alpha_pattern": {"^" + re.escape(m): alphas[m] for m in ranks if alphas[m] != alpha},
            "target_modules": sorted(ranks),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": False,
            "init_lora_weights": True,
        }
        meta.update({f"{component}.{k}": v for k, v in config.items()})
        tensors.update({f"{component}.{k}": v for k, v in part.tensors.items()})
    return tensors, {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(meta, sort_keys=True)}


# --- unetkit --------------------------------------------------------------------------------
def to_unetkit(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (PEFT keys; text-encoder parts prefixed by component) and metadata."""
    ranks = adapter.ranks
    r = most_common(list(ranks.values()), 4)
    alpha = most_common([adapter.alphas[m] for m in ranks], float(r))
    meta = {
        "format": UNETKIT_FORMAT,
        "unetkit_version": __version__,
        "r": str(r),
        "alpha": repr(float(alpha)),
        "alphas": json.dumps({m: a for m, a in adapter.alphas.items() if a != alpha}),
        "targets": json.dumps(adapter.info.get("targets")),
        "base_model": str(adapter.info.get("base_model") or ""),
        "inference": json.dumps(adapter.info.get("inference") or {}),
    }
    tensors = dict(adapter.tensors)
    for component, part in adapter.others.items():
        tensors.update({f"{component}.{k}": v for k, v in part.tensors.items()})
    if adapter.others:
        meta["others_alphas"] = json.dumps({c: p.alphas for c, p in adapter.others.items()})
    return tensors, meta


def from_unetkit(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, source: str = "adapter"
) -> Adapter:
    """Read the unetkit layout (metadata optional: no metadata means alpha = rank, warned)."""
    split: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        component, key = _split_component(k)
        split.setdefault(component, {})[key] = v
    tensors = split.pop("unet", {})
    modules = peft_modules(tensors, source)
    special = meta_json(metadata, "alphas", {}, source)
    targets = meta_json(metadata, "targets", None, source)
    try:
        default = float(metadata["alpha"]) if "alpha" in metadata else None
    except ValueError:
        raise CheckpointError(
            f"{source}: metadata alpha={metadata['alpha']!r} is no number"
        ) from None
    if default is None and not special:
        log.warning(
            "%s: PEFT-keyed LoRA without alpha metadata; assumed alpha = rank (scale 1)", source
        )
    alphas = {}
    for m in modules:
        r = float(tensors[f"{m}.lora_A.weight"].shape[0])
        alphas[m] = float(special.get(m, r if default is None else default))
    info = {
        "targets": targets,
        "base_model": metadata.get("base_model") or None,
        "inference": meta_json(metadata, "inference", {}, source),
    }
    other_alphas = meta_json(metadata, "others_alphas", {}, source)
    others = {}
    for component, part in split.items():
        ranks = {m: float(part[f"{m}.lora_A.weight"].shape[0]) for m in peft_modules(part, source)}
        given = other_alphas.get(component, {})
        others[component] = Adapter(part, {m: float(given.get(m, r)) for m, r in ranks.items()})
    return Adapter(tensors, alphas, info, others)


def convert(adapter: Adapter, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of ``adapter`` in layout ``fmt`` (``FORMATS``)."""
    writers = {"unetkit": to_unetkit, "diffusers": to_diffusers, "kohya": to_kohya}
    if fmt not in writers:
        raise ConfigError(f"LoRA format {fmt!r}{did_you_mean(fmt, FORMATS)}; choose from {FORMATS}")
    return writers[fmt](adapter)


def parse_adapter(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    module_names: Sequence[str] | None = None,
    strict: bool = True,
    source: str = "adapter",
) -> Adapter:
    """Any supported layout (detected) → ``Adapter``; ``metadata`` = the file's metadata."""
    metadata = dict(metadata or {})
    fmt = detect_format(state_dict, metadata)
    if fmt == "kohya":
        return from_kohya(
            state_dict, module_names=module_names, metadata=metadata, strict=strict, source=source
        )
    if fmt == "diffusers":
        config = meta_json(metadata, DIFFUSERS_METADATA_KEY, None, source)
        return from_diffusers(state_dict, config, strict=strict, source=source)
    return from_unetkit(state_dict, metadata, source=source)
