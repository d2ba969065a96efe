"""Incremental ingestion: diff a source against the index, embed only what changed, persist a
new index version atomically.

The steps are plain functions (plan -> split -> embed -> apply -> persist) so Prefect flows can
run each as a task, and :func:`ingest` runs them in-process. Nothing reaches the live index
until :meth:`FaissVectorStore.persist` switches versions, so a crash at any point leaves the
last good version serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core.schema import TextNode

from htp_embed.llama_index import HTPEmbedding
from indexes import FaissVectorStore
from pipelines.chunking import default_chunk_size, embed_text, make_splitter, split_documents
from pipelines.correction import fit_correction
from pipelines.index_access import index_lock, load_embedding, open_or_create_store
from pipelines.settings import Settings, load_settings
from pipelines.sources import SourceDocument, SourceError, SourceItem, iter_source

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class RunStats:
    """What a run did; printed by the CLI, published as a Prefect artifact."""

    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0
    nodes_embedded: int = 0
    tokens: int = 0
    seconds: float = 0.0
    version: int | None = None
    count: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)

    def fail(self, doc_id: str, error: str) -> None:
        self.failed += 1
        self.errors.append({"doc_id": doc_id, "error": error})
        log.warning("document %s failed: %s", doc_id, error)

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added, "updated": self.updated, "deleted": self.deleted,
            "unchanged": self.unchanged, "failed": self.failed,
            "nodes_embedded": self.nodes_embedded, "tokens": self.tokens,
            "seconds": round(self.seconds, 3), "version": self.version, "count": self.count,
            "errors": self.errors,
        }

    def to_markdown(self, title: str = "Ingest run") -> str:
        rows = "\n".join(
            f"| {key} | {value} |" for key, value in self.to_json().items() if key != "errors"
        )
        errors = "\n".join(f"- `{e['doc_id']}`: {e['error']}" for e in self.errors[:50])
        more = f"\n- … and {len(self.errors) - 50} more" if len(self.errors) > 50 else ""
        return f"# {title}\n\n| stat | value |\n|---|---|\n{rows}\n" + (
            f"\n## Failed documents\n{errors}{more}\n" if self.errors else ""
        )


@dataclass
class IngestPlan:
    """The diff of a source against an index."""

    new: list[SourceDocument] = field(default_factory=list)
    changed: list[SourceDocument] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    errors: list[SourceError] = field(default_factory=list)

    @property
    def to_embed(self) -> list[SourceDocument]:
        return self.new + self.changed


def plan_ingest(items: Iterable[SourceItem], known: dict[str, str], *, delete_missing: bool = True) -> IngestPlan:
    """Classify each source document as new, changed or unchanged against ``known`` hashes, and
    known documents missing from the source as deleted.

    A document that fails to read keeps its indexed version: a broken file must not erase what
    was good yesterday.
    """
    plan = IngestPlan()
    seen: set[str] = set()
    for item in items:
        seen.add(item.doc_id)
        if isinstance(item, SourceError):
            plan.errors.append(item)
        elif item.doc_id not in known:
            plan.new.append(item)
        elif known[item.doc_id] != item.content_hash:
            plan.changed.append(item)
        else:
            plan.unchanged.append(item.doc_id)
    if delete_missing:
        plan.deleted = sorted(set(known) - seen)
    return plan


def embed_nodes(
    nodes: Sequence[TextNode], embedding: HTPEmbedding, progress: Progress | None = None
) -> list[TextNode]:
    """Set ``node.embedding`` on every node, in the encoder's batches; returns the nodes."""
    if not nodes:
        return []
    # Straight to the encoder: it length-sorts the whole batch (LlamaIndex's batching would
    # sort only within each embed_batch_size slice, padding more).
    vectors = embedding.encoder.encode_documents([embed_text(n) for n in nodes])
    for node, vector in zip(nodes, vectors, strict=True):
        node.embedding = vector.tolist()
    if progress:
        progress(len(nodes))
    return list(nodes)


def split_all(
    docs: Sequence[SourceDocument], settings: Settings, embedding: HTPEmbedding, stats: RunStats
) -> tuple[dict[str, list[TextNode]], set[str]]:
    """Nodes of each document (a document that fails to split is reported and skipped)."""
    splitter = make_splitter(_tokenizer_of(embedding), chunk_size_for(settings), settings.chunk_overlap)
    by_doc: dict[str, list[TextNode]] = {}
    failed: set[str] = set()
    for doc in docs:
        try:
            by_doc[doc.doc_id] = split_documents([doc], splitter)
        except Exception as exc:
            stats.fail(doc.doc_id, f"could not split: {type(exc).__name__}: {exc}")
            failed.add(doc.doc_id)
    return by_doc, failed


def node_batches(by_doc: dict[str, list[TextNode]], nodes_per_batch: int) -> list[list[TextNode]]:
    """Whole documents grouped into batches of about ``nodes_per_batch`` nodes."""
    batches: list[list[TextNode]] = [[]]
    for nodes in by_doc.values():
        if batches[-1] and len(batches[-1]) + len(nodes) > nodes_per_batch:
            batches.append([])
        batches[-1].extend(nodes)
    return [batch for batch in batches if batch]


