"""LoRA files as the reference tools write them, each made here with the real library.

Every file below is written by diffusers 0.42 / PEFT 0.21 (or, for Kohya sd-scripts and
LyCORIS, with their documented key scheme and loaded by diffusers' own Kohya converter), and
the adapted outputs are compared with the library's own adapted model within 1e-5.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from unetkit.errors import CheckpointError
from unetkit.formats.lora_files import load_adapter, read_adapter
from unetkit.nn.lora_inject import lora_layers

pytestmark = pytest.mark.compare
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

SMALL = dict(
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=16,
    norm_num_groups=8,
)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, nn.Module]:
    """A random diffusers U-Net (also saved as a folder) and a tiny random CLIP text model."""
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**SMALL).eval()
    for p in unet.parameters():
        p.data.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(folder)
    config = transformers.CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=12,
    )
    te = transformers.CLIPTextModel(config).eval()
    return unet, folder, te


def _ours(folder: Path) -> nn.Module:
    from unetkit.formats.diffusers import load_diffusers_unet

    return load_diffusers_unet(folder)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([3, 801]),
        torch.randn(2, 5, 16, generator=g),
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _randomise_b(model: nn.Module, std: float = 0.3) -> None:
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0.0, std)


def _unet_parity(ours: nn.Module, theirs: nn.Module, ref: nn.Module) -> None:
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = theirs(x, t, ctx).sample
        assert _rel(want, ref(x, t, ctx).sample) > 1e-2  # the adapter matters
        assert _rel(ours(x, t, ctx), want) < 1e-5


def _te_parity(ours: nn.Module, theirs: nn.Module, ref: nn.Module) -> None:
    ids = torch.tensor([[0, 5, 9, 17, 33, 63, 2]])
    with torch.no_grad():
        want = theirs(ids).last_hidden_state
        assert _rel(want, ref(ids).last_hidden_state) > 1e-2
        assert _rel(ours(ids).last_hidden_state, want) < 1e-5


def test_save_lora_adapter_file_keeps_its_alpha(base, tmp_path: Path) -> None:
    """UNet2DConditionModel.save_lora_adapter: unprefixed PEFT keys, alpha in the metadata."""
    ref, folder, _ = base
    theirs = copy.deepcopy(ref)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, alpha_pattern={"ff.net.2": 2})
    theirs.add_adapter(cfg, adapter_name="style")
    _randomise_b(theirs)
    theirs.save_lora_adapter(tmp_path / "a", adapter_name="style")
    keys = safetensors.torch.load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    assert not any(k.startswith("unet.") for k in keys)  # the layout the issue describes
    ours = _ours(folder)
    loaded = load_adapter(ours, tmp_path / "a")
    assert len(loaded) == len(keys) // 2
    scales = {m.scaling("default") for m in lora_layers(ours).values()}
    assert scales == {2.0, 0.5}
    _unet_parity(ours, theirs, ref)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_save_pretrained_folder_any_adapter_name(base, tmp_path: Path, rslora: bool) -> None:
    """peft's save_pretrained: adapter_model.safetensors + adapter_config.json, keys
    'base_model.model.*', an adapter not named 'default' in its own subfolder; rsLoRA."""
    ref, folder, _ = base
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=UNET_TARGETS, use_rslora=rslora)
    theirs = get_peft_model(copy.deepcopy(ref), cfg, adapter_name="mine")
    _randomise_b(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "mine" / "adapter_config.json").is_file()
    ours = _ours(folder)
    load_adapter(ours, tmp_path / "peft")
    _unet_parity(ours, theirs.base_model.model, ref)


def test_pipeline_file_with_text_encoder(base, tmp_path: Path, caplog) -> None:
    """StableDiffusionPipeline.save_lora_weights as diffusers' training scripts call it:
    unet.* and text_encoder.* keys (diffusers spellings), both configs in the metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers

    ref, folder, te = base
    unet, text = copy.deepcopy(ref), copy.deepcopy(te)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS))
    text.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS))
    _randomise_b(unet)
    _randomise_b(text)
    Loader.save_lora_weights(
        tmp_path / "pipe",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text.peft_config["default"].to_dict(),
    )
    ours, our_te = _ours(folder), copy.deepcopy(te)
    load_adapter(ours, tmp_path / "pipe", text_encoders={"text_encoder": our_te}, scale=1.0)
    _unet_parity(ours, unet, ref)
    _te_parity(our_te, text, te)

    # without a text encoder: the U-Net part loads, the rest is named in ONE warning
    ours = _ours(folder)
    with caplog.at_level(logging.WARNING):
        load_adapter(ours, tmp_path / "pipe")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "text_encoder (10 layers" in warnings[0].getMessage()
    _unet_parity(ours, unet, ref)


