"""LoRA files: unetkit/diffusers/Kohya layouts, lossless conversion, parity with diffusers+PEFT."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from unetkit.errors import CheckpointError, ConfigError
from unetkit.formats.lora_files import (
    Adapter,
    convert_adapter,
    detect_format,
    load_adapter,
    parse_adapter,
    read_adapter,
    save_adapter,
    verify_adapter,
)
from unetkit.formats.lora_kohya import to_kohya
from unetkit.formats.lora_layouts import from_diffusers
from unetkit.nn.lora import LoRALayer
from unetkit.nn.lora_inject import inject_lora, lora_layers
from unetkit.registry import create_model

ATTN_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _randomise_b(model: nn.Module, std: float = 0.1) -> None:
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, std)


def _tiny() -> nn.Module:
    torch.manual_seed(7)
    net = create_model(
        "diffusion-unet", preset="tiny", channels=(8, 16), cross_attention_dim=8, norm_groups=4
    )
    for p in net.parameters():  # the model zero-inits its output convs; make every weight count
        p.data.normal_(0.0, 0.2)
    return net


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(1, 4, 8, 8), torch.tensor([17]), torch.randn(1, 3, 8)


def _adapted() -> nn.Module:
    """A tiny U-Net with one adapter of mixed ranks and alphas (one alpha not a float32)."""
    net = _tiny()
    inject_lora(net, "attn+ff", r=4, alpha=2.0)
    inject_lora(net, "re:.*resnets\\.\\d+\\.conv[12]|.*conv_shortcut", r=2, alpha=0.3)
    net.get_submodule(ATTN_Q).alpha["default"] = 5.0
    _randomise_b(net)
    return net


def _assert_same_adapter(a: Adapter, b: Adapter) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k])
    assert a.alphas == b.alphas


def test_unetkit_kohya_diffusers_round_trips_are_bit_equal(tmp_path: Path) -> None:
    net = _adapted()
    first = save_adapter(net, tmp_path / "a.safetensors", targets=["attn+ff"], base_model="tiny")
    original = read_adapter(first)
    assert original.alphas[ATTN_Q] == 5.0 and original.info["targets"] == ["attn+ff"]
    assert original.alphas["down_blocks.0.resnets.0.conv1"] == 0.3
    kohya = convert_adapter(first, tmp_path / "k.safetensors", format="kohya")
    back = convert_adapter(kohya, tmp_path / "b.safetensors", format="unetkit")
    _assert_same_adapter(original, read_adapter(back))
    diff = convert_adapter(back, tmp_path / "d", format="diffusers")
    assert diff.name == "pytorch_lora_weights.safetensors"
    _assert_same_adapter(original, read_adapter(tmp_path / "d"))
    again = convert_adapter(tmp_path / "d", tmp_path / "k2.safetensors", format="kohya")
    assert safetensors.torch.load_file(again).keys() == safetensors.torch.load_file(kohya).keys()
    assert not list(tmp_path.glob("**/.*tmp"))  # atomic writes leave no temp files

    # the Kohya file itself: flattened names, lora_down/up, 0-d alpha, LoCon conv shapes
    k = safetensors.torch.load_file(kohya)
    flat = "lora_unet_" + ATTN_Q.replace(".", "_")
    assert k[f"{flat}.alpha"].dim() == 0 and float(k[f"{flat}.alpha"]) == 5.0
    assert torch.equal(k[f"{flat}.lora_down.weight"], original.tensors[f"{ATTN_Q}.lora_A.weight"])
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert k[f"{conv}.lora_down.weight"].shape == (2, 8, 3, 3)
    assert k[f"{conv}.lora_up.weight"].shape == (8, 2, 1, 1)
    assert detect_format(k) == "kohya"


def test_foreign_kohya_names_resolve_by_vocabulary_and_by_model() -> None:
    net = _adapted()
    adapter = read_adapter_from_model(net)
    tensors, _ = to_kohya(adapter)  # as Kohya's scripts write it: no unetkit metadata
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha") or "attn1" in k}
    parsed = parse_adapter(tensors)  # diffusers vocabulary, no model
    assert parsed.tensors.keys() == adapter.tensors.keys()
    # a missing alpha means alpha = rank (scale 1)
    assert parsed.alphas["mid_block.resnets.0.conv2"] == 2.0 and parsed.alphas[ATTN_Q] == 5.0

    custom = nn.Module()
    custom.my_block = nn.Sequential(nn.Linear(3, 3))
    custom.my_block.add_module("conv_a", nn.Conv1d(3, 3, 1))
    inject_lora(custom, "*", r=1)
    kt, _ = to_kohya(read_adapter_from_model(custom))
    assert sorted(parse_adapter(kt).modules) == ["my.block.0", "my.block.conv.a"]  # ambiguous
    assert load_adapter(copy.deepcopy(custom), kt, adapter_name="k") == [
        "my_block.0",
        "my_block.conv_a",
    ]


def read_adapter_from_model(net: nn.Module) -> Adapter:
    from unetkit.formats.lora_files import adapter_from_model

    return adapter_from_model(net)


def test_diffusers_layout_reads_older_key_spellings_and_alpha_metadata() -> None:
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    old = {
        "unet.x.attn1.processor.to_out_lora.down.weight": a,
        "unet.x.attn1.processor.to_out_lora.up.weight": b,
        "unet.x.attn2.to_k.lora.down.weight": a,
        "unet.x.attn2.to_k.lora.up.weight": b,
    }
    assert detect_format(old) == "diffusers"
    parsed = from_diffusers(old)
    assert sorted(parsed.modules) == ["x.attn1.to_out.0", "x.attn2.to_k"]
    assert parsed.alphas == {"x.attn1.to_out.0": 2.0, "x.attn2.to_k": 2.0}  # no metadata: = rank
    meta = {"unet.lora_alpha": 8, "unet.alpha_pattern": {"^x\\.attn2\\.to_k": 3}}
    assert from_diffusers(old, meta).alphas == {"x.attn1.to_out.0": 8.0, "x.attn2.to_k": 3.0}
    te = {"text_encoder.q.lora_A.weight": a, "text_encoder.q.lora_B.weight": b}
    both = from_diffusers({**old, **te})  # text-encoder parts are kept apart, not dropped
    assert sorted(both.modules) == sorted(parsed.modules)
    assert list(both.others) == ["text_encoder"] and both.others["text_encoder"].modules == ["q"]
    with pytest.raises(CheckpointError, match=r"\[text_encoder\]: .*q\.lora_B\.weight"):
        from_diffusers({**old, "text_encoder.q.lora_A.weight": a})
    with pytest.raises(CheckpointError, match="not a LoRA state dict"):
        detect_format({"conv.weight": a})


def test_load_adapter_errors_list_unmatched_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = _adapted()
    path = save_adapter(net, tmp_path / "a.safetensors", format="kohya")
    tensors = safetensors.torch.load_file(path)
    te = {"lora_te_text_model_q.lora_down.weight": torch.zeros(2, 4)}
    with pytest.raises(CheckpointError, match="lora_te_text_model_q"):
        load_adapter(_tiny(), {**tensors, **te})
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match=f"{ATTN_Q}.lora_A.weight"):
        load_adapter(other, path, strict=False)  # nothing matches: always an error
    half = {k: v for k, v in tensors.items() if "up_blocks" not in k}
    target = _tiny()
    del target.up_blocks  # the adapter's up_blocks keys now match nothing
    with pytest.raises(CheckpointError, match=r"32 of 61 .*up_blocks\.0\.attentions\.0\.\S+"):
        load_adapter(target, path)
    with caplog.at_level(logging.WARNING):
        loaded = load_adapter(target, path, strict=False)
    assert "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight" in caplog.text
    assert len(loaded) == len(half) // 3
    with pytest.raises(CheckpointError, match="no such LoRA file"):
        read_adapter(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_adapter(tmp_path / "bad.safetensors")
    good = safetensors.torch.load_file(save_adapter(net, tmp_path / "u.safetensors"))
    meta = {"format": "unetkit-lora", "alphas": "{not json"}
    safetensors.torch.save_file(good, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="m.safetensors: metadata 'alphas' is not valid JSON"):
        read_adapter(tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="did you mean 'kohya'"):
        save_adapter(net, tmp_path / "x.safetensors", format="kohyaa")


def test_loaded_adapter_reproduces_outputs_and_verify_reports(tmp_path: Path) -> None:
    net = _adapted()
    x, t, ctx = _inputs()
    fresh = _tiny()
    with torch.no_grad():
        want, base = net(x, t, ctx), fresh(x, t, ctx)
        report = verify_adapter(fresh, save_adapter(net, tmp_path / "v.safetensors"), (x, t, ctx))
        assert not lora_layers(fresh) and torch.equal(fresh(x, t, ctx), base)  # left untouched
    assert report["modules_touched"] == len(lora_layers(net)) and not report["unmatched_modules"]
    assert report["ranks"] == [2, 4]
    assert report["relative_change"] == pytest.approx(_rel(want, base), rel=1e-5)
    assert report["relative_change"] > 1e-3
    for fmt in ("unetkit", "kohya", "diffusers"):
        path = save_adapter(net, tmp_path / f"{fmt}.safetensors", format=fmt)
        fresh = _tiny()
        load_adapter(fresh, path)
        with torch.no_grad():
            assert torch.equal(fresh(x, t, ctx), want), fmt


def test_grouped_conv_adapter_round_trip(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2))
    inject_lora(net, "0", r=4)
    _randomise_b(net)
    path = save_adapter(net, tmp_path / "g.safetensors", format="kohya")
    fresh = nn.Sequential(copy.deepcopy(net[0].base_layer))
    load_adapter(fresh, path)
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(fresh(x), net(x))
    assert isinstance(fresh[0], LoRALayer)
    bad = {"0.lora_A.weight": torch.zeros(4, 4, 3, 3), "0.lora_B.weight": torch.zeros(8, 2, 1, 1)}
    with pytest.raises(CheckpointError, match="shapes"):  # PEFT's ungrouped-A layout
        load_adapter(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), bad)


# --- parity with the reference implementation (diffusers + PEFT) ----------------------------
SMALL = dict(
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=12,
    norm_num_groups=8,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(1)
    ref = diffusers.UNet2DConditionModel(**SMALL).eval()
    for p in ref.parameters():
        p.data.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("ref")
    ref.save_pretrained(folder)
    return ref, folder


def _ours(folder: Path) -> nn.Module:
    from unetkit.formats.diffusers import load_diffusers_unet

    return load_diffusers_unet(folder)


def _ref_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([3, 801]),
        torch.randn(2, 5, 12, generator=g),
    )


@pytest.mark.compare
@pytest.mark.parametrize("model", ["DiffusionUNet", "copy of the diffusers U-Net"])
def test_our_files_load_in_diffusers_with_identical_outputs(
    reference: tuple[nn.Module, Path], tmp_path: Path, model: str
) -> None:
    """Adapters made by unetkit (on our U-Net, or injected into diffusers' own module tree)
    give diffusers+PEFT the same per-layer scales and the same outputs."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

    ref, folder = reference
    ours = _ours(folder) if model == "DiffusionUNet" else copy.deepcopy(ref)
    inject_lora(ours, "attn+ff", r=4, alpha=2.0)
    inject_lora(ours, "re:.*resnets\\.\\d+\\.conv[12]", r=2, alpha=6.0)
    ours.get_submodule(FF).alpha["default"] = 7.0  # a third alpha: needs a per-module pattern
    _randomise_b(ours, 0.3)
    x, t, ctx = _ref_inputs()
    with torch.no_grad():
        want = ours(x, t, ctx)
        want = getattr(want, "sample", want)  # diffusers returns an output dataclass
        assert _rel(want, ref(x, t, ctx).sample) > 1e-2  # the adapter matters
    scales = {n: m.scaling("default") for n, m in lora_layers(ours).items()}
    assert sorted(set(scales.values())) == [0.5, 1.75, 3.0]

    def check(theirs: nn.Module, adapter: str) -> None:
        got = {n: theirs.get_submodule(n).scaling[adapter] for n in scales}
        assert got == scales
        with torch.no_grad():
            assert _rel(theirs(x, t, ctx).sample, want) < 1e-5

    # (a) PEFT/diffusers layout, loaded by diffusers' own U-Net loader (alpha from metadata)
    save_adapter(ours, tmp_path / "lora", format="diffusers")
    theirs = copy.deepcopy(ref)
    theirs.load_lora_adapter(
        str(tmp_path / "lora"),
        weight_name="pytorch_lora_weights.safetensors",
        prefix="unet",
        adapter_name="d",
    )
    check(theirs, "d")

    # (b) Kohya layout through diffusers' Kohya conversion (alpha as network_alphas)
    kohya = save_adapter(ours, tmp_path / "kohya.safetensors", format="kohya")
    state, alphas = Loader.lora_state_dict(str(kohya))
    theirs = copy.deepcopy(ref)
    Loader.load_lora_into_unet(state, alphas, theirs, adapter_name="k")
    check(theirs, "k")


@pytest.mark.compare
def test_diffusers_trained_adapter_loads_into_unetkit(
    reference: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref, folder = reference
    theirs = copy.deepcopy(ref)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "conv2"]
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _randomise_b(theirs, 0.3)
    # what diffusers' LoRA training scripts do to save
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(theirs))
    Loader.save_lora_weights(
        tmp_path / "trained",
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=theirs.peft_config["default"].to_dict(),
    )
    ours = _ours(folder)
    loaded = load_adapter(ours, tmp_path / "trained")
    assert len(loaded) == len(layers) // 2 and ATTN_Q in loaded
    x, t, ctx = _ref_inputs()
    with torch.no_grad():
        want = theirs(x, t, ctx).sample
        assert _rel(want, ref(x, t, ctx).sample) > 1e-2
        assert _rel(ours(x, t, ctx), want) < 1e-5
    meta = safetensors.safe_open(
        str(tmp_path / "trained" / "pytorch_lora_weights.safetensors"), "pt"
    ).metadata()
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8
