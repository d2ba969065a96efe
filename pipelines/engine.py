"""The one engine behind ingest and rebuild: :class:`IndexSession`.

A session is one writer's hold on one index. It takes the writer lock, reads the manifest
once, resolves the encoder from it, opens (or creates) the store once, and owns the steps

    ingest:  plan -> split -> embed -> apply-and-persist
    rebuild: plan-rebuild -> embed -> write-verify-switch

Both ``htp-index ingest/rebuild`` (in-process) and the Prefect flows run these same steps; a
:class:`StepRunner` only decides *where* each step runs (here, or as a Prefect task whose
embedding batches fan out to threads or Dask workers). Workers receive a frozen
:class:`~htp_embed.EncoderConfig` and node batches, never a path, and return an
:class:`EmbeddedBatch` stamped with the identity of the encoder that made it; the apply step
refuses vectors from any other encoder.

Nothing reaches the live index until :meth:`FaissVectorStore.persist` switches versions, so a
crash at any point leaves the last good version serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery

from htp_embed import EncoderConfig, HTPEncoder, config_from_identity
from indexes import EncoderMismatchError, FaissVectorStore, IndexNotFoundError, same_encoder
from indexes.spec import Manifest
from pipelines.chunking import default_chunk_size, embed_text, make_splitter, split_documents
from pipelines.correction import fit_correction
from pipelines.errors import IndexKindMismatchError, RebuildVerificationError
from pipelines.lock import index_lock
from pipelines.runs import IngestPlan, RebuildPlan, RunStats, SplitNodes, plan_ingest
from pipelines.settings import Settings, load_settings
from pipelines.sources import SourceDocument, SourceError, iter_source

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
T = TypeVar("T")

# Layer settings are per model: a rebuild onto another model takes that model's defaults
# unless layers are given too.
_LAYER_RESET = {"rewire_start": None, "rewire_stop": None, "exit_layer": "default"}


# --------------------------------------------------------------------------- embedding
@dataclass(frozen=True)
class EmbeddedBatch:
    """Vectors of a batch of nodes (row i is ``node_ids[i]``), the documents that could not be
    embedded (id -> why), the tokens the encoder ran, and the identity of that encoder."""

    node_ids: list[str]
    vectors: np.ndarray
    identity: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)
    tokens: int = 0

    @cached_property
    def _row(self) -> dict[str, int]:
        return {node_id: i for i, node_id in enumerate(self.node_ids)}

    def rows_of(self, nodes: Sequence[TextNode]) -> np.ndarray:
        """The vectors of ``nodes``, in their order."""
        return self.vectors[[self._row[node.node_id] for node in nodes]].reshape(len(nodes), self.vectors.shape[1])


def embed_batch(batch: Sequence[TextNode], encoder: HTPEncoder, progress: Progress | None = None) -> EmbeddedBatch:
    """Embed a batch of nodes; if the batch fails, retry it document by document so one bad
    document costs only itself. This is the unit a task runner fans out."""
    try:
        return _embed(batch, encoder, progress)
    except Exception as exc:  # isolate the culprit, whatever broke
        log.warning("embedding batch failed (%s); retrying its documents one by one", exc)
    groups: dict[str, list[TextNode]] = {}
    for node in batch:
        groups.setdefault(doc_id_of(node), []).append(node)
    parts: list[EmbeddedBatch] = []
    errors: dict[str, str] = {}
    for doc_id, nodes in groups.items():
        try:
            parts.append(_embed(nodes, encoder, progress))
        except Exception as exc:
            errors[doc_id] = f"could not embed: {type(exc).__name__}: {exc}"
            if progress:
                progress(len(nodes))
    return combine(parts, encoder.identity(), encoder.dim, errors)


def _embed(nodes: Sequence[TextNode], encoder: HTPEncoder, progress: Progress | None) -> EmbeddedBatch:
    encoded = encoder.encode_with_stats([embed_text(node) for node in nodes])
    if progress:
        progress(len(nodes))
    return EmbeddedBatch([node.node_id for node in nodes], encoded.vectors, encoder.identity(), tokens=encoded.tokens)


def combine(
    batches: Sequence[EmbeddedBatch], identity: dict[str, Any], dim: int, errors: Mapping[str, str] | None = None
) -> EmbeddedBatch:
    """One batch of all ``batches``, refusing any made by an encoder other than ``identity``."""
    for batch in batches:
        if not same_encoder(batch.identity, identity):
            raise EncoderMismatchError(
                f"an embedding batch came from encoder {batch.identity}, but the index's encoder "
                f"is {identity}; nothing was written"
            )
    merged = dict(errors or {})
    for batch in batches:
        merged.update(batch.errors)
    vectors = [batch.vectors for batch in batches if len(batch.node_ids)]
    return EmbeddedBatch(
        [node_id for batch in batches for node_id in batch.node_ids],
        np.concatenate(vectors).astype(np.float32, copy=False) if vectors else np.zeros((0, dim), np.float32),
        identity, merged, sum(batch.tokens for batch in batches),
    )


def doc_id_of(node: TextNode) -> str:
    return node.ref_doc_id or str(node.metadata["doc_id"])


# --------------------------------------------------------------------------- where steps run
class StepRunner(Protocol):
    """Where a session's steps run: :class:`InProcess`, or Prefect tasks (``flows``)."""

    def run(self, name: str, step: Callable[..., T], *args: Any) -> T:
        """Run one step (``plan``, ``split``, ``apply-and-persist``…) and return its result."""
        ...

    def embed(self, batches: list[list[TextNode]], session: IndexSession) -> list[EmbeddedBatch]:
        """Embed every batch with exactly ``session.settings.encoder``."""
        ...


