"""Stable Diffusion on our U-Net == diffusers' pipelines, on tiny random pipelines saved here.

Tolerance: 1e-5 absolute on images in [0, 1] (measured: under 1e-6), same seed, same
scheduler file, negative prompts and guidance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unetkit.errors import CheckpointError

pytestmark = pytest.mark.compare
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import sd_tiny  # noqa: E402  (registered by conftest.py)

from unetkit.runtime import fastpath  # noqa: E402
from unetkit.workflows.sd_pipeline import StableDiffusion  # noqa: E402

TOL = 1e-5
KW = dict(num_inference_steps=4, guidance_scale=4.0, negative_prompt=["blurry"], output_type="np")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("sd")
    return folder, sd_tiny.save_pipeline(folder)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("sdinpaint")
    return folder, sd_tiny.save_pipeline(folder, inpainting=True)


def _np(images: torch.Tensor) -> np.ndarray:
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _image_and_mask() -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    t_img = torch.from_numpy(img).permute(2, 0, 1).float() / 255 * 2 - 1
    return img, mask, t_img, torch.from_numpy(mask)[None].float() / 255


def test_txt2img_matches_diffusers(pipe_dir) -> None:
    folder, pipe = pipe_dir
    sd = StableDiffusion.from_pretrained(folder, precision="fp32")
    assert "sampler ddim" in sd.describe() and "LoRA none" in sd.describe()
    g = torch.Generator().manual_seed(3)
    ref = pipe(["the cat", "a dog"], generator=g, **{**KW, "negative_prompt": ["bad"] * 2}).images
    ours = sd.txt2img(["the cat", "a dog"], negative="bad", steps=4, guidance=4.0, seed=3)
    assert np.abs(_np(ours) - ref).max() < TOL
    again = sd.txt2img(["the cat", "a dog"], negative="bad", steps=4, guidance=4.0, seed=3)
    assert torch.equal(ours, again)  # a seed reproduces
    other = sd.txt2img(["the cat", "a dog"], negative="bad", steps=4, guidance=4.0, seed=4)
    assert not torch.equal(ours, other)


def test_img2img_matches_diffusers(pipe_dir) -> None:
    from PIL import Image

    folder, pipe = pipe_dir
    img, _, t_img, _ = _image_and_mask()
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    ref = i2i(["the cat"], image=Image.fromarray(img), strength=0.6, generator=g, **KW).images
    sd = StableDiffusion.from_pretrained(folder, precision="fp32")
    ours = sd.img2img(
        t_img, ["the cat"], strength=0.6, negative="blurry", steps=4, guidance=4.0, seed=4
    )
    assert np.abs(_np(ours) - ref).max() < TOL


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("nine_channels", [False, True])
def test_inpaint_matches_diffusers(
    pipe_dir, inpaint_dir, strength: float, nine_channels: bool
) -> None:
    """9-channel SD-inpainting U-Net and known-region replacement with a 4-channel one."""
    from PIL import Image

    folder, pipe = inpaint_dir if nine_channels else pipe_dir
    img, mask, t_img, t_mask = _image_and_mask()
    ip = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
    ip.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    ref = ip(
        ["the cat"],
        image=Image.fromarray(img),
        mask_image=Image.fromarray(mask),
        strength=strength,
        height=32,
        width=32,
        generator=g,
        **KW,
    ).images
    sd = StableDiffusion.from_pretrained(folder, precision="fp32")
    ours = sd.inpaint(
        t_img,
        t_mask,
        ["the cat"],
        strength=strength,
        negative="blurry",
        steps=4,
        guidance=4.0,
        seed=5,
    )
    assert np.abs(_np(ours) - ref).max() < TOL


def test_stacked_loras_with_scales_match_diffusers(pipe_dir, tmp_path: Path) -> None:
    """Two U-Net LoRA files (save_lora_weights, PEFT keys) stacked at 0.8 and 0.5:
    diffusers' load_lora_weights + set_adapters vs our load_lora. (Text-encoder parts are
    compared with PEFT's adapted CLIP in tests/formats/test_lora_producers.py: diffusers
    0.42's own text-encoder LoRA loader leaves the weights unloaded with this transformers.)"""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder, _ = pipe_dir
    files = []
    for i, (r, alpha) in enumerate([(4, 8), (2, 1)]):
        p = diffusers.StableDiffusionPipeline.from_pretrained(folder)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"]
        p.unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
        for name, t in p.unet.named_parameters():
            if ".lora_B." in name:
                t.data.normal_(0.0, 2.0)
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path / f"l{i}",
            unet_lora_layers=get_peft_model_state_dict(p.unet),
            unet_lora_adapter_metadata=p.unet.peft_config["default"].to_dict(),
        )
        files.append(tmp_path / f"l{i}")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    for i, f in enumerate(files):
        theirs.load_lora_weights(str(f), adapter_name=f"a{i}")
    theirs.set_adapters(["a0", "a1"], adapter_weights=[0.8, 0.5])
    ref = theirs(["the cat"], generator=torch.Generator().manual_seed(6), **KW).images
    sd = StableDiffusion.from_pretrained(folder, precision="fp32")
    base = sd.txt2img(["the cat"], negative="blurry", steps=4, guidance=4.0, seed=6)
    sd.load_lora(files[0], 0.8)
    sd.load_lora(files[1], 0.5)
    assert "LoRA l0:0.8, l1:0.5" in sd.describe()
    ours = sd.txt2img(["the cat"], negative="blurry", steps=4, guidance=4.0, seed=6)
    assert np.abs(_np(base) - ref).max() > 1e-3  # the adapters matter (100x the tolerance)
    assert np.abs(_np(ours) - ref).max() < TOL