def embed_batch_isolated(
    batch: list[TextNode], embedding: HTPEmbedding, progress: Progress | None = None
) -> tuple[list[TextNode], dict[str, str]]:
    """Embed a batch; if it fails, retry document by document so one bad document costs only
    itself. Returns (embedded nodes, {failed doc id: error})."""
    try:
        return embed_nodes(batch, embedding, progress), {}
    except Exception as exc:  # isolate the culprit, whatever broke
        log.warning("embedding batch failed (%s); retrying its documents one by one", exc)
    groups: dict[str, list[TextNode]] = {}
    for node in batch:
        groups.setdefault(doc_id_of(node), []).append(node)
    embedded: list[TextNode] = []
    errors: dict[str, str] = {}
    for doc_id, nodes in groups.items():
        try:
            embedded += embed_nodes(nodes, embedding, progress)
        except Exception as exc:
            errors[doc_id] = f"could not embed: {type(exc).__name__}: {exc}"
            if progress:
                progress(len(nodes))
    return embedded, errors


def doc_id_of(node: TextNode) -> str:
    return node.ref_doc_id or str(node.metadata["doc_id"])


def apply_changes(
    store: FaissVectorStore,
    plan: IngestPlan,
    nodes: Sequence[TextNode],
    failed: set[str],
    stats: RunStats,
) -> None:
    """Replace changed documents' nodes, add new ones, remove deleted ones, record hashes."""
    by_doc: dict[str, list[TextNode]] = {}
    for node in nodes:
        by_doc.setdefault(doc_id_of(node), []).append(node)
    changed = {doc.doc_id for doc in plan.changed}
    for doc in plan.to_embed:
        if doc.doc_id in failed:
            continue
        if doc.doc_id in changed:
            store.delete(doc.doc_id)
        store.add(by_doc.get(doc.doc_id, []))
        store.set_doc_hash(doc.doc_id, doc.content_hash)
    for doc_id in plan.deleted:
        store.delete(doc_id)
    stats.added = sum(1 for d in plan.new if d.doc_id not in failed)
    stats.updated = sum(1 for d in plan.changed if d.doc_id not in failed)
    stats.deleted = len(plan.deleted)
    stats.unchanged = len(plan.unchanged)
    stats.nodes_embedded = len(nodes)


def ensure_correction(
    store: FaissVectorStore, vectors: np.ndarray, texts: Sequence[str], embedding: HTPEmbedding, settings: Settings
) -> None:
    """Fit the index's vector correction from the encoder's ``vectors`` of ``texts`` when its
    version is filled for the first time (a new index, or a rebuild); afterwards it stays
    frozen so every vector is corrected alike."""
    if store.count or store.correction is not None or not len(vectors):
        return
    correction = fit_correction(vectors, texts, embedding.encoder, kind=settings.correction)
    if correction is not None:
        store.set_correction(correction)
        log.info("fitted the vector correction on %d nodes and %d pseudo-queries",
                 correction.fitted_on, correction.pseudo_queries)


def node_vectors(nodes: Sequence[TextNode]) -> np.ndarray:
    """The nodes' embeddings as one float32 matrix."""
    return np.asarray([node.embedding for node in nodes], dtype=np.float32)


def chunk_size_for(settings: Settings) -> int:
    return settings.chunk_size or default_chunk_size(settings.encoder)


def _tokenizer_of(embedding: HTPEmbedding) -> Callable[[str], list[int]]:
    tokenizer = embedding.encoder.tokenizer

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    return tokenize


def ingest(
    source: str | Path | Iterable[str] | dict[str, str],
    index_dir: str | Path,
    settings: Settings | None = None,
    *,
    embedding: HTPEmbedding | None = None,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> RunStats:
    """Bring the index at ``index_dir`` in line with ``source``; returns the run's statistics.

    Re-running on unchanged input embeds nothing and writes no new version.
    """
    settings = settings or load_settings()
    index_dir = Path(index_dir)
    began = time.perf_counter()
    stats = RunStats()
    with index_lock(index_dir, settings.lock_timeout):
        embedding, settings = load_embedding(index_dir, settings, embedding)
        store = open_or_create_store(index_dir, settings, embedding)
        items = iter_source(source, max_bytes=int(settings.max_document_mb * 2**20))
        plan = plan_ingest(items, store.doc_hashes(), delete_missing=settings.delete_missing)
        for error in plan.errors:
            stats.fail(error.doc_id, error.error)
        by_doc, failed = split_all(plan.to_embed, settings, embedding, stats)
        if on_total:
            on_total(sum(len(nodes) for nodes in by_doc.values()))
        tokens_before = embedding.encoder.stats.tokens
        nodes: list[TextNode] = []
        for batch in node_batches(by_doc, settings.nodes_per_batch):
            embedded, errors = embed_batch_isolated(batch, embedding, progress)
            nodes += embedded
            for doc_id, error in errors.items():
                stats.fail(doc_id, error)
                failed.add(doc_id)
        ensure_correction(store, node_vectors(nodes), [embed_text(n) for n in nodes], embedding, settings)
        apply_changes(store, plan, nodes, failed, stats)
        stats.tokens = embedding.encoder.stats.tokens - tokens_before
        if plan.to_embed or plan.deleted or store.version is None:
            stats.version = store.persist()
        else:
            stats.version = store.version
        stats.count = store.count
    stats.seconds = time.perf_counter() - began
    log.info("ingest into %s: %s", index_dir, {k: v for k, v in stats.to_json().items() if k != "errors"})
    return stats
