"""Hypothesis-fuzzed readers: damaged images and masks, hostile safetensors headers, LoRA
files and TOML configs. Each reader may accept its input or raise a unetkit error (one line
naming the file); anything else (an IndexError, a JSONDecodeError, a SafetensorError...)
is a bug. 500 examples each, small inputs, no deadline (the runner may be busy).
"""

from __future__ import annotations

import copy
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image

from unetkit.cli.main import build_parser
from unetkit.cli.train import recipe_from_args
from unetkit.data.io import read_image, to_float_image
from unetkit.data.masks import MASK_MODES, decode_mask
from unetkit.errors import UnetkitError
from unetkit.formats import checkpoint
from unetkit.formats.lora_files import load_adapter, read_adapter
from unetkit.registry import create_model
from unetkit.workflows.segment_train import SegmentationRecipe

# derandomize: the same 500 examples on every run, so CI never flakes on a new find; run
# with derandomize=False to explore further (each bug found that way became a fix)
FUZZ = settings(
    max_examples=500,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _one_line(error: UnetkitError) -> None:
    assert "\n" not in str(error).strip(), str(error)


# --- images ------------------------------------------------------------------------------
def _valid_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 5), np.uint8)
    out = {}
    for suffix, fmt in ((".png", "PNG"), (".jpg", "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(grey).save(buf, format=fmt)
        out[suffix] = buf.getvalue()
    buf = io.BytesIO()
    tifffile.imwrite(buf, rng.random((2, 6, 5)).astype(np.float32))
    out[".tif"] = buf.getvalue()
    return out


VALID = _valid_files()


@st.composite
def damaged_image(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[suffix])
    how = draw(st.sampled_from(["truncate", "flip", "splice", "random"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif how == "splice":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=64))
    else:
        data = data[:8] + draw(st.binary(max_size=256))
    return suffix, bytes(data)


@FUZZ
@given(damaged_image(), st.booleans())
def test_damaged_image_files(scratch: Path, case: tuple[str, bytes], palette: bool) -> None:
    suffix, data = case
    path = scratch / f"image{suffix}"
    path.write_bytes(data)
    try:
        to_float_image(read_image(path, palette_to_rgb=palette), path=path)
    except UnetkitError as e:
        _one_line(e)
        assert str(path) in str(e)


# --- masks -------------------------------------------------------------------------------
MASK_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float32, bool])


@FUZZ
@given(
    arrays(MASK_DTYPES, array_shapes(min_dims=1, max_dims=4, max_side=6)),
    st.integers(-1, 5),
    st.sampled_from(MASK_MODES),
    st.sampled_from([2, 3]),
)
def test_mask_arrays(arr: np.ndarray, num_classes: int, mode: str, dims: int) -> None:
    try:
        labels = decode_mask(arr, num_classes, path="m.png", mode=mode, spatial_dims=dims)
    except UnetkitError as e:
        _one_line(e)
        return
    assert labels.dtype == np.int64 and labels.ndim == dims


# --- safetensors headers -----------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9"]
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 300)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# small channels always: the default configs build 30M-parameter models (slow, not hostile)
CONFIG = st.fixed_dictionaries(
    {"channels": st.lists(st.integers(-2, 8), max_size=3)},
    optional={
        k: st.one_of(
            st.integers(-2, 9), st.lists(st.integers(-2, 9), max_size=3), st.text(max_size=5)
        )
        for k in ("in_channels", "out_channels", "norm", "dims", "x")
    },
)


