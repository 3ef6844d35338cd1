"""A tiny random Stable Diffusion pipeline, built and saved with diffusers/transformers.

Nothing is downloaded: the tokenizer's vocab and merges are written here, every model is
randomly initialised from a small config of the libraries' own classes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SIZE = 32  # pixels; the VAE below halves once, so latents are 16×16


def tokenizer(folder: Path):
    """A CLIPTokenizer over single letters (a word is its letters, '</w>' on the last)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"]
    tokens += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    tokens += ["th", "the</w>", "er", "er</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\ne r\ne r</w>\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12
    )


def components(*, in_channels: int = 4, seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer (unsaved), scheduler: diffusers' dummy sizes."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=16,
        norm_num_groups=8,
    )
    for p in unet.parameters():  # zero-initialised outputs would hide mistakes
        p.data.normal_(0.0, 0.05)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=12,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), scheduler=scheduler)


def save_pipeline(folder: Path, *, inpainting: bool = False, seed: int = 0):
    """Save a tiny StableDiffusion(Inpaint)Pipeline to ``folder``; returns the pipeline."""
    import diffusers

    parts = components(in_channels=9 if inpainting else 4, seed=seed)
    tok = tokenizer(folder / "_tok")
    cls = (
        diffusers.StableDiffusionInpaintPipeline
        if inpainting
        else diffusers.StableDiffusionPipeline
    )
    pipe = cls(
        **parts,
        tokenizer=tok,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
