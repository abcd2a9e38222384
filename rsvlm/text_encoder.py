"""The retriever's sentence encoder at run time: texts -> L2-normalised float32 vectors.

`rsvlm.weights` only converts and locates weights; this module loads and runs the encoder (the
semantic database, the retriever's training and the app use it through `text_encoder`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class TextEncoder:
    """Sentence encoder returning L2-normalised float32 vectors, ``(n, dim)``.

    Wraps a ``SentenceTransformer`` so that callers (the retrieval database, training) see one
    small interface: ``encode(texts) -> np.ndarray`` and ``dim``.
    """

    def __init__(self, model: Any, name: str = "") -> None:
        self.model = model
        self.name = name
        # sentence-transformers 6 renamed the method; keep working with both.
        get_dim = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], device: str | None = None) -> TextEncoder:
        from sentence_transformers import SentenceTransformer

        return cls(
            SentenceTransformer(str(path), device=device or "cpu", local_files_only=True),
            name=str(path),
        )

    def encode(self, texts: str | Sequence[str], batch_size: int = 64) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=len(texts) > 1000,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        return self.encode(texts)


_TEXT_ENCODERS: dict[tuple[str, str], TextEncoder] = {}


def text_encoder(
    path: str | os.PathLike[str] | None = None, device: str | None = None
) -> TextEncoder:
    """The retriever's text encoder (all-MiniLM-L6-v2 unless ``path`` names another), loaded
    once per process."""
    if path:
        folder = str(Path(path))
    else:
        from rsvlm.weights import minilm_path

        folder = str(minilm_path())
    key = (folder, device or "cpu")
    if key not in _TEXT_ENCODERS:
        logger.info("Loading text encoder %s", folder)
        _TEXT_ENCODERS[key] = TextEncoder.from_path(folder, device=device)
    return _TEXT_ENCODERS[key]


__all__ = ["TextEncoder", "text_encoder"]
