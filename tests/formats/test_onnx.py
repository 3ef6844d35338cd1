"""ONNX export: dynamic batch/H/W proven with onnxruntime against eager PyTorch; metadata;
clear errors for families a trace cannot generalise; torch.export programs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import unetkit
from unetkit import config as cfg
from unetkit import registry
from unetkit.errors import CheckpointError, ConfigError, InputSizeError
from unetkit.formats.onnx import (
    OnnxModel,
    _normalize_transpose_perms,
    example_size,
    export_onnx,
    read_onnx_metadata,
)
from unetkit.formats.torch_export import export_torch, load_torch_export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# families whose shape logic is tensor arithmetic (dynamic H/W export works) vs Python
# window/position-embedding sizes that a trace fixes (dynamic export refused, clearly)
NOT_DYNAMIC = {"swin_unet", "transunet"}


def _tiny(name: str, dims: int = 2, **extra: object) -> torch.nn.Module:
    overrides = dict(registry.get_entry(name).test_overrides)
    overrides.update(dims=dims, in_channels=2, out_channels=3, **extra)
    torch.manual_seed(0)
    return unetkit.create_model(name, **overrides).eval()


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Independent of the library's own check: float64 max |a - b| / max |b|."""
    assert got.shape == want.shape
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def _agree(model: torch.nn.Module, exported: OnnxModel, sizes: list[tuple[int, ...]]) -> None:
    for i, size in enumerate(sizes):
        x = torch.randn(3 - i, model.in_channels, *size)  # batch 3 then 2: also dynamic
        with torch.inference_mode():
            want = model(x)
        assert _max_rel(exported(x), want) < 1e-4, size


EXTRA = {"normalize": "zscore", "target": "boundary", "seed_threshold": 0.4}


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = _tiny("unet", channels=(4, 8, 16))
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "u.onnx", metadata=EXTRA)


def test_unet_exports_with_dynamic_batch_height_width(
    unet_export: tuple[torch.nn.Module, Path],
) -> None:
    model, path = unet_export
    graph_in = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in graph_in] == ["batch", "", "height", "width"]
    assert graph_in[1].dim_value == 2
    exported = OnnxModel(path)
    assert example_size(model) == (33, 33)
    # two sizes other than the export size: odd, even, multiples of the stride and not
    _agree(model, exported, [(19, 23), (40, 28)])


@pytest.mark.parametrize("dims", [1, 3])
def test_unet_other_dims_dynamic(dims: int, tmp_path: Path) -> None:
    model = _tiny("unet", dims=dims, channels=(4, 8))
    size = {1: (33,), 3: (13, 11, 15)}[dims]
    exported = OnnxModel(export_onnx(model, tmp_path / "m.onnx", size=size))
    sizes = {1: [(29,), (64,)], 3: [(9, 11, 7), (12, 8, 10)]}[dims]
    _agree(model, exported, sizes)


def test_valid_padding_unet_keeps_its_size_planner(tmp_path: Path) -> None:
    model = _tiny("unet", channels=(4, 8, 16), padding="valid")
    exported = OnnxModel(export_onnx(model, tmp_path / "valid.onnx"))
    assert exported.is_valid_padding and exported.margin() == model.margin()
    sizes = [model.nearest_valid_input((61, 70)), model.nearest_valid_input((90, 77))]
    assert len(set(sizes) | {example_size(model)}) == 3
    _agree(model, exported, sizes)
    with pytest.raises(InputSizeError, match="nearest valid"):
        exported(torch.randn(1, 2, 61, 61))  # the planner's error, before onnxruntime


