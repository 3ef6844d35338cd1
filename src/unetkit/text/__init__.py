"""Text conditioning: frozen text encoders and a caption-embedding cache.

Example:
    >>> from unetkit.text import CaptionEmbeddingCache, load_text_encoder
    >>> cache = CaptionEmbeddingCache(load_text_encoder("minilm", max_length=16))  # doctest: +SKIP
    >>> cache.get(["a handwritten digit seven"]).shape                             # doctest: +SKIP
    torch.Size([1, 16, 384])
"""

from __future__ import annotations

from unetkit.text.cache import CaptionEmbeddingCache, caption_key
from unetkit.text.encoders import (
    DEFAULT_MAX_LENGTH,
    MINILM_NAMES,
    TextEncoder,
    load_text_encoder,
)

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "MINILM_NAMES",
    "CaptionEmbeddingCache",
    "TextEncoder",
    "caption_key",
    "load_text_encoder",
]
