"""Retrieval quality measured through the product itself: ingest, then query the index.

`evaluate` in :mod:`pipelines.evaluation` scores an encoder on texts embedded directly (the
research harness, for comparing methods). This module scores what a user gets: the BEIR corpus
is written as the JSONL file a user would ingest, ingested with the product's own settings
(chunking, index kind, vector correction, keyword table) by :func:`pipelines.ingest.ingest`,
and every query goes through :meth:`pipelines.query.OpenIndex.search_many` in the chosen
mode, exactly as ``htp-index query`` and the HTTP service run it. A document scores its best
node's score (documents longer than one node are split into several).

The index can be kept (``index_dir``): ingest is incremental, so a second run on the same
sample embeds nothing and only queries, which is how modes and hybrid weights are compared on
one index.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from htp_embed.llama_index import HTPEmbedding
from pipelines.beir import BeirDataset
from pipelines.evaluation import Run, prepare_dataset, score_run
from pipelines.query import QueryMode, SearchRequest, open_index
from pipelines.settings import Settings, load_settings

QUERY_BATCH = 32
TOP_K = 100


def write_corpus(dataset: BeirDataset, path: Path) -> Path:
    """The (sub)sampled corpus as a BEIR JSONL file, the form `htp-index ingest` reads."""
    with open(path, "w", encoding="utf-8") as handle:
        for doc_id, doc in dataset.corpus.items():
            handle.write(json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}) + "\n")
    return path


def ranked_documents(hits: list[dict[str, Any]], top_k: int) -> dict[str, float]:
    """Document id -> its best node's score, for the ``top_k`` best documents."""
    best: dict[str, float] = {}
    for hit in hits:
        doc_id, score = str(hit["doc_id"]), float(hit["score"])
        if score > best.get(doc_id, float("-inf")):
            best[doc_id] = score
    return dict(sorted(best.items(), key=lambda item: -item[1])[:top_k])


def pipeline_run(
    dataset: BeirDataset,
    index_dir: Path,
    settings: Settings,
    *,
    mode: QueryMode,
    alpha: float | None = None,
    top_k: int = TOP_K,
    progress: Callable[[int], None] | None = None,
    embedding: HTPEmbedding | None = None,
) -> tuple[Run, dict[str, Any]]:
    """Ingest ``dataset``'s corpus into ``index_dir`` (incrementally) and run every query.
    ``embedding`` is the already loaded encoder to use (loaded from settings if None)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    from pipelines.ingest import ingest

    corpus = write_corpus(dataset, index_dir.parent / f"{index_dir.name}.corpus.jsonl")
    stats = ingest(corpus, index_dir, settings, progress=progress, embedding=embedding)
    if stats.failed:
        raise RuntimeError(f"{stats.failed} documents failed to ingest: {stats.errors[:3]}")
    index = open_index(index_dir, settings, embedding=embedding)
    query_ids, texts = dataset.query_ids(), dataset.query_texts()
    run: Run = {}
    began = time.perf_counter()
    with tqdm(total=len(texts), desc=f"queries ({mode})", unit="query", leave=False) as bar:
        for start in range(0, len(texts), QUERY_BATCH):
            requests = [SearchRequest(text, top_k, mode=mode, alpha=alpha)
                        for text in texts[start : start + QUERY_BATCH]]
            for query_id, hits in zip(query_ids[start:], index.search_many(requests), strict=False):
                run[query_id] = ranked_documents(hits, top_k)
            bar.update(len(requests))
    info = {
        "ingest": {k: v for k, v in stats.to_json().items() if k != "errors"},
        "query_seconds": round(time.perf_counter() - began, 2),
        "encoder": index.embedding.model_name,
        "index_kind": index.store.index_kind,
        "correction": index.store.correction_summary(),
        "mode": mode,
        "alpha": alpha if alpha is not None else index.default_alpha,
    }
    return run, info


def evaluate_pipeline(
    dataset_dir: str | Path | BeirDataset,
    split: str = "train",
    *,
    mode: QueryMode = "hybrid",
    alpha: float | None = None,
    settings: Settings | None = None,
    index_dir: str | Path | None = None,
    max_docs: int | None = None,
    max_queries: int | None = None,
    seed: int = 0,
    per_query: bool = False,
    embedding: HTPEmbedding | None = None,
) -> dict[str, Any]:
    """Score the product's retrieval on a BEIR dataset; same metrics and keys as `evaluate`."""
    began = time.perf_counter()
    dataset = prepare_dataset(dataset_dir, split, max_docs=max_docs, max_queries=max_queries, seed=seed)
    settings = settings or load_settings()
    if index_dir is None:
        with tempfile.TemporaryDirectory(prefix="htp-eval-") as tmp:
            run, info = pipeline_run(dataset, Path(tmp) / "index", settings, mode=mode, alpha=alpha,
                                     embedding=embedding)
    else:
        run, info = pipeline_run(dataset, Path(index_dir), settings, mode=mode, alpha=alpha, embedding=embedding)
    means, queries = score_run(dataset.qrels, run)
    result: dict[str, Any] = {
        "dataset": dataset.name, "split": split, "method": f"pipeline:{mode}",
        "model": settings.encoder.model, **means,
        "queries": len(dataset.queries), "docs": len(dataset.corpus),
        "describe": f"htp-index pipeline, {mode} ({info['encoder']})",
        "sample": dict(dataset.notes), "pipeline": info,
        "seconds": round(time.perf_counter() - began, 2),
    }
    if per_query:
        result["per_query"] = queries
    return result