def test_metadata_round_trip(unet_export: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    model, path = unet_export
    extra = EXTRA
    meta = read_onnx_metadata(path)
    assert meta["model"] == "unet"
    assert cfg.from_dict(type(model.config), meta["config"]) == model.config
    assert meta["unetkit_version"] == unetkit.__version__
    assert {k: meta[k] for k in extra} == extra
    assert meta["onnx"] == {
        "dynamic_spatial": True,
        "size": [33, 33],
        "opset": 17,
        "exporter": "torchscript",
    }
    loaded = OnnxModel(path)
    assert loaded.config == model.config and loaded.dims == 2
    assert list(loaded.parameters()) == []  # tiling runs it on the CPU in float32
    with pytest.raises(ConfigError, match="reserved"):
        export_onnx(model, tmp_path / "x.onnx", metadata={"config": 1})


def test_family_that_cannot_trace_dynamically_is_refused_clearly(tmp_path: Path) -> None:
    target = tmp_path / "swin.onnx"
    target.write_bytes(b"previous file")
    with pytest.raises(ConfigError, match="does not generalise to other spatial sizes"):
        export_onnx(_tiny("swin_unet"), target, size=(33, 35))
    assert target.read_bytes() == b"previous file"  # atomic: nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["swin.onnx"]  # no temp file left


def test_static_export_fixes_size_keeps_batch_dynamic(tmp_path: Path) -> None:
    model = _tiny("transunet")
    path = export_onnx(model, tmp_path / "t.onnx", dynamic_spatial=False, size=(33, 35))
    exported = OnnxModel(path)
    assert exported.fixed_size == (33, 35)
    _agree(model, exported, [(33, 35), (33, 35)])
    with pytest.raises(InputSizeError, match=r"exported for spatial size \(33, 35\)"):
        exported(torch.randn(1, 2, 40, 40))


def test_too_small_input_is_an_input_size_error(unet_export: tuple[torch.nn.Module, Path]) -> None:
    # reflect padding up to the stride (4) cannot mirror a 2-pixel axis
    exported = OnnxModel(unet_export[1])
    with pytest.raises(InputSizeError, match="onnxruntime cannot run input"):
        exported(torch.randn(1, 2, 2, 17))


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(CheckpointError, match="bad.onnx"):
        OnnxModel(bad)
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        read_onnx_metadata(tmp_path / "missing.onnx")


def test_negative_transpose_perm_is_normalised() -> None:
    # the TorchScript exporter writes movedim(1, -1) as perm [0, -1, 1]-style axes
    from onnx import TensorProto, helper

    node = helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, -1, 1])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _normalize_transpose_perms(proto)
    assert list(proto.graph.node[0].attribute[0].ints) == [0, 2, 3, 1]
    x = np.random.rand(2, 3, 4, 5).astype(np.float32)
    (y,) = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(y, x.transpose(0, 2, 3, 1))


def test_torch_export_program(tmp_path: Path) -> None:
    model = _tiny("unet", channels=(4, 8))
    path = export_torch(model, tmp_path / "m.pt2", size=(24, 20), metadata={"normalize": "none"})
    loaded = load_torch_export(path)
    assert loaded.meta["model"] == "unet" and loaded.meta["normalize"] == "none"
    for batch in (1, 3):
        x = torch.randn(batch, 2, 24, 20)
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputSizeError, match=r"\(24, 20\)"):
        loaded(torch.randn(1, 2, 30, 20))
    with pytest.raises(CheckpointError):
        load_torch_export(tmp_path / "nothing.pt2")


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.list_models(task="segmentation"))
def test_every_segmentation_model_exports_or_says_why(name: str, tmp_path: Path) -> None:
    for dims in registry.get_entry(name).dims:
        model = _tiny(name, dims=dims)
        if name in NOT_DYNAMIC:
            with pytest.raises(ConfigError, match="does not generalise"):
                export_onnx(model, tmp_path / "m.onnx")
            continue
        # check=False: _agree below is the (independent) check, at sizes >= every stride
        exported = OnnxModel(export_onnx(model, tmp_path / "m.onnx", check=False))
        sizes = {1: [(29,), (48,)], 2: [(19, 23), (40, 28)], 3: [(17, 18, 19), (20, 16, 17)]}
        _agree(model, exported, sizes[dims])


@pytest.mark.slow
def test_dynamo_exporter_static(tmp_path: Path) -> None:
    model = _tiny("unet", channels=(4, 8))
    with pytest.raises(ConfigError, match="dynamic_spatial=False"):
        export_onnx(model, tmp_path / "d.onnx", exporter="dynamo")
    path = export_onnx(model, tmp_path / "d.onnx", exporter="dynamo", dynamic_spatial=False)
    assert read_onnx_metadata(path)["onnx"]["opset"] == 18  # the dynamo exporter's minimum
    _agree(model, OnnxModel(path), [(33, 33), (33, 33)])