@st.composite
def safetensors_file(draw) -> bytes:
    meta = {
        "format": draw(st.sampled_from(["unetkit-checkpoint", "other", ""])),
        "model": draw(st.sampled_from(["unet", "diffusion-unet", "sparkles"])),
        "config": draw(st.one_of(CONFIG.map(json.dumps), st.text(max_size=12))),
    }
    meta.update(draw(st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=2)))
    header: dict = {"__metadata__": meta}
    if draw(st.booleans()):
        header["__metadata__"] = draw(JSONISH)  # metadata that is not a str -> str map
    offset = 0
    for i in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = draw(st.integers(0, 64))
        header[f"t{i}"] = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": shape,
            "data_offsets": draw(st.sampled_from([[offset, offset + size], [size, offset]])),
        }
        offset += size
    text = json.dumps(header).encode()
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # a cut header
    length = draw(st.sampled_from([len(text), len(text) + 7, 2**60, 0]))
    return struct.pack("<Q", length) + text + draw(st.binary(max_size=offset + 8))


@FUZZ
@given(safetensors_file())
def test_safetensors_headers(scratch: Path, data: bytes) -> None:
    path = scratch / "model.safetensors"
    path.write_bytes(data)
    for reader in (checkpoint.read_metadata, checkpoint.load):
        try:
            reader(path)
        except UnetkitError as e:
            _one_line(e)
            assert str(path) in str(e)


# --- LoRA files --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "diffusion-unet", preset="tiny", channels=(8, 16), cross_attention_dim=8, norm_groups=4
    )


@st.composite
def lora_file(draw, modules: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for _ in range(draw(st.integers(0, 4))):
        module = draw(st.sampled_from([*modules, "nowhere.to_q", ""]))
        suffix = draw(
            st.sampled_from(
                ["lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "alpha"]
            )
        )
        prefix = draw(st.sampled_from(["", "unet.", "lora_unet_", "base_model.model."]))
        shape = draw(st.lists(st.integers(0, 9), max_size=4))
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64]))
        value = draw(st.sampled_from([0.0, 1.0, float("nan"), 1e30]))
        tensors[f"{prefix}{module}.{suffix}"] = torch.full(shape, value).to(dtype)
    meta = draw(
        st.dictionaries(
            st.sampled_from(["format", "alphas", "targets", "base_model", "rank"]),
            st.one_of(st.sampled_from(["unetkit-lora", "{}", "[1]", "{bad"]), st.text(max_size=8)),
            max_size=3,
        )
    )
    return tensors, meta


def _attention_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith(("to_q", "to_k", "to_out.0"))][:6]


@FUZZ
@given(st.data())
def test_lora_files(scratch: Path, lora_base: torch.nn.Module, data: st.DataObject) -> None:
    tensors, meta = data.draw(lora_file(_attention_modules(lora_base)))
    path = scratch / "lora.safetensors"
    try:
        safetensors.torch.save_file(tensors, str(path), metadata=meta)
    except Exception:  # noqa: BLE001 (safetensors refuses some inputs itself: not our reader)
        return
    try:
        read_adapter(path)
        load_adapter(copy.deepcopy(lora_base), path)
    except UnetkitError as e:
        _one_line(e)


# --- TOML configs ------------------------------------------------------------------------
FIELDS = [f for f in SegmentationRecipe.__dataclass_fields__] + ["epoks", "model_options"]
TOML_VALUE = st.one_of(
    st.integers(-3, 10).map(str),
    st.sampled_from(['"unet"', '"x"', "true", "nan", "inf", "1e400", "[1, 2]", "{a = 1}", "'''"]),
    st.text(max_size=6).map(json.dumps),
)


@st.composite
def toml_text(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    lines = [
        f"{draw(st.sampled_from(FIELDS))} = {draw(TOML_VALUE)}"
        for _ in range(draw(st.integers(0, 4)))
    ]
    if draw(st.booleans()):
        lines.insert(0, draw(st.sampled_from(["[model_options]", "[[x]]", "[", "channels ="])))
    return "\n".join(lines).encode()


@pytest.fixture(scope="module")
def parser():
    return build_parser("train")


@FUZZ
@given(toml_text())
def test_toml_configs(scratch: Path, parser, text: bytes) -> None:
    path = scratch / "config.toml"
    path.write_bytes(text)
    args = parser.parse_args(["train", "--config", str(path), "--out", str(scratch)])
    try:
        recipe_from_args(args)
    except UnetkitError as e:
        _one_line(e)
