"""Original single-file Stable Diffusion checkpoints (``v1-5-pruned-emaonly.safetensors``).

One ``.safetensors`` holds the U-Net under ``model.diffusion_model.`` (LDM names, see
``unetkit.formats.ldm``), the VAE under ``first_stage_model.`` (LDM names, renamed here by a
table derived from the diffusers ``AutoencoderKL`` config) and the CLIP text encoder under
``cond_stage_model.transformer.`` (transformers' own names). Configs are read from the
file's metadata when unetkit wrote it, else inferred from the tensor shapes (SD 1.x
family). The file holds no tokenizer: pass a tokenizer folder. Its sampler is SD 1.x's
(DDIM, scaled-linear β 0.00085…0.012, leading spacing with offset 1) unless the metadata
names one. SD 2.x files (OpenCLIP text encoder) are refused with a message.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from unetkit import config as cfg
from unetkit._atomic import atomic_path
from unetkit.errors import CheckpointError
from unetkit.formats import ldm
from unetkit.formats.checkpoint import unwrap
from unetkit.formats.sd_files import SDFiles, check_components
from unetkit.formats.unet_files import read_unet
from unetkit.runtime import fastpath

VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SCALING_FACTOR = 0.18215  # SD 1.x/2.x latent scale
SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
_RES = {"conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, n_up: int) -> str:
    """diffusers ``AutoencoderKL`` key → LDM key (without ``first_stage_model.``)."""
    k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", key)
    k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
    k = re.sub(
        r"up_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m: f"up.{n_up - 1 - int(m[1])}.block.{m[2]}.",
        k,
    )
    k = re.sub(
        r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.", k
    )
    k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    for ours, theirs in _ATTN.items():
        k = k.replace(f"mid_block.attentions.0.{ours}.", f"mid.attn_1.{theirs}.")
    for ours, theirs in _RES.items():
        k = k.replace(f".{ours}.", f".{theirs}.")
    return k.replace("conv_norm_out.", "norm_out.")


def _vae_table(vae: torch.nn.Module) -> dict[str, str]:
    n_up = len(vae.config.block_out_channels)
    return {k: _vae_key(k, n_up) for k in vae.state_dict()}


def _infer_vae_config(t: dict[str, torch.Tensor]) -> dict[str, Any]:
    n = len({k.split(".")[2] for k in t if k.startswith("encoder.down.")})
    widths = [int(t[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)]
    blocks = len({k.split(".")[4] for k in t if k.startswith("encoder.down.0.block.")})
    return dict(
        in_channels=int(t["encoder.conv_in.weight"].shape[1]),
        out_channels=int(t["decoder.conv_out.weight"].shape[0]),
        block_out_channels=widths,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=blocks,
        latent_channels=int(t["post_quant_conv.weight"].shape[1]),
    )


def _infer_clip_config(t: dict[str, torch.Tensor]) -> dict[str, Any]:
    emb = t["text_model.embeddings.token_embedding.weight"]
    layers = {k.split(".")[3] for k in t if k.startswith("text_model.encoder.layers.")}
    return dict(
        vocab_size=int(emb.shape[0]),
        hidden_size=int(emb.shape[1]),
        num_attention_heads=int(emb.shape[1]) // 64,
        num_hidden_layers=len(layers),
        intermediate_size=int(t["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        max_position_embeddings=int(t["text_model.embeddings.position_embedding.weight"].shape[0]),
    )


def is_single_file(path: str | os.PathLike) -> bool:
    """A ``.safetensors`` with a U-Net and a VAE in LDM names (a full SD checkpoint)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())  # noqa: SIM118
    except (safetensors.SafetensorError, OSError):
        return False
    return any(k.startswith(ldm.PREFIX) for k in keys) and any(
        k.startswith(VAE_PREFIX) for k in keys
    )


def _part(f: Any, keys: list[str], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: f.get_tensor(k) for k in keys if k.startswith(prefix)}


def _load_tokenizer(tokenizer: str | os.PathLike | None, path: Path) -> Any:
    from transformers import CLIPTokenizer

    if tokenizer is None:
        raise CheckpointError(
            f"{path}: a single-file checkpoint carries no tokenizer; pass --tokenizer FOLDER "
            f"(the tokenizer/ folder of a diffusers pipeline: vocab.json + merges.txt)"
        )
    try:
        return CLIPTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{tokenizer}: not a CLIP tokenizer folder ({e})") from None


