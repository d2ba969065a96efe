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
from indexes.fusion import DEFAULT_ALPHA
from pipelines.beir import BeirDataset
from pipelines.errors import OptionConflictError
from pipelines.evaluation import Run, prepare_dataset, scored
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
    """Document id -> a rank-based score, for the ``top_k`` first documents of ``hits`` (the
    product's ranked nodes): a document ranks where its best node does, and equal scores keep
    the product's order (raw scores would let trec_eval re-break ties by document id)."""
    order: list[str] = []
    seen: set[str] = set()
    for hit in hits:
        doc_id = str(hit["doc_id"])
        if doc_id not in seen:
            seen.add(doc_id)
            order.append(doc_id)
    order = order[:top_k]
    return {doc: float(len(order) - rank) for rank, doc in enumerate(order)}


def _to_documents_deep(index: Any, texts: list[str], hits: list[list[dict[str, Any]]], top_k: int,
                       mode: QueryMode, alpha: float | None) -> list[list[dict[str, Any]]]:
    """Each query's hits extended until they name ``top_k`` documents (or hold every node a
    deeper search finds): ``top_k`` nodes name fewer documents when one has several nodes,
    and Recall@100 was then measured over fewer than 100 documents. The first list stays as
    it is (a deeper hybrid search fuses more candidates and could reorder it); the deeper
    search's further documents follow it. The depth grows 4x a round until the index has no
    more nodes to give: a cap at 16x stopped at 80 documents for 20-node documents (small
    chunks), and the judged documents ranked 81-100 counted as never found."""
    short = [i for i, found in enumerate(hits)
             if len(found) == top_k and len({hit["doc_id"] for hit in found}) < top_k]
    depth = top_k
    while short:
        depth *= 4
        deeper = index.search_many([SearchRequest(texts[i], depth, mode=mode, alpha=alpha, rerank=False)
                                    for i in short])
        for i, found in zip(short, deeper, strict=True):
            named = {hit["doc_id"] for hit in hits[i]}
            hits[i] = hits[i] + [hit for hit in found if hit["doc_id"] not in named]
        short = [i for i, found in zip(short, deeper, strict=True)
                 if len(found) == depth and len({hit["doc_id"] for hit in hits[i]}) < top_k]
    return hits


def _refuse_foreign_documents(index_dir: Path, dataset: BeirDataset, corpus_file: Path) -> None:
    """Refuse an index that eval did not make (no corpus file of its own beside it) holding
    documents outside the dataset: eval makes the index hold its sample alone, and deleted a
    user's own documents from an ``--index-dir`` pointed at their index, exit 0, not a word."""
    if corpus_file.is_file() or not (index_dir / "CURRENT").is_file():
        return
    from indexes import FaissVectorStore

    foreign = sorted(set(FaissVectorStore.open(index_dir, use_gpu=False).doc_hashes()) - set(dataset.corpus))
    if foreign:
        raise OptionConflictError(
            f"the index at {index_dir} holds {len(foreign)} document(s) that are not in the dataset "
            f"(e.g. {foreign[0]!r}): eval makes its index hold the dataset alone and would delete them. "
            "Give --index-dir a new folder, or leave it out for a temporary index"
        )