def test_bad_pipeline_folders_are_one_line(pipe_dir, tmp_path: Path) -> None:
    folder, _ = pipe_dir
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError) as e:
        StableDiffusion.from_pretrained(broken)
    assert "\n" not in str(e.value) and "missing vae/config.json" in str(e.value)

    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    cfg = json.loads((odd / "vae" / "config.json").read_text())
    vae = diffusers.AutoencoderKL(
        **{**{k: v for k, v in cfg.items() if not k.startswith("_")}, "latent_channels": 8}
    )
    vae.save_pretrained(odd / "vae")
    with pytest.raises(CheckpointError) as e:
        StableDiffusion.from_pretrained(odd)
    msg = str(e.value)
    assert "\n" not in msg and "VAE makes 8-channel latents but the U-Net takes 4" in msg


def test_single_file_round_trip_and_diffusers_converters(pipe_dir, tmp_path: Path) -> None:
    """Our single file: diffusers' own LDM converters read its VAE and CLIP parts back to the
    same tensors, and generating from it gives the folder's images exactly."""
    import safetensors.torch
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from unetkit.formats.sd_files import load_pipeline_dir
    from unetkit.formats.sd_single_file import save_single_file

    folder, pipe = pipe_dir
    file = save_single_file(load_pipeline_dir(folder), tmp_path / "sd.safetensors")
    state = safetensors.torch.load_file(file)
    vae = convert_ldm_vae_checkpoint(state, dict(pipe.vae.config))
    want = pipe.vae.state_dict()
    assert vae.keys() == want.keys() and all(torch.equal(vae[k], want[k]) for k in want)
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    want = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    assert all(torch.equal(clip[k], want[k]) for k in want)

    a = StableDiffusion.from_pretrained(folder, precision="fp32")
    b = StableDiffusion.from_pretrained(file, tokenizer=folder / "tokenizer", precision="fp32")
    kw = dict(negative="x", steps=3, guidance=3.0, seed=1)
    assert torch.equal(a.txt2img(["the cat"], **kw), b.txt2img(["the cat"], **kw))
    with pytest.raises(CheckpointError, match="carries no tokenizer; pass --tokenizer"):
        StableDiffusion.from_pretrained(file)


def test_sd15_shapes_give_sd15_configs() -> None:
    """Configs of a foreign single file are inferred from shapes (SD 1.5 sizes, on meta)."""
    import transformers

    from unetkit.formats.sd_single_file import _infer_clip_config, _infer_vae_config, _vae_table

    sd15_vae = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
    )
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**sd15_vae)
        cfg = transformers.CLIPTextConfig()  # ViT-L/14's text tower: SD 1.x's encoder
        clip = transformers.CLIPTextModel(cfg)
    state = vae.state_dict()
    ldm_state = {theirs: state[ours] for ours, theirs in _vae_table(vae).items()}
    assert _infer_vae_config(ldm_state) == sd15_vae
    got = _infer_clip_config(
        {
            ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in clip.state_dict().items()
        }
    )
    assert got == {k: getattr(cfg, k) for k in got}


