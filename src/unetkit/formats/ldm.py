"""Original CompVis/LDM single-file U-Net layout <-> ``DiffusionUNet`` (diffusers keys).

The LDM code (Rombach et al. 2022) stores the U-Net under ``model.diffusion_model.`` as
``input_blocks.k.{0,1}`` (ResBlock, SpatialTransformer, or ``0.op`` for a down-sampler),
``middle_block.{0,1,2}``, ``output_blocks.k.{0,1,2}`` (``.conv`` for an up-sampler),
``time_embed.{0,2}``, ``label_emb``, ``out.{0,2}``; inside a ResBlock ``in_layers.{0,2}``,
``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``. The key table is derived from
the config, so every member of the SD 1.x/2.x family maps, not one hard-coded list.
Files are ``.safetensors`` only: pickled ``.ckpt``/``.pt`` files are never opened.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from unetkit import config as cfg
from unetkit._atomic import atomic_path
from unetkit.errors import CheckpointError, UnetkitError
from unetkit.formats.checkpoint import load_state_dict_strict, unwrap
from unetkit.formats.diffusers import build_empty
from unetkit.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig

PREFIX = "model.diffusion_model."
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_KEY = re.compile(r"^(.*\.resnets\.\d+)\.(\w+)\.(weight|bias)$")


def _module_prefixes(config: DiffusionUNetConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every top-level piece, in the LDM order."""
    n, r = len(config.channels), config.num_res_blocks
    pairs = [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("class_embedding", "label_emb"),
        ("conv_in", "input_blocks.0.0"),
    ]
    k = 1
    for i in range(n):
        for j in range(r):
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0"))
            pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
            k += 1
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op"))
            k += 1
    pairs += [
        ("mid_block.resnets.0", "middle_block.0"),
        ("mid_block.attentions.0", "middle_block.1"),
        ("mid_block.resnets.1", "middle_block.2"),
    ]
    k = 0
    for u in range(n):
        level = n - 1 - u
        for j in range(r + 1):
            pairs.append((f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0"))
            pairs.append((f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1"))
            if j == r and level > 0:
                slot = 2 if config.attention_levels[level] else 1
                pairs.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{k}.{slot}.conv"))
            k += 1
    pairs += [("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    return pairs


def key_map(config: DiffusionUNetConfig) -> dict[str, str]:
    """diffusers/unetkit key -> LDM key (without ``model.diffusion_model.``) for ``config``."""
    with torch.device("meta"):
        keys = list(DiffusionUNet(config).state_dict())
    prefixes = dict(_module_prefixes(config))
    heads = sorted(prefixes, key=len, reverse=True)  # longest match first
    table = {}
    for key in keys:
        m = _RESNET_KEY.match(key)
        if m:  # ResBlock leaves are renamed; everything else keeps its tail
            head, leaf, kind = m.groups()
            table[key] = f"{prefixes[head]}.{_RESNET[leaf]}.{kind}"
            continue
        head = next(p for p in heads if key.startswith(p + "."))
        table[key] = prefixes[head] + key[len(head) :]
    return table


def _mismatch(missing: list[str], unexpected: list[str], source: str) -> CheckpointError:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            parts.append(f"{title} keys: {', '.join(items[:10])}{more}")
    return CheckpointError(
        f"{source}: LDM U-Net weights do not match the config; " + "; ".join(parts)
        + " (pass the config the checkpoint was trained with)"
    )  # fmt: skip


def ldm_to_diffusers(
    state_dict: dict[str, torch.Tensor], config: DiffusionUNetConfig, *, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Rename an LDM U-Net state dict to diffusers/unetkit keys.

    Args:
        state_dict: keys with ``model.diffusion_model.`` (other keys, e.g. the VAE or text
            encoder of a full SD checkpoint, are ignored) or bare U-Net keys.
        config: the U-Net's config (the key table follows from it).
        source: name used in error messages.

    Raises:
        CheckpointError: listing missing and unexpected U-Net keys.
    """
    if any(k.startswith(PREFIX) for k in state_dict):
        unet = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    else:
        unet = dict(state_dict)
    table = key_map(config)
    missing = sorted(v for v in table.values() if v not in unet)
    unexpected = sorted(set(unet) - set(table.values()))
    if missing or unexpected:
        raise _mismatch([PREFIX + k for k in missing], [PREFIX + k for k in unexpected], source)
    return {ours: unet[theirs] for ours, theirs in table.items()}


def diffusers_to_ldm(
    state_dict: dict[str, torch.Tensor], config: DiffusionUNetConfig
) -> dict[str, torch.Tensor]:
    """Rename a diffusers/unetkit U-Net state dict to LDM keys (with ``model.diffusion_model.``)."""
    table = key_map(config)
    missing = sorted(set(table) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(table))
    if missing or unexpected:
        raise _mismatch(missing, unexpected, "diffusers state dict")
    return {PREFIX + table[k]: v for k, v in state_dict.items()}


def _check_suffix(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: LDM checkpoints are read and written as .safetensors only; unetkit never "
            f"unpickles {path.suffix or 'suffix-less'} files. Convert a trusted .ckpt once with "
            f"torch + safetensors.torch.save_file(torch.load(f, weights_only=True)['state_dict'], "
            f"'model.safetensors')"
        )


def load_ldm_unet(
    file: str | os.PathLike,
    config: DiffusionUNetConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> DiffusionUNet:
    """Load the U-Net of an original (CompVis/LDM layout) Stable Diffusion ``.safetensors``.

    Args:
        file: a full SD checkpoint or a U-Net-only file, ``.safetensors``.
        config: the U-Net config; default: the one stored by ``save_ldm_unet`` in the file's
            metadata, else SD 1.x (``DiffusionUNetConfig()``).
        dtype: dtype of the returned model.

    Example:
        >>> unet = load_ldm_unet("v1-5-pruned-emaonly.safetensors")   # doctest: +SKIP
    """
    path = Path(file)
    _check_suffix(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = [k for k in f.keys() if k.startswith(PREFIX)] or list(f.keys())  # noqa: SIM118
            tensors = {k: f.get_tensor(k) for k in keys}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
    if config is None:
        try:
            config = (
                cfg.from_json(DiffusionUNetConfig, meta["unetkit_config"], source=str(path))
                if "unetkit_config" in meta
                else DiffusionUNetConfig()
            )
        except UnetkitError as e:
            raise CheckpointError(f"{path}: bad unetkit_config metadata: {e}") from None
    model = build_empty(config)
    load_state_dict_strict(
        model, ldm_to_diffusers(tensors, config, source=str(path)), source=str(path)
    )
    return model.to(dtype).eval()


def save_ldm_unet(
    model: DiffusionUNet,
    file: str | os.PathLike,
    *,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` with LDM keys (``model.diffusion_model.*``) to a ``.safetensors`` file.

    The unetkit config is kept in the metadata (``unetkit_config``), so ``load_ldm_unet``
    needs no config for files written here; ``extra_metadata`` adds string entries. Atomic.
    """
    model = unwrap(model)
    path = Path(file)
    _check_suffix(path)
    tensors = {
        k: v.detach().cpu().contiguous().clone()
        for k, v in diffusers_to_ldm(model.state_dict(), model.config).items()
    }
    meta = {**(extra_metadata or {}), "format": "pt", "unetkit_config": cfg.to_json(model.config)}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    return path


__all__ = [
    "PREFIX",
    "diffusers_to_ldm",
    "key_map",
    "ldm_to_diffusers",
    "load_ldm_unet",
    "save_ldm_unet",
]
