"""The semantic database: remote-sensing descriptions, their embeddings and a faiss index.

Seed 003 retrieves the descriptions nearest to an image from a text database and feeds them to
the model as semantic tokens. This module is the database half and knows nothing about the model:
texts (+ per-text metadata) are embedded by any encoder with ``encode(texts) -> (n, d)`` (the
embedded preset uses all-MiniLM-L6-v2, see :func:`rsvlm.weights.text_encoder`), L2-normalised, and
searched by inner product (= cosine similarity) with query vectors from anywhere (the model's
image projection, or the text encoder for text queries).

The index follows the size: exact search (``IndexFlatIP``) below :attr:`SemanticDatabase.
EXACT_MAX` vectors, an HNSW graph above (``IndexHNSWFlat`` with the inner-product metric), which
``scripts/bench_retrieval.py`` measures at 1M vectors.

On disk (``save_pretrained``/``from_pretrained``): ``database.json`` (settings), ``texts.jsonl``
(one ``{"text", "metadata"}`` per line), ``embeddings.npy`` (float32) and ``index.faiss``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

CONFIG_NAME = "database.json"
TEXTS_NAME = "texts.jsonl"
EMBEDDINGS_NAME = "embeddings.npy"
INDEX_NAME = "index.faiss"
FORMAT_VERSION = 1

INDEX_TYPES = ("auto", "flat", "hnsw")


@runtime_checkable
class Encoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


EncoderLike = Encoder | Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Hit:
    """One retrieved description: its text, cosine score, metadata and row in the database."""

    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    index: int = -1


def _encode(encoder: EncoderLike, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    fn = encoder.encode if isinstance(encoder, Encoder) else encoder
    if not callable(fn):
        raise TypeError("encoder must have encode(texts) or be a callable texts -> array")
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        vectors = np.asarray(fn(batch), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(batch):
            raise ValueError(
                f"the encoder returned shape {vectors.shape} for {len(batch)} texts; expected (n, dim)"
            )
        parts.append(vectors)
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Float32 copy with unit rows (zero rows stay zero instead of becoming NaN)."""
    vectors = np.array(vectors, dtype=np.float32, copy=True)
    if vectors.ndim == 1:
        vectors = vectors[None]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Normalise unless the rows already are unit (or zero): a reload must not change bits."""
    if not len(vectors):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    if np.all((np.abs(norms - 1.0) < 1e-5) | (norms == 0)):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    return normalize(vectors)


class SemanticDatabase:
    """Texts + metadata + unit-norm embeddings + a faiss inner-product index."""

    #: Up to this many vectors, search is exact (a flat scan of 50k x 384 takes a few ms).
    EXACT_MAX = 50_000
    #: HNSW graph degree, build and search breadth (scripts/bench_retrieval.py, 200k x 384
    #: structured vectors, 2 shared cores): efConstruction 64 -> recall@5 0.968 at efSearch 128,
    #: and at 1M it plateaus near 0.90 whatever efSearch; efConstruction 200 (2x build time) ->
    #: recall@5 0.998 at efSearch 64 (0.5 ms/query), 1.000 at 128 (0.7 ms/query).
    HNSW_M = 32
    HNSW_EF_CONSTRUCTION = 200
    HNSW_EF_SEARCH = 128

    def __init__(
        self,
        texts: Sequence[str],
        embeddings: np.ndarray,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        index_type: str = "auto",
        ef_search: int | None = None,
        encoder_name: str | None = None,
        _index: Any = None,
    ) -> None:
        texts = [str(t) for t in texts]
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise ValueError(
                f"embeddings must be a 2-D array (n, dim), got shape {embeddings.shape}"
            )
        if embeddings.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts but {embeddings.shape[0]} embeddings")
        if embeddings.shape[1] == 0 and len(texts):
            raise ValueError("embeddings have dimension 0")
        if not np.isfinite(embeddings).all():
            raise ValueError("embeddings contain NaN or infinite values")
        if metadata is None:
            metadata = [{} for _ in texts]
        if len(metadata) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(metadata)} metadata entries")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        self.texts = texts
        self.metadata = [dict(m or {}) for m in metadata]
        self.embeddings = _unit_rows(embeddings)
        self.index_type = self._resolve_index_type(index_type, len(texts))
        self.ef_search = int(ef_search or self.HNSW_EF_SEARCH)
        self.encoder_name = encoder_name
        self.index = _index if _index is not None else self._build_index()
        self.set_ef_search(self.ef_search)

    def set_ef_search(self, ef_search: int) -> None:
        """How widely an HNSW index searches (recall against speed); an exact index ignores it."""
        self.ef_search = int(ef_search)
        if self.index_type == "hnsw":
            self.index.hnsw.efSearch = self.ef_search

    # ------------------------------------------------------------------ construction
    @classmethod
    def _resolve_index_type(cls, index_type: str, n: int) -> str:
        if index_type == "auto":
            return "flat" if n <= cls.EXACT_MAX else "hnsw"
        return index_type

    def _build_index(self) -> Any:
        import faiss

        dim = self.dim
        if self.index_type == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, self.HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.HNSW_EF_CONSTRUCTION
            logger.info("Building an HNSW index over %d vectors (this takes a while)...", len(self))
        if len(self):
            index.add(self.embeddings)
        return index

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        encoder: EncoderLike | None = None,
        *,
        index_type: str = "auto",
        batch_size: int = 256,
        encoder_name: str | None = None,
    ) -> SemanticDatabase:
        """Embed ``texts`` with ``encoder`` (default: the embedded all-MiniLM-L6-v2) and index them."""
        texts = [str(t) for t in texts]
        if any(not t.strip() for t in texts):
            raise ValueError("the database cannot hold empty texts")
        if encoder is None:
            from rsvlm.text_encoder import text_encoder

            encoder = text_encoder()
        if encoder_name is None:
            encoder_name = getattr(encoder, "name", None) or type(encoder).__name__
        embeddings = _encode(encoder, texts, batch_size)
        if not texts:
            dim = int(getattr(encoder, "dim", 0) or 0)
            embeddings = np.zeros((0, dim), dtype=np.float32)
        return cls(texts, embeddings, metadata, index_type=index_type, encoder_name=encoder_name)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], encoder: EncoderLike | None = None, **kwargs: Any
    ) -> SemanticDatabase:
        """Build from a text file (one description per line), JSON or JSON lines.

        JSON may be a list of strings or of objects with ``"text"`` (other keys become metadata,
        or an explicit ``"metadata"`` object is used).
        """
        texts, metadata = read_descriptions(path)
        return cls.from_texts(texts, metadata, encoder, **kwargs)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.texts)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def search(self, query_vectors: np.ndarray, k: int = 3) -> list[list[Hit]]:
        """Top-``k`` hits per query vector (rows of ``(q, dim)`` or a single ``(dim,)``), best first."""
        queries = np.asarray(query_vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or (queries.shape[1] != self.dim and len(self)):
            raise ValueError(
                f"query vectors must have shape (n, {self.dim}), got {np.shape(query_vectors)}"
            )
        if not np.isfinite(queries).all():
            raise ValueError("query vectors contain NaN or infinite values")
        if k <= 0 or len(self) == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        k = min(int(k), len(self))
        scores, ids = self.index.search(normalize(queries), k)
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = [
                Hit(self.texts[i], float(s), dict(self.metadata[i]), int(i))
                for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0
            ]
            results.append(hits)
        return results

    def search_texts(
        self, queries: str | Sequence[str], k: int = 3, encoder: EncoderLike | None = None
    ) -> list[list[Hit]]:
        """Search with text queries embedded by ``encoder`` (default: the embedded text encoder)."""
        if isinstance(queries, str):
            queries = [queries]
        if encoder is None:
            from rsvlm.text_encoder import text_encoder

            encoder = text_encoder()
        return self.search(_encode(encoder, list(queries)), k)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        import faiss

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / TEXTS_NAME, "w", encoding="utf-8") as fh:
            for text, meta in zip(self.texts, self.metadata, strict=True):
                fh.write(json.dumps({"text": text, "metadata": meta}, ensure_ascii=False) + "\n")
        np.save(folder / EMBEDDINGS_NAME, self.embeddings)
        faiss.write_index(self.index, str(folder / INDEX_NAME))
        config = {
            "format_version": FORMAT_VERSION,
            "size": len(self),
            "dim": self.dim,
            "index_type": self.index_type,
            "metric": "inner_product",
            "ef_search": self.ef_search,
            "encoder": self.encoder_name,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> SemanticDatabase:
        import faiss

        folder = Path(directory)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} is not a saved semantic database (no {CONFIG_NAME})")
        config = json.loads(config_path.read_text())
        texts, metadata = [], []
        with open(folder / TEXTS_NAME, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    texts.append(record["text"])
                    metadata.append(record.get("metadata") or {})
        embeddings = np.load(folder / EMBEDDINGS_NAME)
        index = (
            faiss.read_index(str(folder / INDEX_NAME)) if (folder / INDEX_NAME).is_file() else None
        )
        if index is not None and index.ntotal != len(texts):
            logger.warning(
                "index.faiss holds %d vectors for %d texts; rebuilding", index.ntotal, len(texts)
            )
            index = None
        return cls(
            texts,
            embeddings,
            metadata,
            index_type=config.get("index_type", "auto"),
            ef_search=config.get("ef_search"),
            encoder_name=config.get("encoder"),
            _index=index,
        )

    def __repr__(self) -> str:
        return f"SemanticDatabase(size={len(self)}, dim={self.dim}, index={self.index_type})"


def read_descriptions(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Texts and metadata from ``.txt`` (one per line), ``.json`` or ``.jsonl`` files."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"description file {path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a UTF-8 text file") from exc
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            records: Iterable[Any] = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of strings or of objects with 'text'")
    elif suffix == ".jsonl":
        try:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON lines: {exc}") from exc
    else:
        records = [line.strip() for line in raw.splitlines() if line.strip()]
    texts: list[str] = []
    metadata: list[dict[str, Any]] = []
    for n, record in enumerate(records, start=1):
        if isinstance(record, str):
            text, meta = record, {}
        elif isinstance(record, Mapping) and isinstance(record.get("text"), str):
            text = record["text"]
            meta = record.get("metadata")
            if not isinstance(meta, Mapping):
                meta = {k: v for k, v in record.items() if k != "text"}
        else:
            raise ValueError(
                f"{path}: entry {n} is neither a string nor an object with a 'text' string"
            )
        if text.strip():
            texts.append(text.strip())
            metadata.append(dict(meta))
    return texts, metadata


__all__ = ["Encoder", "Hit", "SemanticDatabase", "normalize", "read_descriptions"]
