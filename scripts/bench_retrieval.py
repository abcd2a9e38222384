"""Benchmark the semantic database at scale: ms/query and recall@k of the HNSW index vs exact search.

The vectors are random but structured like sentence embeddings: unit vectors around a two-level
hierarchy of topic centres (super-topics -> topics -> descriptions), so that a query has a few
close neighbours and many moderately similar ones, as real description databases do. Queries are
fresh draws from the same distribution (not database members).

    .venv/bin/python scripts/bench_retrieval.py                 # 1M x 384, the design target
    .venv/bin/python scripts/bench_retrieval.py --n 100000 --ef-search 32,64

Goal: <= 2 ms per single query at recall@5 >= 0.95 (one query at a time, as the app asks).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from rsvlm.retrieval import SemanticDatabase, normalize


def structured_vectors(
    n: int,
    dim: int,
    topics: int,
    super_topics: int,
    rng: np.random.Generator,
    intrinsic_dim: int = 24,
    spread: float = 1.0,
) -> np.ndarray:
    """``n`` unit vectors around ``topics`` centres (themselves around ``super_topics``).

    Around its centre, each topic varies along ``intrinsic_dim`` random directions of its own
    (plus 10% isotropic noise): sentence embeddings live near a low-dimensional manifold, which
    is what makes approximate search work on them. ``intrinsic_dim=0`` draws isotropic noise in
    all ``dim`` directions instead, the worst case for any index (neighbours become near-ties).
    """
    supers = normalize(rng.standard_normal((super_topics, dim), dtype=np.float32))
    parent = rng.integers(0, super_topics, topics)
    centres = normalize(
        supers[parent] + 0.8 * normalize(rng.standard_normal((topics, dim), dtype=np.float32))
    )
    # Zipf-like topic sizes: a few common scene types, a long tail of rare ones.
    weights = 1.0 / np.arange(1, topics + 1) ** 0.7
    labels = rng.choice(topics, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), dtype=np.float32)
    if intrinsic_dim <= 0:
        for start in range(0, n, 200_000):
            stop = min(n, start + 200_000)
            noise = normalize(rng.standard_normal((stop - start, dim), dtype=np.float32))
            out[start:stop] = normalize(centres[labels[start:stop]] + spread * noise)
        return out
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(topics + 1))
    for t in range(topics):
        members = order[bounds[t] : bounds[t + 1]]
        if not len(members):
            continue
        basis = rng.standard_normal((intrinsic_dim, dim), dtype=np.float32) / np.sqrt(dim)
        coeffs = rng.standard_normal((len(members), intrinsic_dim), dtype=np.float32)
        local = normalize(coeffs @ basis)
        iso = normalize(rng.standard_normal((len(members), dim), dtype=np.float32))
        out[members] = normalize(centres[t] + spread * local + 0.1 * iso)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--topics", type=int, default=5000)
    parser.add_argument("--super-topics", type=int, default=100)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument(
        "--intrinsic-dim",
        type=int,
        default=24,
        help="local dimensions per topic (0: isotropic noise, the worst case)",
    )
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--ef-search", default="32,64,96,128,192")
    parser.add_argument("--threads", type=int, default=0, help="faiss threads (0: faiss default)")
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "hnsw"])
    parser.add_argument("--m", type=int, default=SemanticDatabase.HNSW_M, help="HNSW degree")
    parser.add_argument(
        "--ef-construction", type=int, default=SemanticDatabase.HNSW_EF_CONSTRUCTION
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench_retrieval")

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    # One draw for database + queries so queries come from the same topics.
    vectors = structured_vectors(
        args.n + args.queries, args.dim, args.topics, args.super_topics, rng, args.intrinsic_dim
    )
    base, queries = vectors[: args.n], vectors[args.n :].copy()
    del vectors
    log.info("generated %d x %d vectors in %.1f s", args.n, args.dim, time.perf_counter() - t0)

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(base)
    t0 = time.perf_counter()
    _, truth = exact.search(queries, args.k)
    exact_ms = (time.perf_counter() - t0) * 1000 / args.queries
    del exact
    log.info("exact search (batched): %.2f ms/query", exact_ms)

    # Index settings are class attributes of the database; override them for this run.
    SemanticDatabase.HNSW_M = args.m
    SemanticDatabase.HNSW_EF_CONSTRUCTION = args.ef_construction
    texts = [f"description {i}" for i in range(args.n)]
    t0 = time.perf_counter()
    db = SemanticDatabase(texts, base, index_type=args.index)
    build_s = time.perf_counter() - t0
    del base
    log.info("built %r in %.1f s", db, build_s)

    results = []
    for ef in (int(x) for x in args.ef_search.split(",")):
        db.set_ef_search(ef)
        db.search(queries[:20], args.k)  # warm up
        found = np.empty((args.queries, args.k), dtype=np.int64)
        t0 = time.perf_counter()
        for i in range(args.queries):  # one query at a time: the app's access pattern
            hits = db.search(queries[i], args.k)[0]
            found[i, : len(hits)] = [h.index for h in hits]
        ms = (time.perf_counter() - t0) * 1000 / args.queries
        recall = float(
            np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth, strict=True)])
        )
        results.append(
            {"ef_search": ef, "ms_per_query": round(ms, 3), f"recall@{args.k}": round(recall, 4)}
        )
        print(
            f"{db.index_type} M={db.HNSW_M} efSearch={ef:4d}: {ms:6.3f} ms/query  recall@{args.k}={recall:.4f}"
        )

    summary = {
        "n": args.n,
        "dim": args.dim,
        "index": db.index_type,
        "hnsw_m": args.m,
        "ef_construction": args.ef_construction,
        "build_s": round(build_s, 1),
        "exact_batched_ms_per_query": round(exact_ms, 3),
        "threads": faiss.omp_get_max_threads(),
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
