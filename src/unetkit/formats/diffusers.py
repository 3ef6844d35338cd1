"""diffusers ``UNet2DConditionModel`` directories <-> ``DiffusionUNet``.

``DiffusionUNet`` uses diffusers' module names, so the weights load by identity and the
work is the config mapping. A diffusers U-Net directory holds ``config.json`` and
``diffusion_pytorch_model.safetensors`` (or a sharded ``...safetensors.index.json``); a
pipeline root holds it under ``unet/``. Pickled ``.bin`` weights are refused: unetkit never
unpickles files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from unetkit._atomic import atomic_path, atomic_write_text
from unetkit.errors import CheckpointError, ConfigError, UnetkitError
from unetkit.formats.checkpoint import check_state_dict, unwrap
from unetkit.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig
from unetkit.runtime import fastpath

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID = "UNetMidBlock2DCrossAttn"
# options whose non-default values change the network in ways DiffusionUNet does not build
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "class_embed_type": None,
    "addition_embed_type": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "num_attention_heads": None,
    "reverse_transformer_layers_per_block": None,
}


def _uniform(d: dict[str, Any], key: str, default: Any) -> Any:
    """A per-level diffusers option that DiffusionUNet holds as one value."""
    v = d.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(set(map(str, v))) != 1:
            raise ConfigError(f"diffusers config {key}={v}: per-level values are not supported")
        v = v[0]
    return v


def config_from_diffusers(d: dict[str, Any]) -> DiffusionUNetConfig:
    """Map a diffusers ``UNet2DConditionModel`` config dict to a ``DiffusionUNetConfig``.

    Args:
        d: the parsed ``config.json``.

    Raises:
        ConfigError: naming any unsupported block type or option value.

    Example:
        >>> config_from_diffusers({"block_out_channels": [32, 64], "attention_head_dim": 2,
        ...     "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        ...     "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        ...     "norm_num_groups": 8, "cross_attention_dim": 32}).attention_levels
        (False, True)
    """

    def is_default(k: str) -> bool:
        v = d[k]
        return all(x == _FIXED[k] for x in v) if isinstance(v, list) else v == _FIXED[k]

    bad = {k: d[k] for k in _FIXED if k in d and not is_default(k)}
    if d.get("mid_block_only_cross_attention") not in (None, False):
        bad["mid_block_only_cross_attention"] = d["mid_block_only_cross_attention"]
    if bad:
        raise ConfigError(
            "diffusers config options not supported by DiffusionUNet: "
            + ", ".join(f"{k}={v!r} (supported: {_FIXED.get(k)!r})" for k, v in bad.items())
        )
    ch = tuple(d.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(ch)
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(d.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    mid = d.get("mid_block_type", _MID)
    unknown = [t for t in down if t not in _DOWN] + [t for t in up if t not in _UP]
    if mid != _MID:
        unknown.append(f"mid_block_type={mid}")
    if unknown:
        raise ConfigError(
            f"diffusers U-Net block types not supported: {', '.join(map(str, unknown))}; "
            f"DiffusionUNet builds {', '.join([*_DOWN, *_UP, _MID])}"
        )
    levels = tuple(_DOWN[t] for t in down)
    if len(down) != n or [_UP[t] for t in up] != list(levels[::-1]):
        raise ConfigError(
            f"diffusers config: up_block_types {up} must mirror down_block_types {down} "
            f"(one per entry of block_out_channels={list(ch)})"
        )
    heads = d.get("attention_head_dim", 8)  # diffusers' historical name for the head COUNT
    if isinstance(heads, (list, tuple)):
        heads = heads[0] if len(set(heads)) == 1 else tuple(heads)
    groups = d.get("norm_num_groups", 32)
    if groups is None:
        raise ConfigError("diffusers config norm_num_groups=None (no norm) is not supported")
    return DiffusionUNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        channels=ch,
        num_res_blocks=_uniform(d, "layers_per_block", 2),
        attention_levels=levels,
        num_heads=heads,
        head_dim=None,
        cross_attention_dim=_uniform(d, "cross_attention_dim", 1280),
        transformer_layers=_uniform(d, "transformer_layers_per_block", 1),
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        norm_groups=groups,
        norm_eps=d.get("norm_eps", 1e-5),
        num_class_embeds=d.get("num_class_embeds"),
        flip_sin_to_cos=d.get("flip_sin_to_cos", True),
        freq_shift=d.get("freq_shift", 0),
        dropout=d.get("dropout", 0.0),
        upcast_attention=bool(d.get("upcast_attention", False)),
    )


def config_to_diffusers(c: DiffusionUNetConfig) -> dict[str, Any]:
    """The ``config.json`` dict that ``diffusers.UNet2DConditionModel`` builds ``c`` from."""
    if c.dims != 2 or c.cross_attention_dim is None:
        raise ConfigError(
            f"diffusers UNet2DConditionModel needs dims=2 and a cross_attention_dim "
            f"(got dims={c.dims}, cross_attention_dim={c.cross_attention_dim})"
        )
    heads = c.heads_per_level()
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.25.0",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": list(c.channels),
        "layers_per_block": c.num_res_blocks,
        "down_block_types": [
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels
        ],
        "mid_block_type": _MID,
        "up_block_types": [
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in c.attention_levels[::-1]
        ],
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else list(heads),
        "cross_attention_dim": c.cross_attention_dim,
        "transformer_layers_per_block": c.transformer_layers,
        "use_linear_projection": c.use_linear_projection,
        "norm_num_groups": c.norm_groups,
        "norm_eps": c.norm_eps,
        "num_class_embeds": c.num_class_embeds,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift,
        "dropout": c.dropout,
        "upcast_attention": c.upcast_attention,
        **{k: v for k, v in _FIXED.items() if k != "num_attention_heads"},
    }


def _unet_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a diffusers U-Net folder)")
    if not (path / CONFIG_NAME).is_file() and (path / "unet" / CONFIG_NAME).is_file():
        return path / "unet"  # pipeline root
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{path}: no {CONFIG_NAME} (expected a diffusers U-Net folder or a pipeline root "
            f"with unet/)"
        )
    return path


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({folder / f for f in weight_map.values()})
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    hint = (
        f"only pickled weights ({', '.join(pickles)}) were found; unetkit never unpickles "
        f"files. Convert them once with diffusers: UNet2DConditionModel.from_pretrained(dir)"
        f".save_pretrained(dir, safe_serialization=True)"
        if pickles
        else "no weights file found"
    )
    raise CheckpointError(f"{folder}: expected {single.name}; {hint}")


def _read_tensors(
    files: list[Path], dtypes: dict[str, torch.dtype] | None
) -> dict[str, torch.Tensor]:
    """The files' tensors. Without ``dtypes`` they stay in the mapped files (no copy); with
    it each is read on its own (``pread``: mapped pages would stay resident) and cast to its
    entry at once, so only one float32 tensor is in memory at a time."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if dtypes is None:
                tensors.update(safetensors.torch.load_file(str(f)))
                continue
            with safetensors.safe_open(str(f), framework="pt", backend="pread") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = fh.get_tensor(key)
                    tensors[key] = t.to(dtypes[key]) if key in dtypes else t
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable .safetensors file ({e})") from None
    return tensors