@dataclass
class InProcess:
    """Every step here, in this process, reporting embedding progress to the caller."""

    progress: Progress | None = None
    on_total: Callable[[int], None] | None = None

    def run(self, name: str, step: Callable[..., T], *args: Any) -> T:
        return step(*args)

    def embed(self, batches: list[list[TextNode]], session: IndexSession) -> list[EmbeddedBatch]:
        if self.on_total:
            self.on_total(sum(len(batch) for batch in batches))
        return [embed_batch(batch, session.encoder, self.progress) for batch in batches]


# --------------------------------------------------------------------------- the session
def resolve_encoder(
    manifest: Manifest | None, settings: Settings, overrides: Mapping[str, Any] | None = None
) -> EncoderConfig:
    """The encoder of this session: an existing index's recorded encoder (a new index: the
    settings'), with the encoder settings given explicitly (file, environment, option) and then
    ``overrides`` (a rebuild's new model, method…) applied on top. Runtime settings (device,
    batch size) always come from ``settings``."""
    if manifest is None:
        base = settings.encoder
    else:
        recorded = config_from_identity(manifest.encoder, **settings.runtime_encoder_settings())
        base = EncoderConfig(**{**recorded.model_dump(), **settings.explicit_encoder_settings()})
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if "model" in given and not set(_LAYER_RESET) & set(given):
        given = {**_LAYER_RESET, **given}
    return EncoderConfig(**{**base.model_dump(), **given}) if given else base