def load_single_file(
    path: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None,
    frozen_dtype: torch.dtype | None = None,
) -> SDFiles:
    """Load an original SD 1.x-family single-file checkpoint into ``SDFiles``.

    Args:
        path: the ``.safetensors`` file. tokenizer: a CLIP tokenizer folder.
        frozen_dtype: store the U-Net's weights as the CPU fast path's frozen copy keeps
            them (``runtime.fastpath.cast_weights``), for a U-Net run only at that precision.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    tok = _load_tokenizer(tokenizer, path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata() or {}, list(f.keys())  # noqa: SIM118
        if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
            raise CheckpointError(
                f"{path}: an SD 2.x checkpoint (OpenCLIP text encoder under {OPENCLIP_PREFIX}); "
                f"only SD 1.x single files are read: convert it to a diffusers folder first"
            )
        vae_t, clip_t = _part(f, keys, VAE_PREFIX), _part(f, keys, CLIP_PREFIX)
    clip_t = {
        ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in clip_t.items()
    }
    if not vae_t or not clip_t:
        what = "VAE (first_stage_model.*)" if not vae_t else "text encoder (cond_stage_model.*)"
        raise CheckpointError(f"{path}: a single-file checkpoint without its {what}")
    unet, _ = read_unet(path, "ldm")
    if frozen_dtype is not None:  # float32 weights released one by one
        fastpath.cast_weights(unet, frozen_dtype)
    vae_cfg = json.loads(meta["unetkit_vae_config"]) if "unetkit_vae_config" in meta else None
    vae = AutoencoderKL(**(vae_cfg or _infer_vae_config(vae_t)))
    table = _vae_table(vae)
    missing = sorted(v for v in table.values() if v not in vae_t)
    if missing:
        raise CheckpointError(f"{path}: VAE keys missing: {[VAE_PREFIX + k for k in missing[:5]]}")
    ref = vae.state_dict()
    vae.load_state_dict({k: vae_t[v].reshape(ref[k].shape) for k, v in table.items()})
    clip_cfg = json.loads(meta["unetkit_text_config"]) if "unetkit_text_config" in meta else None
    te = CLIPTextModel(CLIPTextConfig(**(clip_cfg or _infer_clip_config(clip_t))))
    clip_t.pop("text_model.embeddings.position_ids", None)  # a buffer in older transformers
    if not any(k.startswith("text_model.") for k in te.state_dict()):  # transformers >= 5
        clip_t = {k.removeprefix("text_model."): v for k, v in clip_t.items()}
    try:
        te.load_state_dict(clip_t)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: text encoder weights do not fit CLIP ({e})") from None
    sched = json.loads(meta["unetkit_scheduler"]) if "unetkit_scheduler" in meta else SD_SCHEDULER
    scaling = float(meta.get("unetkit_vae_scaling_factor", SCALING_FACTOR))
    vae.register_to_config(scaling_factor=scaling)
    files = SDFiles(unet, vae.eval(), te.eval(), tok, dict(sched), str(path))
    files.unet_sample_size = int(meta.get("unetkit_sample_size", 64))
    check_components(files)
    return files


def save_single_file(files: SDFiles, path: str | os.PathLike) -> Path:
    """Write ``files`` (U-Net, VAE, text encoder) as one original-layout ``.safetensors``
    (atomic); configs, scheduler and VAE scale go into its metadata."""
    path = Path(path)
    unet = unwrap(files.unet)
    tensors = dict(ldm.diffusers_to_ldm(unet.state_dict(), unet.config))
    state = files.vae.state_dict()
    for ours, theirs in _vae_table(files.vae).items():
        v = state[ours]
        if ".mid.attn_1." in theirs and theirs.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # LDM's attention projections are 1×1 convs
        tensors[VAE_PREFIX + theirs] = v
    for k, v in files.text_encoder.state_dict().items():  # the original names: text_model.*
        tensors[CLIP_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    vae_cfg = {k: v for k, v in dict(files.vae.config).items() if not k.startswith("_")}
    clip_cfg = files.text_encoder.config.to_diff_dict()
    meta = {
        "format": "pt",
        "unetkit_vae_config": json.dumps({k: vae_cfg[k] for k in _VAE_KEYS if k in vae_cfg}),
        "unetkit_text_config": json.dumps({k: clip_cfg[k] for k in _CLIP_KEYS if k in clip_cfg}),
        "unetkit_scheduler": json.dumps(files.scheduler_config),
        "unetkit_vae_scaling_factor": repr(float(files.vae.config.scaling_factor)),
        "unetkit_sample_size": str(files.unet_sample_size),
    }
    meta.update(_unet_meta(unet))
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    return path


_VAE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "act_fn",
    "sample_size",
)
_CLIP_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "projection_dim",
)


def _unet_meta(unet: torch.nn.Module) -> dict[str, str]:
    return {"unetkit_config": cfg.to_json(unet.config)}
