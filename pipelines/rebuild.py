"""Rebuild: re-embed everything into a new index version, verify it, then switch atomically.

Used after changing the model, method, K policy, layers or index kind. The live version keeps
serving (readers never see a half-built index); the new version is written beside it and
becomes live only when :meth:`FaissVectorStore.persist` switches the pointer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core.schema import TextNode

from htp_embed import EncoderConfig, config_from_identity
from htp_embed.llama_index import HTPEmbedding
from indexes import FaissVectorStore, IndexNotFoundError
from pipelines.chunking import embed_text
from pipelines.index_access import encoder_settings_for, index_lock
from pipelines.ingest import (
    Progress,
    RunStats,
    doc_id_of,
    embed_batch_isolated,
    ensure_correction,
    node_batches,
    node_vectors,
    split_all,
)
from pipelines.query import same_encoder
from pipelines.settings import Settings, load_settings
from pipelines.sources import SourceDocument, iter_source

log = logging.getLogger(__name__)


class RebuildVerificationError(RuntimeError):
    """The new version did not pass its checks; the old version stays live."""


def target_encoder(index_dir: Path, settings: Settings, overrides: dict[str, Any]) -> EncoderConfig:
    """The rebuilt index's encoder: the current one with the explicitly configured settings and
    then ``overrides`` (the command-line options given) applied."""
    base = encoder_settings_for(index_dir, settings)
    given = {key: value for key, value in overrides.items() if value is not None}
    if "model" in given and not {"rewire_start", "rewire_stop", "exit_layer"} & set(given):
        # layer settings are per model: let the new model's defaults apply
        given.update(rewire_start=None, rewire_stop=None, exit_layer="default")
    return EncoderConfig(**{**base.model_dump(), **given})


def stored_documents(store: FaissVectorStore) -> tuple[dict[str, list[TextNode]], dict[str, str]]:
    """The nodes of every document in ``store`` (text, metadata, relationships; no vectors) and
    the documents' content hashes."""
    by_doc: dict[str, list[TextNode]] = {}
    for node in store.all_nodes():
        fresh = TextNode(
            id_=node.node_id, text=node.get_content(), metadata=dict(node.metadata),
            relationships=dict(node.relationships),
            excluded_embed_metadata_keys=list(node.excluded_embed_metadata_keys),
            excluded_llm_metadata_keys=list(node.excluded_llm_metadata_keys),
        )
        by_doc.setdefault(node.ref_doc_id or str(node.metadata.get("doc_id")), []).append(fresh)
    return by_doc, store.doc_hashes()


def verify(store: FaissVectorStore, expected_count: int, probe: list[float] | None) -> None:
    """Checks before the switch: every node has its vector, and a search answers."""
    if store.count != expected_count:
        raise RebuildVerificationError(f"rebuilt index holds {store.count} vectors, expected {expected_count}")
    if probe is not None and expected_count:
        from llama_index.core.vector_stores.types import VectorStoreQuery

        result = store.query(VectorStoreQuery(query_embedding=probe, similarity_top_k=1))
        if not result.ids:
            raise RebuildVerificationError("rebuilt index returned nothing for a probe query")


@dataclass
class RebuildPlan:
    """What a rebuild re-embeds, and with which encoder and index kind."""

    encoder: EncoderConfig
    index_kind: str
    by_doc: dict[str, list[TextNode]]
    hashes: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def total_nodes(self) -> int:
        return sum(len(nodes) for nodes in self.by_doc.values())


def plan_rebuild(
    index_dir: Path,
    settings: Settings,
    embedding: HTPEmbedding,
    *,
    index_kind: str | None = None,
    source: str | Path | None = None,
) -> RebuildPlan:
    """The nodes to re-embed: the stored ones, or the re-read and re-split ``source``."""
    stats = RunStats()
    if source is not None:
        items = list(iter_source(source, max_bytes=int(settings.max_document_mb * 2**20)))
        for error in (i for i in items if not isinstance(i, SourceDocument)):
            stats.fail(error.doc_id, error.error)
        readable = [i for i in items if isinstance(i, SourceDocument)]
        by_doc, failed = split_all(readable, settings, embedding, stats)
        hashes = {d.doc_id: d.content_hash for d in readable if d.doc_id not in failed}
    else:
        old = FaissVectorStore.open(index_dir, use_gpu=False)
        by_doc, hashes = stored_documents(old)
    kind = index_kind or FaissVectorStore.read_manifest(index_dir).index_kind
    errors = {e["doc_id"]: e["error"] for e in stats.errors}
    return RebuildPlan(settings.encoder, kind, by_doc, hashes, errors)