class IndexSession:
    """One writer on one index: the writer lock, the settings with the index's encoder filled
    in, the encoder (loaded on first use) and the store (opened once, on first use).

    >>> with IndexSession.open("idx", settings) as session:
    ...     stats = session.ingest("docs/")
    """

    def __init__(
        self, index_dir: Path, settings: Settings, manifest: Manifest | None, encoder: HTPEncoder | None = None,
        load_encoder: Callable[[EncoderConfig], HTPEncoder] = HTPEncoder,
    ):
        self.index_dir = index_dir
        self.manifest = manifest
        self.settings = settings
        self._encoder = encoder
        self._load_encoder = load_encoder
        self._store: FaissVectorStore | None = None
        self._live: FaissVectorStore | None = None

    @classmethod
    @contextmanager
    def open(
        cls,
        index_dir: str | Path,
        settings: Settings | None = None,
        *,
        encoder_overrides: Mapping[str, Any] | None = None,
        encoder: HTPEncoder | None = None,
        load_encoder: Callable[[EncoderConfig], HTPEncoder] = HTPEncoder,
    ) -> Iterator[IndexSession]:
        """Hold the writer lock on ``index_dir`` for the session. ``encoder_overrides`` (a
        rebuild's) may change the encoder; otherwise it is the index's own, and an explicitly
        different one is refused when the store opens. ``encoder`` reuses a loaded encoder;
        ``load_encoder`` loads one otherwise (a flow passes its per-process cache)."""
        settings = settings or load_settings()
        path = Path(index_dir)
        with index_lock(path, settings.lock_timeout):
            manifest = FaissVectorStore.read_manifest(path) if FaissVectorStore.exists(path) else None
            config = resolve_encoder(manifest, settings, encoder_overrides)
            yield cls(path, settings.model_copy(update={"encoder": config}), manifest, encoder, load_encoder)

    # ---------------------------------------------------------------- what it holds
    @property
    def encoder(self) -> HTPEncoder:
        """The session's encoder, loaded on first use (a worker-side step never needs it here)."""
        if self._encoder is None:
            self._encoder = self._load_encoder(self.settings.encoder)
        return self._encoder

    @property
    def store(self) -> FaissVectorStore:
        """The index to write into: the existing one, opened once and refusing another encoder or
        index kind, or a new one that is first written by :meth:`apply`."""
        if self._store is None:
            self._store = self._open_store() if self.manifest else self._create_store(self.settings.index_kind)
        return self._store

    def _open_store(self) -> FaissVectorStore:
        settings = self.settings
        store = FaissVectorStore.open(
            self.index_dir, expected_encoder=self.encoder.identity(), keep_versions=settings.keep_versions,
            **settings.faiss_placement(),
        )
        if "index_kind" in settings.model_fields_set and settings.index_kind != store.index_kind:
            raise IndexKindMismatchError(
                f"the index at {self.index_dir} is a {store.index_kind!r} index; to make it "
                f"{settings.index_kind!r}, run `htp-index rebuild --index {self.index_dir} --index-kind "
                f"{settings.index_kind} --keep-vectors` (no re-embedding)"
            )
        return store

    def _create_store(self, index_kind: str, *, dim: int | None = None, encoder: dict[str, Any] | None = None) -> FaissVectorStore:
        """An empty store at the index directory; nothing is written (and a live version keeps
        serving) until its first persist."""
        if self.manifest is None:
            log.info("creating a new %s index at %s", index_kind, self.index_dir)
        return FaissVectorStore.create(
            self.index_dir, dim=dim or self.encoder.dim, encoder=encoder or self.encoder.identity(),
            metric=self.settings.metric, index_kind=index_kind, keep_versions=self.settings.keep_versions,
            overwrite=self.manifest is not None, persist_now=False, **self.settings.faiss_placement(),
        )

    @property
    def live_store(self) -> FaissVectorStore:
        """The live version as it is, whatever its encoder (what a rebuild reads from)."""
        if self._live is None:
            if self.manifest is None:
                raise IndexNotFoundError(
                    f"no index at {self.index_dir} to rebuild; create one with htp-index ingest", path=self.index_dir
                )
            self._live = FaissVectorStore.open(self.index_dir, use_gpu=False)
        return self._live

    # ---------------------------------------------------------------- ingest
    def ingest(self, source: Any, runner: StepRunner | None = None) -> RunStats:
        """Bring the index in line with ``source``: only new and changed documents are embedded;
        re-running on unchanged input writes no new version."""
        runner = runner or InProcess()
        plan = runner.run("plan", self.plan, source)
        split = runner.run("split", self.split, plan.to_embed)
        embedded = runner.embed(split.batches(self.settings.nodes_per_batch), self)
        return runner.run("apply-and-persist", self.apply, plan, split, embedded)

    def plan(self, source: Any) -> IngestPlan:
        """Read ``source`` and diff it against the index's document hashes."""
        items = iter_source(source, max_bytes=int(self.settings.max_document_mb * 2**20))
        plan = plan_ingest(items, self.store.doc_hashes(), delete_missing=self.settings.delete_missing)
        log.info("plan: %d new, %d changed, %d deleted, %d unchanged, %d unreadable",
                 len(plan.new), len(plan.changed), len(plan.deleted), len(plan.unchanged), len(plan.errors))
        return plan

    def split(self, docs: Sequence[SourceDocument]) -> SplitNodes:
        """Nodes of each document, sized for the encoder's window; a document that fails to
        split is reported and skipped."""
        chunk_size = self.settings.chunk_size or default_chunk_size(self.encoder)
        splitter = make_splitter(self.encoder.tokenize, chunk_size, self.settings.chunk_overlap)
        result = SplitNodes()
        for doc in docs:
            try:
                result.by_doc[doc.doc_id] = split_documents([doc], splitter)
            except Exception as exc:
                result.errors[doc.doc_id] = f"could not split: {type(exc).__name__}: {exc}"
        return result

    def apply(self, plan: IngestPlan, split: SplitNodes, embedded: Sequence[EmbeddedBatch]) -> RunStats:
        """Check the vectors came from the index's encoder, replace changed documents' nodes,
        add new ones, remove deleted ones, record hashes, and persist a new version."""
        store = self.store
        vectors = combine(embedded, store.encoder, store.dim)
        stats = RunStats(tokens=vectors.tokens)
        stats.fail_all({error.doc_id: error.error for error in plan.errors})
        stats.fail_all(split.errors)
        stats.fail_all(vectors.errors)
        failed = set(split.errors) | set(vectors.errors)
        kept = {doc_id: nodes for doc_id, nodes in split.by_doc.items() if doc_id not in failed}
        self._fit_correction(store, [node for nodes in kept.values() for node in nodes], vectors)
        changed = {doc.doc_id for doc in plan.changed}
        for doc in plan.to_embed:
            if doc.doc_id in failed:
                continue
            if doc.doc_id in changed:
                store.delete(doc.doc_id)
            nodes = kept.get(doc.doc_id, [])
            store.add(nodes, embeddings=vectors.rows_of(nodes))
            store.set_doc_hash(doc.doc_id, doc.content_hash)
        for doc_id in plan.deleted:
            store.delete(doc_id)
        stats.added = sum(1 for doc in plan.new if doc.doc_id not in failed)
        stats.updated = sum(1 for doc in plan.changed if doc.doc_id not in failed)
        stats.deleted = len(plan.deleted)
        stats.unchanged = len(plan.unchanged)
        stats.nodes_embedded = sum(len(nodes) for nodes in kept.values())
        first = store.manifest is None
        stats.version = store.persist(force=first) if plan.changes_anything or first else store.version
        stats.count = store.count
        return stats

    def _fit_correction(self, store: FaissVectorStore, nodes: Sequence[TextNode], vectors: EmbeddedBatch) -> None:
        """Fit the vector correction from the encoder's vectors of ``nodes`` when a version is
        filled for the first time (a new index, or a rebuild); afterwards it stays frozen so
        every vector is corrected alike."""
        if store.count or store.correction is not None or not nodes:
            return
        self._fit_correction_on(store, vectors.rows_of(nodes), [embed_text(node) for node in nodes])

    def _fit_correction_on(self, store: FaissVectorStore, matrix: np.ndarray, texts: Sequence[str]) -> None:
        correction = fit_correction(matrix, texts, self.encoder, kind=self.settings.correction)
        if correction is not None:
            store.set_correction(correction)
            log.info("fitted the vector correction on %d nodes and %d pseudo-queries",
                     correction.fitted_on, correction.pseudo_queries)

    # ---------------------------------------------------------------- rebuild
    def rebuild(self, *, index_kind: str | None = None, source: Any = None, runner: StepRunner | None = None) -> RunStats:
        """Re-embed everything (the stored nodes, or ``source`` re-read and re-split) with the
        session's encoder into a new version beside the live one, verify it, then switch."""
        runner = runner or InProcess()
        plan = runner.run("plan-rebuild", self.plan_rebuild, index_kind, source)
        embedded = runner.embed(plan.nodes.batches(self.settings.nodes_per_batch), self)
        return runner.run("write-verify-switch", self.write_rebuild, plan, embedded)

    def plan_rebuild(self, index_kind: str | None = None, source: Any = None) -> RebuildPlan:
        """The nodes to re-embed: the stored ones as they are, or the re-read, re-split source."""
        live = self.live_store
        if source is None:
            return RebuildPlan(index_kind or live.index_kind, SplitNodes(stored_documents(live)), live.doc_hashes())
        items = list(iter_source(source, max_bytes=int(self.settings.max_document_mb * 2**20)))
        readable = [item for item in items if isinstance(item, SourceDocument)]
        split = self.split(readable)
        return RebuildPlan(
            index_kind or live.index_kind, split,
            {doc.doc_id: doc.content_hash for doc in readable if doc.doc_id not in split.errors},
            {item.doc_id: item.error for item in items if isinstance(item, SourceError)},
        )

    def write_rebuild(self, plan: RebuildPlan, embedded: Sequence[EmbeddedBatch]) -> RunStats:
        """Build the new version beside the live one, verify it, and switch to it atomically."""
        new = self._create_store(plan.index_kind)
        vectors = combine(embedded, new.encoder, new.dim)
        stats = RunStats(tokens=vectors.tokens)
        stats.fail_all(plan.errors)
        stats.fail_all(plan.nodes.errors)
        stats.fail_all(vectors.errors)
        kept = {doc_id: nodes for doc_id, nodes in plan.nodes.by_doc.items() if doc_id not in vectors.errors}
        nodes = [node for doc_nodes in kept.values() for node in doc_nodes]
        self._fit_correction(new, nodes, vectors)
        new.add(nodes, embeddings=vectors.rows_of(nodes))
        for doc_id in kept:
            if doc_id in plan.hashes:
                new.set_doc_hash(doc_id, plan.hashes[doc_id])
        verify(new, len(nodes), self.encoder.encode_queries(["probe"])[0] if nodes else None)
        stats.nodes_embedded = len(nodes)
        stats.added = len(kept)
        stats.version = new.persist(force=True)
        stats.count = new.count
        return stats

    def rebuild_keeping_vectors(self, index_kind: str | None = None) -> RunStats:
        """A new version from the stored nodes *and vectors*: adds what an index written by an
        older htp-index lacks (the keyword table; a vector correction fitted on its stored
        vectors, which are then still as the encoder made them), or changes the index kind.
        The encoder is loaded only to embed the pseudo-queries of a new correction."""
        old = self.live_store
        nodes = old.all_nodes()
        stored = dict(old.iter_embeddings())
        new = self._create_store(index_kind or old.index_kind, dim=old.dim, encoder=old.encoder)
        matrix = np.asarray([stored[node.node_id] for node in nodes], dtype=np.float32).reshape(-1, old.dim)
        if old.correction is not None:
            new.set_correction(old.correction)
        elif self.settings.correction != "none" and nodes:
            # The pseudo-queries must come from the encoder that made the stored vectors: reuse
            # a given encoder only if it is that one, else load exactly that one (once).
            if self._encoder is None or not same_encoder(self._encoder.identity(), old.encoder):
                self._encoder = self._load_encoder(
                    config_from_identity(old.encoder, **self.settings.runtime_encoder_settings()))
            self._fit_correction_on(new, matrix, [embed_text(node) for node in nodes])
        new.add(nodes, embeddings=matrix, corrected=old.correction is not None)
        for doc_id, content_hash in old.doc_hashes().items():
            new.set_doc_hash(doc_id, content_hash)
        verify(new, len(nodes), None)
        stats = RunStats(added=len(old.doc_hashes()), count=new.count)
        stats.version = new.persist(force=True)
        return stats


def stored_documents(store: FaissVectorStore) -> dict[str, list[TextNode]]:
    """The nodes of every document in ``store``: text, metadata and relationships, no vectors."""
    by_doc: dict[str, list[TextNode]] = {}
    for node in store.all_nodes():
        fresh = TextNode(
            id_=node.node_id, text=node.get_content(), metadata=dict(node.metadata),
            relationships=dict(node.relationships),
            excluded_embed_metadata_keys=list(node.excluded_embed_metadata_keys),
            excluded_llm_metadata_keys=list(node.excluded_llm_metadata_keys),
        )
        by_doc.setdefault(node.ref_doc_id or str(node.metadata.get("doc_id")), []).append(fresh)
    return by_doc


def verify(store: FaissVectorStore, expected_count: int, probe: np.ndarray | None) -> None:
    """Checks before the switch: every node has its vector, and a search answers."""
    if store.count != expected_count:
        raise RebuildVerificationError(f"rebuilt index holds {store.count} vectors, expected {expected_count}")
    if probe is not None and expected_count:
        result = store.query(VectorStoreQuery(query_embedding=probe.tolist(), similarity_top_k=1))
        if not result.ids:
            raise RebuildVerificationError("rebuilt index returned nothing for a probe query")