def _load_weights(
    config: DiffusionUNetConfig,
    files: list[Path],
    source: str,
    frozen_dtype: torch.dtype | None = None,
) -> DiffusionUNet:
    """The model with the files' tensors assigned, not copied: safetensors maps the file, so
    peak memory is one copy of the weights (as in diffusers), not the model plus the file
    (6.9 GB instead of 3.4 GB for an SD U-Net in float32). Keys and shapes are checked
    first; a mismatch lists them. With ``frozen_dtype`` each weight is stored as the fast
    path's frozen copy keeps it (``fastpath.weight_dtype``: norms float32)."""
    with torch.device("meta"):  # no allocation: every tensor is assigned below
        model = DiffusionUNet(config)
    dtypes = None
    if frozen_dtype is not None:
        dtypes = {
            f"{prefix}.{name}" if prefix else name: fastpath.weight_dtype(m, frozen_dtype)
            for prefix, m in model.named_modules()
            for name, p in m.named_parameters(recurse=False)
            if p.is_floating_point()
        }
    tensors = _read_tensors(files, dtypes)
    check_state_dict(model.state_dict(), tensors, source=source)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.requires_grad_(False) if frozen_dtype is not None else model


def build_empty(config: DiffusionUNetConfig) -> DiffusionUNet:
    """A ``DiffusionUNet`` with allocated but uninitialised weights (to be loaded into)."""
    with torch.device("meta"):
        model = DiffusionUNet(config)
    return model.to_empty(device="cpu")


def load_diffusers_unet(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    frozen_dtype: torch.dtype | None = None,
) -> DiffusionUNet:
    """Load a diffusers ``UNet2DConditionModel`` folder (or a pipeline root with ``unet/``).

    Args:
        path: folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``.
        variant: weight variant, e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
        dtype: dtype of the returned model.
        frozen_dtype: instead of ``dtype``, store the weights as the CPU fast path's frozen
            copy keeps them (``runtime.fastpath.cast_weights``; ``torch.bfloat16``: norms
            stay float32), reading them tensor by tensor: an SD U-Net loads into 1.7 GB
            without the float32 weights ever being in memory. For a model that only runs
            through ``runtime.prepared`` at that precision (``fastpath.frozen_dtype``).

    Returns:
        ``DiffusionUNet`` in eval mode.

    Example:
        >>> unet = load_diffusers_unet("stable-diffusion-v1-5")   # doctest: +SKIP
    """
    folder = _unet_dir(Path(path))
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
        if not isinstance(raw, dict):
            raise CheckpointError(f"expected a JSON object, found a {type(raw).__name__}")
        config = config_from_diffusers(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, UnetkitError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}") from None
    model = _load_weights(config, _weight_files(folder, variant), str(folder), frozen_dtype)
    return model.eval() if frozen_dtype is not None else model.to(dtype).eval()


def save_diffusers_unet(model: DiffusionUNet, path: str | os.PathLike) -> Path:
    """Write ``model`` as a diffusers U-Net folder (``config.json`` + safetensors, atomic).

    ``diffusers.UNet2DConditionModel.from_pretrained(path)`` reads the result.
    """
    model = unwrap(model)
    folder = Path(path)
    config = config_to_diffusers(model.config)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("wrote diffusers U-Net to %s", folder)
    return folder


__all__ = [
    "config_from_diffusers",
    "config_to_diffusers",
    "load_diffusers_unet",
    "save_diffusers_unet",
    "build_empty",
]
