"""Diffusion U-Net weights in any of their three files, detected, read and written.

- ``"diffusers"``: a ``UNet2DConditionModel`` folder (``config.json`` + safetensors) or a
  pipeline root holding ``unet/``;
- ``"ldm"``: an original CompVis/LDM ``.safetensors`` (a full SD checkpoint or a U-Net-only
  file, keys ``model.diffusion_model.*``); the config comes from the file's metadata when
  unetkit wrote it, else it is inferred from the tensor shapes (SD 1.x/2.x family,
  4- or 9-channel inputs);
- ``"unetkit"``: a unetkit checkpoint.

What a unetkit diffusion checkpoint knows besides the weights (its noise schedule, text
encoder, image size: the ``diffusion`` metadata that ``generate`` needs) travels through
every conversion: as ``unetkit.json`` beside a diffusers ``config.json`` (diffusers ignores
it) and as the ``unetkit_diffusion`` metadata entry of an LDM file.

Example:
    >>> model, diffusion = read_unet("unet_ldm.safetensors")                # doctest: +SKIP
    >>> write_unet(model, "unet_diffusers/", "diffusers", diffusion=diffusion)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import torch

from unetkit._atomic import atomic_write_text
from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats import checkpoint, diffusers, ldm
from unetkit.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig
from unetkit.registry import build_config

FORMATS = ("diffusers", "ldm", "unetkit")
SIDECAR_NAME = "unetkit.json"
LDM_DIFFUSION_KEY = "unetkit_diffusion"
_PICKLES = (".ckpt", ".pt", ".pth", ".bin")


def _open(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


def detect_unet_format(path: str | os.PathLike) -> str:
    """``"diffusers"`` (a folder), ``"unetkit"`` (our metadata) or ``"ldm"`` (LDM keys)."""
    path = Path(path)
    if path.is_dir():
        return "diffusers"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix != ".safetensors":
        what = "pickled " if path.suffix in _PICKLES else ""
        raise CheckpointError(
            f"{path}: only .safetensors files are read ({what}{path.suffix or 'suffix-less'} "
            f"files can run code when loaded); convert it with a trusted tool first"
        )
    keys, meta = _open(path)
    if meta.get("format") == checkpoint.FORMAT:
        return "unetkit"
    if any(k.startswith((ldm.PREFIX, "input_blocks.")) for k in keys):
        return "ldm"
    raise CheckpointError(
        f"{path}: neither a unetkit checkpoint nor an LDM U-Net (no model.diffusion_model.* "
        f"keys; found {keys[:3]}); pass --from to say what it is"
    )


def _shape(tensors: dict[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"{source}: no {ldm.PREFIX}{key}; not an LDM U-Net of the SD family")
    return tuple(tensors[key].shape)


def infer_ldm_config(
    tensors: dict[str, torch.Tensor], *, source: str = "file"
) -> DiffusionUNetConfig:
    """The SD-family U-Net config an LDM state dict was made with, from its shapes.

    Widths, blocks per level, attention levels, transformer depth, context width, linear
    projections and in/out channels (9 for SD-inpainting) are read off the tensors. Head
    counts are not visible in weights: SD 2.x (1024-wide context) uses 64-wide heads, SD 1.x
    8 heads, as in the original configs.
    """
    unet = {k.removeprefix(ldm.PREFIX): v for k, v in tensors.items()}
    conv_in = _shape(unet, "input_blocks.0.0.weight", source)
    out = _shape(unet, "out.2.weight", source)
    widths: list[int] = []
    attn: list[bool] = []
    blocks: list[int] = []
    k, count, has_attn = 1, 0, False
    while any(f"input_blocks.{k}.0.{leaf}.weight" in unet for leaf in ("op", "in_layers.2")):
        if f"input_blocks.{k}.0.op.weight" in unet:  # a down-sampler closes the level
            blocks.append(count)
            attn.append(has_attn)
            count, has_attn = 0, False
        else:
            if count == 0:
                widths.append(int(unet[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0]))
            count += 1
            has_attn = has_attn or f"input_blocks.{k}.1.proj_in.weight" in unet
        k += 1
    blocks.append(count)
    attn.append(has_attn)
    if not widths or len(set(blocks)) != 1:
        raise CheckpointError(
            f"{source}: cannot infer the U-Net layout (blocks per level {blocks})"
        )
    ctx = [v.shape[1] for kk, v in unet.items() if kk.endswith("attn2.to_k.weight")]
    mid = "middle_block.1.transformer_blocks."
    depth = len({kk[len(mid) :].split(".")[0] for kk in unet if kk.startswith(mid)})
    proj = unet.get("middle_block.1.proj_in.weight")
    context = int(ctx[0]) if ctx else None
    heads = dict(num_heads=None, head_dim=64) if context == 1024 else dict(num_heads=8)
    try:
        return DiffusionUNetConfig(
            in_channels=conv_in[1],
            out_channels=out[0],
            channels=tuple(widths),
            num_res_blocks=blocks[0],
            attention_levels=tuple(attn),
            cross_attention_dim=context,
            transformer_layers=max(depth, 1),
            use_linear_projection=proj is not None and proj.dim() == 2,
            **heads,
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: inferred U-Net config is invalid: {e}") from None


def _config_arg(spec: str | None) -> DiffusionUNetConfig | None:
    """``--config``: a diffusers config.json or a diffusion-unet preset name (None: detect)."""
    if not spec:
        return None
    if Path(spec).is_file():
        try:
            raw = json.loads(Path(spec).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"--config {spec}: not a JSON config file ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"--config {spec}: expected a JSON object (a diffusers config)")
        return diffusers.config_from_diffusers(raw)
    return build_config("diffusion-unet", preset=spec)


def read_unet(
    path: str | os.PathLike, fmt: str | None = None, *, config: str | None = None
) -> tuple[DiffusionUNet, dict[str, Any] | None]:
    """Load a diffusion U-Net from any of ``FORMATS`` (detected when ``fmt`` is None).

    Args:
        path: a diffusers folder / pipeline root, an LDM ``.safetensors`` or a checkpoint.
        fmt: the format if known. config: for LDM files only, an override of the config
            (a diffusers ``config.json`` or a preset name); default: the file's metadata,
            else inferred from the shapes.

    Returns:
        ``(model, diffusion)``: the model and the unetkit ``diffusion`` metadata the file
        carried (None for weights from other tools).
    """
    path = Path(path)
    fmt = fmt or detect_unet_format(path)
    if fmt == "diffusers":
        model = diffusers.load_diffusers_unet(path)
        folder = path / "unet" if (path / "unet" / diffusers.CONFIG_NAME).is_file() else path
        side = folder / SIDECAR_NAME
        return model, json.loads(side.read_text()).get("diffusion") if side.is_file() else None
    if fmt == "ldm":
        _, meta = _open(path)
        cfg = _config_arg(config)
        if cfg is None and "unetkit_config" not in meta:
            with safetensors.safe_open(str(path), framework="pt") as f:
                keys = [k for k in f.keys() if k.startswith(ldm.PREFIX)] or list(f.keys())  # noqa: SIM118
                shapes = {k: f.get_slice(k) for k in keys}
                tensors = {k: torch.empty(s.get_shape(), device="meta") for k, s in shapes.items()}
            cfg = infer_ldm_config(tensors, source=str(path))
        diffusion = json.loads(meta[LDM_DIFFUSION_KEY]) if LDM_DIFFUSION_KEY in meta else None
        return ldm.load_ldm_unet(path, cfg), diffusion
    model = checkpoint.load(path)
    if not isinstance(model, DiffusionUNet):
        raise CheckpointError(f"{path}: a {type(model).__name__} checkpoint, not a diffusion U-Net")
    return model, checkpoint.read_metadata(path).get("diffusion")


def write_unet(
    model: DiffusionUNet,
    dest: str | os.PathLike,
    fmt: str,
    *,
    diffusion: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as ``fmt`` (atomic), keeping the ``diffusion`` metadata if given."""
    dest = Path(dest)
    if fmt == "diffusers":
        out = diffusers.save_diffusers_unet(model, dest)
        if diffusion is not None:
            atomic_write_text(out / SIDECAR_NAME, json.dumps({"diffusion": diffusion}, indent=2))
        return out
    if fmt == "ldm":
        extra = {LDM_DIFFUSION_KEY: json.dumps(diffusion)} if diffusion is not None else None
        return ldm.save_ldm_unet(model, dest, extra_metadata=extra)
    if fmt == "unetkit":
        return checkpoint.save(model, dest, extra={"diffusion": diffusion} if diffusion else None)
    raise ConfigError(f"U-Net format {fmt!r}; choose from {FORMATS}")


__all__ = ["FORMATS", "detect_unet_format", "infer_ldm_config", "read_unet", "write_unet"]