def reranked_on_top(reranked: list[dict[str, Any]], hits: list[dict[str, Any]], top_k: int) -> dict[str, float]:
    """Document id -> score for a reranked query: the reranked hits' documents first, in the
    reranker's order, then the rest of the plain list in its own order (what a user who
    reranks the best few of a longer list sees; scores become rank-based so they sort).
    ``reranked`` may come in the plain list's order with the reranker's scores: it is put in
    score order first (stably), since :func:`ranked_documents` keeps the order it is given."""
    reranked = sorted(reranked, key=lambda hit: -float(hit["score"]))
    order = list(ranked_documents(reranked, len(reranked)))
    seen = set(order)
    order += [doc for doc in ranked_documents(hits, top_k) if doc not in seen]
    return {doc: float(len(order) - rank) for rank, doc in enumerate(order[:top_k])}


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
    rerank: bool = False,
) -> tuple[Run, dict[str, Any]]:
    """Ingest ``dataset``'s corpus into ``index_dir`` (incrementally) and run every query.
    ``embedding`` is the already loaded encoder to use (loaded from settings if None).
    ``rerank`` reranks each query's best ``settings.rerank_depth`` hits (see
    :func:`reranked_on_top`)."""
    from pipelines.ingest import ingest

    corpus_file = index_dir.parent / f"{index_dir.name}.corpus.jsonl"
    _refuse_foreign_documents(index_dir, dataset, corpus_file)
    index_dir.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(dataset, corpus_file)
    # A reused index must hold this sample alone, whatever the user's delete_missing says.
    stats = ingest(corpus, index_dir, settings.model_copy(update={"delete_missing": True}),
                   progress=progress, embedding=embedding)
    if stats.failed:
        raise RuntimeError(f"{stats.failed} documents failed to ingest: {stats.errors[:3]}")
    index = open_index(index_dir, settings, embedding=embedding)
    query_ids, texts = dataset.query_ids(), dataset.query_texts()
    run: Run = {}
    began = time.perf_counter()
    label = f"{mode}, reranked" if rerank else mode
    with tqdm(total=len(texts), desc=f"queries ({label})", unit="query", leave=False) as bar:
        for start in range(0, len(texts), QUERY_BATCH):
            batch = texts[start : start + QUERY_BATCH]
            plain = index.search_many([SearchRequest(text, top_k, mode=mode, alpha=alpha, rerank=False) for text in batch])
            plain = _to_documents_deep(index, batch, plain, top_k, mode, alpha)
            for text, query_id, hits in zip(batch, query_ids[start:], plain, strict=False):
                if rerank:  # seconds a query: one at a time, so the bar moves
                    reranked = index.search(text, index.rerank_depth, mode=mode, alpha=alpha, rerank=True)
                    run[query_id] = reranked_on_top(reranked, hits, top_k)
                else:
                    run[query_id] = ranked_documents(hits, top_k)
                bar.update(1)
    info = {
        "ingest": {k: v for k, v in stats.to_json().items() if k != "errors"},
        "query_seconds": round(time.perf_counter() - began, 2),
        "encoder": index.encoder.describe(),
        "model": index.encoder.config.model,  # what embedded documents and queries: the index's
        "index_kind": index.store.index_kind,
        "correction": index.store.correction_summary(),
        "splitting": index.store.splitting,
        "mode": mode,
        # what the hybrid search fused with (the tuned default when none was set); dense and
        # sparse runs use no fusion
        "alpha": (next(a for a in (alpha, index.default_alpha, DEFAULT_ALPHA) if a is not None)
                  if mode == "hybrid" else None),
        "fusion": index.fusion if mode == "hybrid" else None,
        "rerank": {"depth": index.rerank_depth, "passage_tokens": index.rerank_passage_tokens} if rerank else None,
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
    rerank: bool | None = None,
    ignore_identical_ids: bool = True,
) -> dict[str, Any]:
    """Score the product's retrieval on a BEIR dataset; same metrics and keys as `evaluate`
    (``ignore_identical_ids`` as there)."""
    began = time.perf_counter()
    dataset = prepare_dataset(dataset_dir, split, max_docs=max_docs, max_queries=max_queries, seed=seed)
    settings = settings or load_settings()
    rerank = settings.rerank if rerank is None else rerank
    if index_dir is None:
        with tempfile.TemporaryDirectory(prefix="htp-eval-") as tmp:
            run, info = pipeline_run(dataset, Path(tmp) / "index", settings, mode=mode, alpha=alpha,
                                     embedding=embedding, rerank=rerank)
    else:
        run, info = pipeline_run(dataset, Path(index_dir), settings, mode=mode, alpha=alpha,
                                 embedding=embedding, rerank=rerank)
    means, queries, sample = scored(dataset, run, ignore_identical_ids)
    result: dict[str, Any] = {
        "dataset": dataset.name, "split": dataset.split, "method": f"pipeline:{mode}{'+rerank' if rerank else ''}",
        "model": info["model"], **means,
        "queries": len(dataset.queries), "docs": len(dataset.corpus),
        "describe": f"htp-index pipeline, {mode}{' reranked' if rerank else ''} ({info['encoder']})",
        "sample": sample, "pipeline": info,
        "seconds": round(time.perf_counter() - began, 2),
    }
    if per_query:
        result["per_query"] = queries
    return result
