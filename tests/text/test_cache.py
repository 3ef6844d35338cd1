"""Caption-embedding cache: one encoder call per distinct caption, persistence, identity."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from unetkit.errors import ConfigError
from unetkit.text import CaptionEmbeddingCache, caption_key


class CountingEncoder:
    """Deterministic stand-in for a TextEncoder that records what it is asked to embed."""

    def __init__(self, name: str = "fake", max_length: int = 5, dim: int = 3) -> None:
        self.name, self.max_length, self.dim = name, max_length, dim
        self.seen: list[str] = []
        self.calls = 0

    def embed_one(self, caption: str) -> torch.Tensor:
        seed = int(hashlib.md5(caption.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.max_length, self.dim, generator=g)

    def encode(self, captions: list[str]) -> torch.Tensor:
        self.calls += 1
        self.seen.extend(captions)
        return torch.stack([self.embed_one(c) for c in captions])


def test_each_distinct_caption_is_encoded_once() -> None:
    enc = CountingEncoder()
    cache = CaptionEmbeddingCache(enc)
    out = cache.get(["a", "b", "a"])
    assert enc.seen == ["a", "b"] and enc.calls == 1
    assert out.shape == (3, 5, 3)
    torch.testing.assert_close(out, torch.stack([enc.embed_one(c) for c in "aba"]), rtol=0, atol=0)
    cache.get(["b", "c", "c"])
    assert enc.seen == ["a", "b", "c"] and enc.calls == 2
    cache.get(["a", "b", "c"])
    assert enc.calls == 2
    null = cache.null()
    assert null.shape == (1, 5, 3) and torch.equal(null[0], enc.embed_one(""))
    assert "" in cache and "d" not in cache and len(cache) == 4


def test_results_are_copies() -> None:
    cache = CaptionEmbeddingCache(CountingEncoder())
    first = cache.get(["a"])
    first.zero_()
    assert cache.get(["a"]).abs().sum() > 0


def test_persisted_file_reloads_without_the_encoder(tmp_path: Path) -> None:
    file = tmp_path / "emb" / "captions.safetensors"
    cache = CaptionEmbeddingCache(CountingEncoder(), file)
    ref = cache.get(["seven", "one", ""])
    assert file.is_file() and not list(file.parent.glob(".*.tmp"))  # atomic: no leftovers
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata()["encoder"] == "fake" and f.metadata()["max_length"] == "5"
        assert sorted(f.keys()) == sorted(caption_key(c) for c in ["seven", "one", ""])
        assert caption_key("one") == hashlib.sha256(b"one").hexdigest()
    fresh = CountingEncoder()
    again = CaptionEmbeddingCache(fresh, file)
    assert len(again) == 3
    torch.testing.assert_close(again.get(["seven", "one", ""]), ref, rtol=0, atol=0)
    assert fresh.calls == 0
    again.get(["two"])  # a new caption is embedded and the file rewritten with it
    assert fresh.seen == ["two"] and len(CaptionEmbeddingCache(CountingEncoder(), file)) == 4


@pytest.mark.parametrize(
    "other", [CountingEncoder(name="other"), CountingEncoder(max_length=6), CountingEncoder(dim=4)]
)
def test_another_encoder_re_embeds(tmp_path: Path, other: CountingEncoder) -> None:
    file = tmp_path / "captions.safetensors"
    CaptionEmbeddingCache(CountingEncoder(), file).get(["a", "b"])
    cache = CaptionEmbeddingCache(other, file)
    assert len(cache) == 0
    out = cache.get(["a", "b"])
    assert other.seen == ["a", "b"] and out.shape == (2, other.max_length, other.dim)
    with safe_open(str(file), framework="pt") as f:  # the file now belongs to the new encoder
        assert f.metadata()["encoder"] == other.name


def test_corrupt_file_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "captions.safetensors"
    file.write_bytes(b"not a safetensors file")
    enc = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        cache = CaptionEmbeddingCache(enc, file)
    assert "unreadable" in caplog.text
    cache.get(["a"])
    assert enc.seen == ["a"]
    assert len(CaptionEmbeddingCache(CountingEncoder(), file)) == 1


def test_bad_arguments(tmp_path: Path) -> None:
    cache = CaptionEmbeddingCache(CountingEncoder())
    with pytest.raises(ConfigError, match="list of strings"):
        cache.get("a")
    with pytest.raises(ConfigError, match="empty"):
        cache.get([])
    with pytest.raises(ConfigError, match="no path"):
        cache.save()
    cache.get(["x"])
    assert cache.save(tmp_path / "explicit.safetensors").is_file()
