"""Caption-embedding cache: each distinct caption goes through the text encoder once.

Diffusion training sees the same captions every epoch (the ten digit captions, or a data
set's few thousand), and the encoder is frozen, so its outputs can be computed once. The
cache keeps them in memory and, given a file, in a safetensors file keyed by the SHA-256 of
each caption, with the encoder's identity (name, max_length, dim) in the file's metadata: a
re-run skips the encoder, and a file written by another encoder is ignored and rebuilt.

Example:
    >>> from unetkit.text import load_text_encoder
    >>> enc = load_text_encoder("minilm")                                # doctest: +SKIP
    >>> cache = CaptionEmbeddingCache(enc, "run/captions.safetensors")   # doctest: +SKIP
    >>> cache.get(["a handwritten digit two"]).shape   # doctest: +SKIP
    torch.Size([1, 77, 384])
    >>> cache.null().shape                              # doctest: +SKIP
    torch.Size([1, 77, 384])
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from unetkit._atomic import atomic_path
from unetkit.errors import ConfigError

__all__ = ["CaptionEmbeddingCache", "caption_key"]

log = logging.getLogger(__name__)

_FORMAT = "unetkit-caption-embeddings"
_FORMAT_VERSION = "1"


def caption_key(caption: str) -> str:
    """The cache key of a caption: its SHA-256 (UTF-8), hex."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class CaptionEmbeddingCache:
    """Embeddings of captions by a frozen encoder, computed once per distinct caption.

    Args:
        encoder: a :class:`~unetkit.text.TextEncoder` (anything with ``encode(list[str]) ->
            (B, L, D)``, ``name``, ``max_length`` and ``dim``).
        path: optional safetensors file; loaded if it exists and was written by the same
            encoder (name, max_length, dim), and rewritten (atomically) whenever new
            captions were embedded. With many distinct captions, call :meth:`precompute`
            with all of them first so the file is written once.

    The embeddings are kept on the CPU in float32; ``get`` returns new tensors.

    Example:
        >>> cache = CaptionEmbeddingCache(encoder)                  # doctest: +SKIP
        >>> context = cache.get(batch["caption"]).to(device)        # doctest: +SKIP
    """

    def __init__(self, encoder: Any, path: str | os.PathLike | None = None) -> None:
        self.encoder = encoder
        self.path = Path(path) if path is not None else None
        self._store: dict[str, torch.Tensor] = {}  # caption_key -> (L, D)
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    @property
    def max_length(self) -> int:
        return int(self.encoder.max_length)

    def _identity(self) -> dict[str, str]:
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "encoder": str(self.encoder.name),
            "max_length": str(self.max_length),
            "dim": str(self.dim),
        }

    def _load(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except Exception as e:  # safetensors raises its own error types for bad files
            log.warning("%s: unreadable caption cache (%s); it will be rebuilt", path, e)
            return
        found = {k: meta.get(k) for k in self._identity()}
        if found != self._identity():
            log.info(
                "%s: written by encoder %s (max_length %s, dim %s), not %s: re-embedding",
                path,
                found["encoder"],
                found["max_length"],
                found["dim"],
                self.encoder.name,
            )
            return
        shape = (self.max_length, self.dim)
        self._store = {k: v.float() for k, v in tensors.items() if tuple(v.shape) == shape}
        log.info("%s: %d cached caption embeddings", path, len(self._store))

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write all embeddings to ``path`` (default: the cache's file), atomically."""
        from safetensors.torch import save_file

        target = Path(path) if path is not None else self.path
        if target is None:
            raise ConfigError("CaptionEmbeddingCache.save: no path given and the cache has none")
        tensors = {k: v.contiguous() for k, v in self._store.items()}
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=self._identity())
        return target

    def precompute(self, captions: Iterable[str]) -> int:
        """Embed the captions not cached yet (in the encoder's batches); returns how many."""
        todo: dict[str, str] = {}
        for c in captions:
            if not isinstance(c, str):
                raise ConfigError(f"captions must be strings; found {type(c).__name__}: {c!r}")
            key = caption_key(c)
            if key not in self._store:
                todo.setdefault(key, c)
        if not todo:
            return 0
        emb = self.encoder.encode(list(todo.values())).detach().float().cpu()
        expected = (len(todo), self.max_length, self.dim)
        if tuple(emb.shape) != expected:
            raise ConfigError(
                f"encoder {self.encoder.name!r} returned shape {tuple(emb.shape)}, "
                f"expected {expected} (captions, max_length, dim)"
            )
        for key, row in zip(todo, emb, strict=True):
            self._store[key] = row.clone()  # own storage: safetensors refuses shared tensors
        if self.path is not None:
            self.save()
        return len(todo)

    def get(
        self, captions: Sequence[str], *, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Embeddings of ``captions``, float32 (B, max_length, dim); new captions are embedded.

        Args:
            captions: B strings ("" is the null caption).
            device: where to put the result (default CPU).
        """
        if isinstance(captions, str):
            raise ConfigError(f"captions={captions!r}: pass a list of strings, e.g. [{captions!r}]")
        captions = list(captions)
        if not captions:
            raise ConfigError("captions is empty; pass at least one caption")
        self.precompute(captions)
        out = torch.stack([self._store[caption_key(c)] for c in captions])
        return out.to(device) if device is not None else out

    def null(self, *, device: str | torch.device | None = None) -> torch.Tensor:
        """The empty caption's embedding, (1, max_length, dim): the unconditional context
        of classifier-free guidance (Ho & Salimans 2022)."""
        return self.get([""], device=device)

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, caption: object) -> bool:
        return isinstance(caption, str) and caption_key(caption) in self._store

    def __repr__(self) -> str:
        return (
            f"CaptionEmbeddingCache(encoder={self.encoder.name!r}, captions={len(self)}, "
            f"path={str(self.path) if self.path else None!r})"
        )
