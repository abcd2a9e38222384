"""Semantic database: building, exact and HNSW search, persistence, input errors."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from rsvlm.retrieval import Hit, SemanticDatabase, normalize, read_descriptions

DESCRIPTIONS = [
    "a dense residential area with small houses and narrow roads",
    "an airport with two runways and parked airplanes",
    "a harbour with ships moored along the docks",
    "farmland with rectangular fields and a few farm buildings",
    "a river crossing a forest with a bridge",
    "an industrial zone with large warehouses and storage tanks",
    "a stadium surrounded by parking lots",
    "a school with a sports field next to houses",
]


class HashingEncoder:
    """Deterministic bag-of-words encoder: each word adds a fixed pseudo-random vector."""

    name = "hashing-test-encoder"

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.calls = 0

    def _word(self, word: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(word.encode()))
        return rng.standard_normal(self.dim).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i] += self._word(word)
        return out  # deliberately not normalized: the database must do it


@pytest.fixture
def db() -> SemanticDatabase:
    meta = [{"id": i, "source": "test"} for i in range(len(DESCRIPTIONS))]
    return SemanticDatabase.from_texts(DESCRIPTIONS, meta, HashingEncoder(), batch_size=3)


def test_build_and_exact_search(db: SemanticDatabase) -> None:
    assert len(db) == len(DESCRIPTIONS) and db.dim == 64 and db.index_type == "flat"
    np.testing.assert_allclose(np.linalg.norm(db.embeddings, axis=1), 1.0, rtol=1e-5)
    encoder = HashingEncoder()
    results = db.search(encoder.encode(DESCRIPTIONS), k=3)
    for i, hits in enumerate(results):
        assert hits[0].index == i and hits[0].text == DESCRIPTIONS[i]
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].metadata == {"id": i, "source": "test"}
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Scores are the cosine similarities, computed independently here.
    query = encoder.encode(["ships in a harbour"])[0]
    expected = normalize(db.embeddings) @ (query / np.linalg.norm(query))
    hits = db.search(query, k=len(db))[0]
    assert [h.index for h in hits] == list(np.argsort(-expected))
    np.testing.assert_allclose(
        [h.score for h in hits], np.sort(expected)[::-1], rtol=1e-5, atol=1e-6
    )


def test_search_texts_and_k_edge_cases(db: SemanticDatabase) -> None:
    (hits,) = db.search_texts("airplanes at an airport with runways", k=2, encoder=HashingEncoder())
    assert hits[0].text == DESCRIPTIONS[1]
    assert len(db.search(np.ones(64), k=100)[0]) == len(db)
    assert db.search(np.ones(64), k=0) == [[]]
    assert isinstance(db.search(np.ones((2, 64)), k=1)[1][0], Hit)


def test_bad_input_is_reported(db: SemanticDatabase) -> None:
    with pytest.raises(ValueError, match="shape"):
        db.search(np.ones((1, 3)), k=1)
    with pytest.raises(ValueError, match="NaN"):
        db.search(np.full(64, np.nan), k=1)
    with pytest.raises(ValueError, match="texts but"):
        SemanticDatabase(["a", "b"], np.ones((3, 4)))
    with pytest.raises(ValueError, match="metadata"):
        SemanticDatabase(["a"], np.ones((1, 4)), metadata=[{}, {}])
    with pytest.raises(ValueError, match="empty"):
        SemanticDatabase.from_texts(["ok", "  "], encoder=HashingEncoder())


def test_empty_database() -> None:
    empty = SemanticDatabase([], np.zeros((0, 8), dtype=np.float32))
    assert len(empty) == 0 and empty.search(np.ones(8), k=3) == [[]]


def test_save_load_round_trip(db: SemanticDatabase, tmp_path: Path) -> None:
    db.save_pretrained(tmp_path / "db")
    config = json.loads((tmp_path / "db" / "database.json").read_text())
    assert config["size"] == len(db) and config["encoder"] == "hashing-test-encoder"
    loaded = SemanticDatabase.from_pretrained(tmp_path / "db")
    assert loaded.texts == db.texts and loaded.metadata == db.metadata
    np.testing.assert_array_equal(loaded.embeddings, db.embeddings)
    queries = HashingEncoder().encode(["a bridge over a river", "warehouses"])
    assert loaded.search(queries, 4) == db.search(queries, 4)
    with pytest.raises(FileNotFoundError, match="not a saved semantic database"):
        SemanticDatabase.from_pretrained(tmp_path)


def test_read_descriptions_formats(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("first line\n\n  second line  \n")
    assert read_descriptions(tmp_path / "d.txt") == (["first line", "second line"], [{}, {}])
    (tmp_path / "d.json").write_text(
        json.dumps(
            [
                "plain",
                {"text": "with meta", "osm_id": 7},
                {"text": "explicit", "metadata": {"a": 1}},
            ]
        )
    )
    texts, meta = read_descriptions(tmp_path / "d.json")
    assert texts == ["plain", "with meta", "explicit"]
    assert meta == [{}, {"osm_id": 7}, {"a": 1}]
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n"two"\n')
    assert read_descriptions(tmp_path / "d.jsonl")[0] == ["one", "two"]
    (tmp_path / "bad.json").write_text('{"text": "not a list"}')
    with pytest.raises(ValueError, match="JSON list"):
        read_descriptions(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="entry 1"):
        read_descriptions(tmp_path / "bad2.json")
    db = SemanticDatabase.from_file(tmp_path / "d.json", encoder=HashingEncoder())
    assert db.search_texts("with meta", k=1, encoder=HashingEncoder())[0][0].metadata == {
        "osm_id": 7
    }


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 200 centres, varying along 8 shared directions: like sentence
    embeddings, low intrinsic dimension (isotropic noise in all dims would make neighbours
    near-ties, which no approximate index ranks exactly)."""
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((200, dim)))
    directions = np.random.default_rng(0).standard_normal((8, dim))
    labels = rng.integers(0, 200, n)
    local = normalize(rng.standard_normal((n, 8)) @ directions)
    return normalize(
        centres[labels] + 0.6 * local + 0.05 * normalize(rng.standard_normal((n, dim)))
    )