def _kohya_file(ref: nn.Module, te: nn.Module, path: Path, *, alphas: bool = True) -> Path:
    """A Kohya sd-scripts / LyCORIS-LoCon file by the documented key scheme."""
    g = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    layers = {"lora_unet_": ref, "lora_te_": te}
    # text encoder: attention only. diffusers 0.42 converts a Kohya file whose text-encoder
    # part mixes attention and MLP keys into two spellings and then silently drops the
    # attention part (its reference would be wrong); MLP names are checked separately below.
    wanted = ("to_q", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut", "q_proj", "out_proj")
    for prefix, model in layers.items():
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or not name.endswith(wanted):
                continue
            flat = prefix + name.replace(".", "_")
            r = 4 if isinstance(m, nn.Linear) else 2
            if isinstance(m, nn.Linear):
                down, up = (r, m.in_features), (m.out_features, r)
            else:  # LoCon: k×k down, 1×1 up
                down, up = (r, m.in_channels, *m.kernel_size), (m.out_channels, r, 1, 1)
            tensors[f"{flat}.lora_down.weight"] = torch.randn(*down, generator=g) * 0.3
            tensors[f"{flat}.lora_up.weight"] = torch.randn(*up, generator=g) * 0.3
            if alphas:
                tensors[f"{flat}.alpha"] = torch.tensor(1.0 if r == 4 else 3.0)  # ≠ rank
    meta = {
        "ss_network_module": "lycoris.kohya" if alphas else "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "1.0",
        "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "3", "algo": "locon"}),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
    }
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    return path


def test_kohya_locon_file_with_text_encoder(base, tmp_path: Path, caplog) -> None:
    ref, folder, te = base
    path = _kohya_file(ref, te, tmp_path / "kohya.safetensors")
    state, network_alphas = Loader.lora_state_dict(str(path))
    unet, text = copy.deepcopy(ref), copy.deepcopy(te)
    Loader.load_lora_into_unet(state, network_alphas, unet, adapter_name="k")
    Loader.load_lora_into_text_encoder(
        state, network_alphas, text, prefix="text_encoder", adapter_name="k"
    )
    ours, our_te = _ours(folder), copy.deepcopy(te)
    with caplog.at_level(logging.WARNING):
        load_adapter(ours, path, text_encoders={"text_encoder": our_te})
    assert not [r for r in caplog.records if r.name.startswith("unetkit")]  # nothing assumed
    assert any(m.base_layer.kernel_size == (3, 3) for m in lora_layers(ours).values())
    _unet_parity(ours, unet, ref)
    _te_parity(our_te, text, te)
    adapter = read_adapter(path)
    assert adapter.info["base_model"] == "sd_v1"
    mlp = {
        "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight": torch.zeros(2, 24),
        "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight": torch.zeros(16, 2),
    }
    from unetkit.formats.lora_layouts import parse_adapter

    assert parse_adapter(mlp).others["text_encoder"].modules == [
        "text_model.encoder.layers.1.mlp.fc2"
    ]


def test_kohya_file_without_alpha_warns_what_it_assumed(base, tmp_path: Path, caplog) -> None:
    ref, folder, te = base
    path = _kohya_file(ref, te, tmp_path / "noalpha.safetensors", alphas=False)
    state, network_alphas = Loader.lora_state_dict(str(path))
    unet = copy.deepcopy(ref)
    Loader.load_lora_into_unet(state, network_alphas, unet, adapter_name="k")
    ours = _ours(folder)
    with caplog.at_level(logging.WARNING):
        load_adapter(ours, path)
    text = caplog.text
    assert "assumed alpha = rank (scale 1)" in text and "noalpha.safetensors" in text
    assert "text_encoder (" in text  # and the text-encoder part is listed, not applied
    _unet_parity(ours, unet, ref)


def test_older_diffusers_spellings(base, tmp_path: Path) -> None:
    """Attention-processor files: '<attn>.processor.to_q_lora.down.weight' (diffusers ≤ 0.20)
    and the text encoder's 'self_attn.to_q_lora.down.weight'."""
    ref, folder, te = base
    g = torch.Generator().manual_seed(9)
    tensors = {}
    for prefix, model in (("unet.", ref), ("text_encoder.", te)):
        for name, m in model.named_modules():
            if name.endswith(("attn1", "attn2", "self_attn")):
                for proj, lin in (("to_q", "to_q"), ("to_out", "to_out.0"), ("to_k", "to_k")):
                    if prefix == "text_encoder.":
                        lin = {"to_q": "q_proj", "to_out": "out_proj", "to_k": "k_proj"}[proj]
                    layer = m.get_submodule(lin)
                    key = f"{prefix}{name}{'.processor' if prefix == 'unet.' else ''}.{proj}_lora"
                    tensors[f"{key}.down.weight"] = torch.randn(2, layer.in_features, generator=g)
                    tensors[f"{key}.up.weight"] = torch.randn(layer.out_features, 2, generator=g)
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    state, network_alphas = Loader.lora_state_dict(str(path))
    unet, text = copy.deepcopy(ref), copy.deepcopy(te)
    Loader.load_lora_into_unet(state, network_alphas, unet, adapter_name="o")
    Loader.load_lora_into_text_encoder(state, network_alphas, text, prefix="text_encoder")
    ours, our_te = _ours(folder), copy.deepcopy(te)
    load_adapter(ours, path, text_encoders={"text_encoder": our_te})
    _unet_parity(ours, unet, ref)
    _te_parity(our_te, text, te)


def test_lora_for_another_base_is_one_line(base, tmp_path: Path) -> None:
    ref, folder, _ = base
    other = diffusers.UNet2DConditionModel(**{**SMALL, "cross_attention_dim": 24})
    other.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k"]))
    other.save_lora_adapter(tmp_path / "other")
    with pytest.raises(CheckpointError) as e:
        load_adapter(_ours(folder), tmp_path / "other")
    msg = str(e.value)
    assert "\n" not in msg and "pytorch_lora_weights.safetensors" in msg
    assert "attn2.to_k.lora_A/B.weight have shapes (4, 24)" in msg
    # a Kohya file says which base it was trained for: the message repeats it
    flat = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    sdxl = {
        f"{flat}.lora_down.weight": torch.zeros(4, 2048),
        f"{flat}.lora_up.weight": torch.zeros(32, 4),
    }
    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file(
        sdxl, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"}
    )
    with pytest.raises(CheckpointError) as e:
        load_adapter(_ours(folder), path)
    assert "\n" not in str(e.value) and str(e.value).endswith(
        "(the file names its base: sdxl_base_v1-0)"
    )