@pytest.mark.skipif(fastpath.frozen_dtype("bf16") is None, reason="no CPU bf16 fast path here")
def test_bf16_pipeline_stores_the_unet_as_the_fast_path_runs_it(pipe_dir, tmp_path) -> None:
    """With the fast path the U-Net is read straight into bf16 (norms float32), never all in
    float32, and gives the very images of freezing a float32 U-Net; with a LoRA (merged in
    float32 arithmetic into the bf16 weights, its own A and B held in bf16) it stays within
    twice the error bf16 has when freezing the float32 U-Net with the same LoRA."""
    from unetkit.errors import ConfigError
    from unetkit.formats.lora_files import save_adapter
    from unetkit.formats.sd_files import load_pipeline_dir
    from unetkit.nn.lora_inject import inject_lora
    from unetkit.runtime import prepared

    folder, _ = pipe_dir
    kw = dict(negative="blurry", steps=3, guidance=4.0, seed=3)
    sd = StableDiffusion.from_pretrained(folder, precision="bf16")
    assert sd.unet.conv_in.weight.dtype == torch.bfloat16
    assert sd.unet.conv_norm_out.weight.dtype == torch.float32
    full = StableDiffusion(load_pipeline_dir(folder), precision="bf16")
    assert full.unet.conv_in.weight.dtype == torch.float32
    got = sd.txt2img(["the cat"], **kw)
    assert torch.equal(got, full.txt2img(["the cat"], **kw))
    exact = StableDiffusion.from_pretrained(folder, precision="fp32")
    err = np.abs(_np(got) - _np(exact.txt2img(["the cat"], **kw))).max()
    assert err < 0.05
    # the VAE runs under bf16 autocast with the fast path, float32 otherwise, unmutated
    assert sd.codec.compute_dtype == torch.bfloat16 and exact.codec.compute_dtype is None
    assert full.files.vae.decoder.conv_in.weight.dtype == torch.float32

    lora = load_pipeline_dir(folder).unet
    inject_lora(lora, targets="attn", r=4)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 5.0)
    save_adapter(lora, tmp_path / "style.safetensors")
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 600.0]), torch.randn(2, 12, 16)
    with torch.inference_mode():
        plain = exact.unet(x, t, ctx)
    outs = []
    for pipe in (sd, full, exact):  # bf16 stored, float32 stored run in bf16, float32
        pipe.load_lora(tmp_path / "style.safetensors", 0.8)
        with prepared(pipe.unet, pipe.precision) as run:
            outs.append(run(x, t, ctx).float())
    stored, frozen, want = outs
    ref_err = (frozen - want).abs().max()  # what bf16 costs when freezing float32 weights
    assert (want - plain).abs().max() > 10 * ref_err  # the adapter matters
    assert (stored - want).abs().max() < 2 * ref_err  # measured: 1.3x
    with pytest.raises(ConfigError, match="precision='fp32' needs float32 weights"):
        StableDiffusion(sd.files, precision="fp32")


@pytest.mark.skipif(fastpath.frozen_dtype("bf16") is None, reason="no CPU bf16 fast path here")
def test_bf16_vae_decodes_and_encodes_within_bf16_error_of_float32(pipe_dir) -> None:
    """The codec's bf16 autocast path against the float32 VAE (the reference) on the same
    latents and images: close at bf16's precision, float32 out, the weights untouched."""
    from unetkit.diffusion.latent import LatentCodec
    from unetkit.formats.sd_files import load_pipeline_dir

    folder, _ = pipe_dir
    vae = load_pipeline_dir(folder).vae
    exact = LatentCodec(vae, 0.18215)
    fast = LatentCodec(vae, 0.18215, compute_dtype=torch.bfloat16)
    z = torch.randn(1, exact.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    want, got = exact.decode(z), fast.decode(z)
    assert got.dtype == torch.float32 and vae.decoder.conv_in.weight.dtype == torch.float32
    scale = want.abs().max()
    assert 0 < (got - want).abs().max() < 0.05 * scale  # bf16 ran, and stayed close
    image = want.clamp(-1, 1)
    enc = [c.encode(image, torch.Generator().manual_seed(1)) for c in (exact, fast)]
    assert enc[1].dtype == torch.float32
    assert (enc[1] - enc[0]).abs().max() < 0.05 * enc[0].abs().max()