def _check_hnsw(n: int, dim: int, tmp_path: Path) -> None:
    vectors = _clustered(n, dim, seed=1)
    db = SemanticDatabase([f"d{i}" for i in range(n)], vectors)
    assert db.index_type == "hnsw"
    queries = _clustered(200, dim, seed=2)
    exact = np.argsort(-(db.embeddings @ queries.T), axis=0)[:5].T
    found = [[h.index for h in hits] for hits in db.search(queries, 5)]
    recall = np.mean([len(set(f) & set(e)) / 5 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.95
    db.save_pretrained(tmp_path / "hnsw")
    loaded = SemanticDatabase.from_pretrained(tmp_path / "hnsw")
    assert loaded.index_type == "hnsw" and loaded.index.hnsw.efSearch == db.ef_search
    assert [[h.index for h in hits] for hits in loaded.search(queries[:20], 5)] == found[:20]


def test_large_database_switches_to_hnsw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above EXACT_MAX the index is HNSW and agrees with exact search (threshold lowered here
    to keep the build short; the real threshold is exercised by the slow test below)."""
    monkeypatch.setattr(SemanticDatabase, "EXACT_MAX", 3000)
    _check_hnsw(4000, 32, tmp_path)


@pytest.mark.slow
def test_hnsw_at_real_threshold(tmp_path: Path) -> None:
    _check_hnsw(SemanticDatabase.EXACT_MAX + 10_000, 64, tmp_path)


def test_forced_flat_on_large_input() -> None:
    vectors = _clustered(2000, 8, seed=3)
    db = SemanticDatabase([str(i) for i in range(2000)], vectors, index_type="flat")
    assert db.index_type == "flat"
    with pytest.raises(ValueError, match="index_type"):
        SemanticDatabase(["a"], np.ones((1, 2)), index_type="ivf")
