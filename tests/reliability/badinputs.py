"""A zoo of good and bad inputs, generated at test time (no checked-in binaries).

Good files (a tiny segmentation checkpoint, a tiny diffusion checkpoint, a LoRA adapter, a
labelled folder) are built with unetkit's own writers; bad ones are derived from them the
way a user would end up with them: truncated, emptied, pickled, edited, NaN-filled.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import tifffile
import torch
from PIL import Image

from unetkit.data.synthetic import write_synthetic_folder
from unetkit.diffusion.schedules import NoiseSchedule
from unetkit.formats import checkpoint
from unetkit.formats.lora_files import save_adapter
from unetkit.nn.lora_inject import inject_lora
from unetkit.registry import create_model
from unetkit.workflows.diffuse_train import diffusion_metadata, make_diffusion_recipe

SEG_META = {"task": "segmentation", "target": "boundary", "normalize": "zscore", "num_classes": 2}


@dataclass(frozen=True)
class Zoo:
    root: Path
    seg: Path  # a segmentation checkpoint (unet, random weights)
    diff: Path  # a text-to-image diffusion checkpoint (tiny, minilm-sized context)
    adapter: Path  # a LoRA adapter for ``diff``
    nan_adapter: Path
    nan_seg: Path
    data: Path  # images/ + masks/
    grey: Path  # a 32x32 grey PNG
    mask: Path  # a 32x32 mask PNG (white square)


def _edit_metadata(src: Path, dst: Path, **changes: str) -> Path:
    tensors = safetensors.torch.load_file(str(src))
    with safetensors.safe_open(str(src), framework="pt") as f:
        meta = {**(f.metadata() or {}), **changes}
    safetensors.torch.save_file(tensors, str(dst), metadata=meta)
    return dst


def build_zoo(root: Path) -> Zoo:
    torch.manual_seed(0)
    seg = create_model("unet", channels=(4, 8), out_channels=3)
    checkpoint.save(seg, root / "seg.safetensors", extra=SEG_META)
    nan = {k: v.clone() for k, v in seg.state_dict().items()}
    first = next(k for k, v in nan.items() if v.is_floating_point())
    nan[first].view(-1)[0] = float("nan")
    seg.load_state_dict(nan)
    checkpoint.save(seg, root / "nan_seg.safetensors", extra=SEG_META)

    recipe = make_diffusion_recipe("digits", size=16, max_length=8, text_encoder="minilm")
    diff = create_model(
        "diffusion-unet",
        preset="tiny",
        channels=(8, 16),
        norm_groups=4,
        in_channels=1,
        out_channels=1,
        cross_attention_dim=384,
    )
    extra = diffusion_metadata(recipe, NoiseSchedule(num_train_timesteps=100), 1)
    checkpoint.save(diff, root / "diff.safetensors", extra=extra)
    inject_lora(diff, ["attn"], r=2)
    for name, p in diff.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, 0.1)
    save_adapter(diff, root / "adapter.safetensors", targets=["attn"])
    b = next(p for n, p in diff.named_parameters() if ".lora_B." in n)
    b.data.view(-1)[0] = float("inf")
    save_adapter(diff, root / "nan_adapter.safetensors", targets=["attn"])

    write_synthetic_folder(root / "data", 3, shape=(32, 32), seed=1)
    grey = root / "grey.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), np.uint8)).save(grey)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return Zoo(
        root,
        root / "seg.safetensors",
        root / "diff.safetensors",
        root / "adapter.safetensors",
        root / "nan_adapter.safetensors",
        root / "nan_seg.safetensors",
        root / "data",
        grey,
        root / "mask.png",
    )


# --- bad files, made on demand in a case's folder -----------------------------------------
def pickled(path: Path) -> Path:
    """A pickled state dict, as torch.save writes it (never loaded by unetkit)."""
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    return path


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def empty(dst: Path) -> Path:
    dst.write_bytes(b"")
    return dst


def huge_header(dst: Path) -> Path:
    """A safetensors file whose header claims 2**60 bytes."""
    dst.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    return dst


def edited(src: Path, dst: Path, **changes: str) -> Path:
    return _edit_metadata(src, dst, **changes)


def nan_tiff(dst: Path, shape: tuple[int, ...] = (32, 32)) -> Path:
    arr = np.random.default_rng(0).random(shape).astype(np.float32)
    arr[3, 3] = np.nan
    tifffile.imwrite(dst, arr)
    return dst


def garbage(dst: Path, n: int = 64) -> Path:
    dst.write_bytes(bytes(range(n)))
    return dst


def json_file(dst: Path, obj: object) -> Path:
    dst.write_text(json.dumps(obj))
    return dst


# --- the byte-identity check ----------------------------------------------------------------
def snapshot(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under ``roots`` (symlinks not followed)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --- round 2 helpers (tests/reliability/test_bad_inputs_sweep.py) ----------------------------
def tiny_sd_pipeline(folder: Path) -> Path:
    """A tiny random Stable Diffusion pipeline folder (diffusers' own writer), or skip."""
    import importlib.util
    import sys

    import pytest

    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    if "sd_tiny" not in sys.modules:
        where = Path(__file__).parents[1] / "workflows" / "sd_tiny.py"
        spec = importlib.util.spec_from_file_location("sd_tiny", where)
        sys.modules["sd_tiny"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["sd_tiny"])
    sys.modules["sd_tiny"].save_pipeline(folder)
    return folder


def edit_json(path: Path, **changes: object) -> Path:
    """Set keys of a JSON object file (a diffusers config) in place."""
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))
    return path


def grey_png(path: Path, shape: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, np.uint8)).save(path)
    return path
