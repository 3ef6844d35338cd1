"""LoRA key layouts: unetkit, PEFT/diffusers and Kohya, converted losslessly.

Three layouts of the same tensors (``A``: r × in[/g] × k…, ``B``: out × r[/g] × 1…):

- ``"unetkit"``: PEFT file keys ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` in a
  ``.safetensors`` file whose metadata holds ``format = "unetkit-lora"``, the common ``r`` and
  ``alpha``, ``alphas`` (JSON, only the modules whose alpha differs), ``targets`` and
  ``base_model``.
- ``"diffusers"``: what diffusers' ``save_lora_weights`` writes for a U-Net
  (``pytorch_lora_weights.safetensors``): keys ``unet.<module>.lora_A.weight``; alpha in the
  metadata entry ``lora_adapter_metadata`` = JSON of the PEFT ``LoraConfig`` with keys
  prefixed ``unet.`` (``unet.r``, ``unet.lora_alpha``, ``unet.alpha_pattern``...). Files
  without it mean alpha = rank (scale 1), as in diffusers.
- ``"kohya"``: ``lora_unet_<module with . → _>.lora_down.weight`` (= A), ``.lora_up.weight``
  (= B), ``.alpha`` (0-d tensor); conv layers (LoCon) have a k×k ``lora_down`` and a 1×1
  ``lora_up``. Flattened names are mapped back with the target model's layer names, with the
  module list unetkit writes into the file's metadata, or with the diffusers U-Net vocabulary.

All layouts read into one ``Adapter`` (tensors in PEFT keys + alpha per module), so any
conversion is a rename: tensors are passed through untouched (bit-equal) and alpha kept.
Files and models are handled in ``unetkit.formats.lora_files``.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from unetkit._version import __version__
from unetkit.errors import CheckpointError, ConfigError, did_you_mean

log = logging.getLogger(__name__)

FORMATS = ("unetkit", "diffusers", "kohya")
UNETKIT_FORMAT = "unetkit-lora"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
KOHYA_PREFIX = "lora_unet_"
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
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<flat>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass
class Adapter:
    """One adapter in canonical form.

    Args:
        tensors: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` tensors (PEFT keys).
        alphas: alpha per module (scale = alpha / rank).
        info: JSON facts: ``targets``, ``base_model``, ``adapter_name`` (optional), and
            ``inference``: prediction settings the adapted model needs instead of its
            base's (e.g. a LoRA run's calibrated ``seed_threshold``; unetkit layout only).
    """

    tensors: dict[str, torch.Tensor]
    alphas: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

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


def _meta_json(meta: Mapping[str, str] | None, key: str, default: Any, source: str) -> Any:
    """A JSON entry of a file's metadata; unreadable JSON is a CheckpointError."""
    raw = (meta or {}).get(key)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{source}: metadata {key!r} is not valid JSON ({e})") from None


def _common(values: Sequence[Any], default: Any) -> Any:
    return collections.Counter(values).most_common(1)[0][0] if values else default


def _peft_modules(tensors: Mapping[str, torch.Tensor], source: str) -> list[str]:
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


# --- detection -------------------------------------------------------------------------------
def detect_format(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> str:
    """``"unetkit"``, ``"diffusers"`` or ``"kohya"`` from the keys (and file metadata).

    Raises:
        CheckpointError: the keys fit none of them (the message shows some keys).
    """
    keys = list(state_dict)
    if (metadata or {}).get("format") == UNETKIT_FORMAT:
        return "unetkit"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k for k in keys):
        return "kohya"
    if any(k.startswith("unet.") or ".lora.down." in k or "_lora.down." in k for k in keys):
        return "diffusers"
    if any(".lora_A." in k for k in keys):
        return "unetkit"
    raise CheckpointError(
        f"not a LoRA state dict in a known layout; keys start {keys[:5]}; expected "
        f"'<module>.lora_A.weight' (unetkit/PEFT), 'unet.<module>.lora_A.weight' (diffusers) or "
        f"'lora_unet_<module>.lora_down.weight' (Kohya)"
    )


# --- diffusers ------------------------------------------------------------------------------
# older diffusers keys: '<attn>.processor.to_q_lora.down.weight' (attention processors) and
# '<module>.lora.down.weight' (what convert_state_dict_to_diffusers makes of to_q/k/v/out)
_OLD_PROC = re.compile(
    r"^(?P<m>.+?)(?:\.processor)?\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<p>down|up)\.weight$"
)
_OLD_LORA = re.compile(r"^(?P<m>.+)\.lora\.(?P<p>down|up)\.weight$")


def _peft_key(key: str) -> str:
    if m := _OLD_PROC.match(key):
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['m']}.{proj}.lora_{'A' if m['p'] == 'down' else 'B'}.weight"
    if m := _OLD_LORA.match(key):
        return f"{m['m']}.lora_{'A' if m['p'] == 'down' else 'B'}.weight"
    return key


def _pattern_alpha(name: str, patterns: Mapping[str, float]) -> float | None:
    for key, alpha in patterns.items():  # PEFT's rule: the pattern matches a name suffix
        if re.match(rf"(.*\.)?({key})$", name):
            return float(alpha)
    return None


def from_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    *,
    strict: bool = True,
    source: str = "adapter",
) -> Adapter:
    """Read the diffusers/PEFT U-Net layout (``unet.`` prefix optional) into an ``Adapter``.

    Also reads diffusers' older key spellings (``to_q.lora.down.weight``,
    ``processor.to_q_lora.down.weight``).

    Args:
        state_dict: the file's tensors.
        metadata: the parsed ``lora_adapter_metadata`` JSON (``unet.``-prefixed LoraConfig).
        strict: keys of other components (``text_encoder.*``) raise if True, else are dropped.
    """
    tensors, other = {}, []
    for k, v in state_dict.items():
        if k.startswith(("text_encoder.", "text_encoder_2.")):
            other.append(k)
        else:
            tensors[_peft_key(k.removeprefix("unet."))] = v
    _drop_or_raise(other, strict, source, "text-encoder keys")
    modules = _peft_modules(tensors, source)
    ranks = {m: int(tensors[f"{m}.lora_A.weight"].shape[0]) for m in modules}
    cfg = {k[len("unet.") :]: v for k, v in (metadata or {}).items() if k.startswith("unet.")}
    cfg = cfg or dict(metadata or {})
    if "lora_alpha" in cfg:
        patterns = cfg.get("alpha_pattern") or {}
        alphas = {}
        for m in modules:
            a = _pattern_alpha(m, patterns)
            alphas[m] = float(cfg["lora_alpha"]) if a is None else a
    else:  # diffusers' convention without metadata: W + B A, i.e. alpha = rank
        alphas = {m: float(r) for m, r in ranks.items()}
    return Adapter(dict(tensors), alphas, {})


def to_diffusers(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (``unet.``-prefixed keys) and safetensors metadata as diffusers writes them."""
    ranks, alphas = adapter.ranks, adapter.alphas
    r = _common(list(ranks.values()), 4)
    alpha = _common([alphas[m] for m in ranks], float(r))
    config = {
        "r": r,
        "lora_alpha": alpha,
        # '^' + escaped full name: PEFT matches '(.*\.)?(key)$', so this selects exactly one layer
        "rank_pattern": {"^" + re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {"^" + re.escape(m): alphas[m] for m in ranks if alphas[m] != alpha},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
    }
    meta = {"unet." + k: v for k, v in config.items()}
    tensors = {"unet." + k: v for k, v in adapter.tensors.items()}
    return tensors, {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(meta, sort_keys=True)}


# --- kohya ----------------------------------------------------------------------------------
def flatten_name(module: str) -> str:
    """Kohya's module id: ``lora_unet_`` + the dotted name with ``.`` → ``_``."""
    return KOHYA_PREFIX + module.replace(".", "_")


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


def from_kohya(
    state_dict: Mapping[str, torch.Tensor],
    *,
    module_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
    source: str = "adapter",
) -> Adapter:
    """Read the Kohya layout into an ``Adapter``.

    Flattened names are resolved, in this order, with the module list unetkit stores in the
    file metadata (``unetkit_modules``), with ``module_names`` (the target model's layers),
    else with the diffusers U-Net vocabulary (``UNET_VOCAB``). A missing ``.alpha`` means
    alpha = rank.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    other, bad = [], []
    for k, v in state_dict.items():
        m = _KOHYA_KEY.match(k)
        if m is None:
            bad.append(k)
        elif not m["flat"].startswith(KOHYA_PREFIX):
            other.append(k)
        else:
            groups.setdefault(m["flat"], {})[m["part"].split(".")[0]] = v
    lacking = [
        f"{f}.{p}.weight" for f, g in groups.items() for p in ("lora_down", "lora_up") if p not in g
    ]
    if bad or lacking:
        raise CheckpointError(
            f"{source}: unexpected Kohya keys {bad[:10]}, missing keys {lacking[:10]}; expected "
            f"'lora_unet_<module>.lora_down.weight', '.lora_up.weight' and '.alpha' "
            f"(DoRA/LoHa/LoKr are not supported)"
        )
    _drop_or_raise(other, strict, source, "non-U-Net (text encoder) keys")
    names = _meta_json(metadata, "unetkit_modules", None, source) or list(module_names or [])
    table = {flatten_name(n): n for n in names}
    vocab = UNET_VOCAB | {p for n in names for p in n.split(".") if "_" in p}
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for flat, g in groups.items():
        module = table.get(flat) or _unflatten(flat[len(KOHYA_PREFIX) :], vocab)
        tensors[f"{module}.lora_A.weight"] = g["lora_down"]
        tensors[f"{module}.lora_B.weight"] = g["lora_up"]
        alphas[module] = (
            float(g["alpha"].item()) if "alpha" in g else float(g["lora_down"].shape[0])
        )
    exact = _meta_json(metadata, "unetkit_alphas", {}, source)
    for m, a in exact.items():  # alpha as written (the tensor holds it in float32)
        if m in alphas and float(torch.tensor(a, dtype=torch.float32)) == alphas[m]:
            alphas[m] = float(a)
    return Adapter(tensors, alphas, {})


def to_kohya(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Kohya tensors (``lora_down``/``lora_up``/``alpha``) and metadata to invert the names."""
    out: dict[str, torch.Tensor] = {}
    flats = {}
    for m in adapter.modules:
        flat = flatten_name(m)
        if flat in flats:
            raise ConfigError(f"modules {flats[flat]!r} and {m!r} both flatten to Kohya {flat!r}")
        flats[flat] = m
        out[f"{flat}.lora_down.weight"] = adapter.tensors[f"{m}.lora_A.weight"]
        out[f"{flat}.lora_up.weight"] = adapter.tensors[f"{m}.lora_B.weight"]
        out[f"{flat}.alpha"] = torch.tensor(adapter.alphas[m], dtype=torch.float32)
    ranks = adapter.ranks
    meta = {
        "unetkit_modules": json.dumps(adapter.modules),
        "unetkit_alphas": json.dumps(adapter.alphas),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_common(list(ranks.values()), 0)),
        "ss_network_alpha": str(_common(list(adapter.alphas.values()), 0.0)),
    }
    return out, meta


def _drop_or_raise(keys: list[str], strict: bool, source: str, what: str) -> None:
    if not keys:
        return
    msg = f"{source}: {len(keys)} {what} cannot go into a U-Net: {keys[:10]}"
    if strict:
        raise CheckpointError(msg + "; pass strict=False to drop them")
    log.warning("%s (dropped: strict=False)", msg)


# --- unetkit --------------------------------------------------------------------------------
def to_unetkit(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (PEFT keys) and the ``unetkit-lora`` metadata."""
    ranks = adapter.ranks
    r = _common(list(ranks.values()), 4)
    alpha = _common([adapter.alphas[m] for m in ranks], float(r))
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
    return dict(adapter.tensors), meta


def from_unetkit(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, source: str = "adapter"
) -> Adapter:
    """Read the unetkit layout (metadata optional: no metadata means alpha = rank)."""
    tensors = dict(state_dict)
    modules = _peft_modules(tensors, source)
    special = _meta_json(metadata, "alphas", {}, source)
    targets = _meta_json(metadata, "targets", None, source)
    try:
        default = float(metadata["alpha"]) if "alpha" in metadata else None
    except ValueError:
        raise CheckpointError(
            f"{source}: metadata alpha={metadata['alpha']!r} is no number"
        ) from None
    alphas = {}
    for m in modules:
        r = float(tensors[f"{m}.lora_A.weight"].shape[0])
        alphas[m] = float(special.get(m, r if default is None else default))
    info = {
        "targets": targets,
        "base_model": metadata.get("base_model") or None,
        "inference": _meta_json(metadata, "inference", {}, source),
    }
    return Adapter(tensors, alphas, info)


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
        config = _meta_json(metadata, DIFFUSERS_METADATA_KEY, None, source)
        return from_diffusers(state_dict, config, strict=strict, source=source)
    return from_unetkit(state_dict, metadata, source=source)