def write_rebuild(
    index_dir: Path,
    plan: RebuildPlan,
    nodes: list[TextNode],
    errors: dict[str, str],
    settings: Settings,
    embedding: HTPEmbedding,
) -> RunStats:
    """Build the new version beside the live one, verify it, and switch to it atomically."""
    stats = RunStats()
    for doc_id, error in {**plan.errors, **errors}.items():
        stats.fail(doc_id, error)
    failed = set(errors)
    new = FaissVectorStore.create(
        index_dir, dim=embedding.dim, encoder=embedding.identity(), metric=settings.metric,
        index_kind=plan.index_kind, **settings.faiss_placement(),
        overwrite=True, persist_now=False, keep_versions=settings.keep_versions,
    )
    keep = [n for n in nodes if doc_id_of(n) not in failed]
    ensure_correction(new, node_vectors(keep), [embed_text(n) for n in keep], embedding, settings)
    new.add(keep)
    for doc_id, content_hash in plan.hashes.items():
        if doc_id not in failed and doc_id in plan.by_doc:
            new.set_doc_hash(doc_id, content_hash)
    verify(new, len(keep), embedding.get_query_embedding("probe") if keep else None)
    stats.nodes_embedded = len(keep)
    stats.added = len([d for d in plan.by_doc if d not in failed])
    stats.version = new.persist()
    stats.count = new.count
    return stats


def rebuild_keeping_vectors(
    index_dir: Path, settings: Settings, index_kind: str | None, embedding: HTPEmbedding | None = None
) -> RunStats:
    """A new version from the stored nodes *and vectors*, without the encoder: adds what an
    index written by an older htp-index lacks (the keyword table; a vector correction fitted
    on its stored vectors, which are then still as the encoder made them), or changes the
    index kind. The encoder (``embedding``, loaded if not given) only embeds the pseudo-queries
    of a new correction. The caller holds the writer lock."""
    old = FaissVectorStore.open(index_dir, use_gpu=False)
    nodes = old.all_nodes()
    vectors = dict(old.iter_embeddings())
    kind = index_kind or old.index_kind
    new = FaissVectorStore.create(
        index_dir, dim=old.dim, encoder=old.encoder, metric=old.metric, index_kind=kind,
        **settings.faiss_placement(), overwrite=True, persist_now=False,
        keep_versions=settings.keep_versions,
    )
    matrix = np.asarray([vectors[n.node_id] for n in nodes], dtype=np.float32).reshape(-1, old.dim)
    if old.correction is not None:
        new.set_correction(old.correction)
    elif settings.correction != "none" and len(nodes):  # the encoder is needed only to fit one
        if embedding is None or not same_encoder(embedding.identity(), old.encoder):
            embedding = HTPEmbedding(config=config_from_identity(old.encoder, **settings.runtime_encoder_settings()))
        ensure_correction(new, matrix, [embed_text(n) for n in nodes], embedding, settings)
    new.add(nodes, embeddings=matrix, corrected=old.correction is not None)
    for doc_id, content_hash in old.doc_hashes().items():
        new.set_doc_hash(doc_id, content_hash)
    verify(new, len(nodes), None)
    stats = RunStats(added=len(old.doc_hashes()), count=new.count)
    stats.version = new.persist()
    return stats


def rebuild(
    index_dir: str | Path,
    settings: Settings | None = None,
    *,
    encoder_overrides: dict[str, Any] | None = None,
    index_kind: str | None = None,
    source: str | Path | None = None,
    embedding: HTPEmbedding | None = None,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
    keep_vectors: bool = False,
) -> RunStats:
    """Re-embed the index at ``index_dir`` with a (possibly) new encoder and index kind.

    By default the stored nodes are re-embedded as they are; with ``source`` the documents are
    re-read and re-split (use this when the new model's window differs). ``added`` in the
    returned statistics counts the documents re-embedded. ``keep_vectors`` re-uses the stored
    vectors instead (see :func:`rebuild_keeping_vectors`); it cannot change the encoder.
    """
    settings = settings or load_settings()
    index_dir = Path(index_dir)
    if not FaissVectorStore.exists(index_dir):
        raise IndexNotFoundError(f"no index at {index_dir} to rebuild; create one with htp-index ingest")
    began = time.perf_counter()
    if keep_vectors and (source is not None or any(v is not None for v in (encoder_overrides or {}).values())):
        raise ValueError("--keep-vectors re-uses the stored vectors, so it cannot change the "
                         "encoder or re-read a source; drop it to re-embed")
    with index_lock(index_dir, settings.lock_timeout):
        if keep_vectors:
            stats = rebuild_keeping_vectors(index_dir, settings, index_kind, embedding)
            stats.seconds = time.perf_counter() - began
            log.info("rebuilt %s as version %s from its stored vectors", index_dir, stats.version)
            return stats
        config = target_encoder(index_dir, settings, encoder_overrides or {})
        settings = settings.model_copy(update={"encoder": config})
        embedding = embedding or HTPEmbedding(config=config)
        plan = plan_rebuild(index_dir, settings, embedding, index_kind=index_kind, source=source)
        if on_total:
            on_total(plan.total_nodes)
        tokens_before = embedding.encoder.stats.tokens
        nodes: list[TextNode] = []
        errors: dict[str, str] = {}
        for batch in node_batches(plan.by_doc, settings.nodes_per_batch):
            embedded, batch_errors = embed_batch_isolated(batch, embedding, progress)
            nodes += embedded
            errors.update(batch_errors)
        stats = write_rebuild(index_dir, plan, nodes, errors, settings, embedding)
        stats.tokens = embedding.encoder.stats.tokens - tokens_before
    stats.seconds = time.perf_counter() - began
    log.info("rebuilt %s as version %s with %s", index_dir, stats.version, embedding.model_name)
    return stats
