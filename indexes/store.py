"""`FaissVectorStore`: a LlamaIndex vector store on FAISS that deletes, upserts, filters,
persists versioned directories and searches on GPU when there is one.

LlamaIndex's own FAISS stores cannot delete or upsert, reuse ids, ignore GPUs and refuse
metadata filters. Here:

* every node gets a stable int64 FAISS id from a persisted counter, never reused;
* adding a node whose node_id exists replaces it (upsert); `delete` removes a document's
  nodes, `delete_nodes` removes nodes by id or filter, and removed vectors are never returned;
* `query` honours ``MetadataFilters`` inside the FAISS search (an ``IDSelector``);
* text, metadata and relationships live in a SQLite docstore beside the vectors
  (``stores_text = True``: `VectorStoreIndex` needs no separate docstore);
* `persist` writes a new version directory and switches ``CURRENT`` atomically.

Use `FaissVectorStore.create` for a new index and `FaissVectorStore.open` for an existing one::

    store = FaissVectorStore.create("idx", dim=384, encoder={"model": "minilm"}, index_kind="hnsw")
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(
        vector_store=store), embed_model=embed_model)
    store.persist()                                   # -> 2: idx/versions/v000002 is live
    store = FaissVectorStore.open("idx", expected_encoder={"model": "minilm"})
    retriever = VectorStoreIndex.from_vector_store(store, embed_model=embed_model).as_retriever(
        similarity_top_k=5, filters=MetadataFilters(filters=[MetadataFilter(key="year",
        value=2020, operator=FilterOperator.GTE)]))

One process should write a given directory at a time; any number may read it. All methods are
thread-safe (one re-entrant lock: queries from an HTTP server may run while another thread adds).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)

from . import fusion, gpu, kinds, persist
from .correction import CORRECTION_FILE, VectorCorrection
from .docstore import NodeRow, NodeStore
from .errors import (
    EncoderMismatchError,
    IndexCorruptedError,
    IndexExistsError,
    SparseIndexMissingError,
)
from .filters import compile_filters, filters_key
from .spec import IndexParams, IndexSpec, Manifest, Metric, canonical_encoder, same_encoder
from .vectors import VectorIndex

logger = logging.getLogger(__name__)

_FILTER_CACHE_SIZE = 64
_SEARCH_KNOBS = ("nprobe", "ef_search", "k_factor")
_SPARSE_MODES = (VectorStoreQueryMode.TEXT_SEARCH, VectorStoreQueryMode.SPARSE)
_DENSE_MODES = (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.HYBRID)

Hit = tuple[str, float]


class FaissVectorStore(BasePydanticVectorStore):
    """FAISS vectors + SQLite docstore in a versioned directory; see the module docstring."""

    stores_text: bool = True
    is_embedding_query: bool = True
    flat_metadata: bool = False

    _lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)
    _root: Path = PrivateAttr()
    _spec: IndexSpec = PrivateAttr()
    _encoder: dict[str, Any] = PrivateAttr()
    _vectors: VectorIndex = PrivateAttr()
    _nodes: NodeStore = PrivateAttr()
    _manifest: Manifest | None = PrivateAttr(default=None)
    _version: int = PrivateAttr(default=0)
    _next_id: int = PrivateAttr(default=0)
    _keep_versions: int = PrivateAttr(default=3)
    _dirty: bool = PrivateAttr(default=True)
    _filter_cache: dict[str, np.ndarray] = PrivateAttr(default_factory=dict)
    _correction: VectorCorrection | None = PrivateAttr(default=None)

    def __init__(
        self,
        *,
        root: Path,
        spec: IndexSpec,
        encoder: dict[str, Any],
        vectors: VectorIndex,
        nodes: NodeStore,
        next_id: int = 0,
        manifest: Manifest | None = None,
        keep_versions: int = 3,
        correction: VectorCorrection | None = None,
    ) -> None:
        """Internal: use `create` or `open`."""
        super().__init__()
        self._root = root
        self._spec = spec
        self._encoder = dict(encoder)
        self._vectors = vectors
        self._nodes = nodes
        self._next_id = next_id
        self._manifest = manifest
        self._version = manifest.version if manifest else 0
        self._keep_versions = keep_versions
        self._dirty = manifest is None
        self._correction = correction

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def class_name(cls) -> str:
        """Name LlamaIndex uses when it serialises components."""
        return "HtpFaissVectorStore"

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dim: int,
        encoder: dict[str, Any],
        metric: Metric = "ip",
        index_kind: str = "flat",
        params: IndexParams | dict[str, Any] | None = None,
        use_gpu: gpu.UseGpu = "auto",
        gpus: gpu.GpuSelection = None,
        gpu_shard: bool = False,
        keep_versions: int = 3,
        overwrite: bool = False,
        persist_now: bool = True,
    ) -> FaissVectorStore:
        """A new, empty store bound to `path`, persisted at once as version 1.

        Persisting the empty version immediately means the directory is always openable and
        records its encoder from the start. With ``overwrite=True`` an existing index is
        replaced by a new empty version (older versions are kept per `keep_versions`).
        ``overwrite=True, persist_now=False`` stages a replacement: the live version keeps
        serving until this store's first :meth:`persist` switches to it (used by rebuild).
        """
        root = Path(path)
        if persist.exists(root) and not overwrite:
            raise IndexExistsError.at(root)
        if not isinstance(encoder, dict):
            raise TypeError("encoder must be a dict describing the encoder (model, method, ...)")
        json.dumps(encoder)  # fail now, not at persist, on something JSON cannot hold
        if not isinstance(params, IndexParams):
            params = IndexParams.model_validate(params or {})
        spec = IndexSpec(dim=dim, metric=metric, index_kind=index_kind, params=params)
        kinds.validate_spec(spec)
        placement = gpu.choose_placement(use_gpu, gpus, gpu_shard)
        store = cls(
            root=root,
            spec=spec,
            encoder=encoder,
            vectors=VectorIndex.empty(spec, placement),
            nodes=NodeStore.in_memory(),
            keep_versions=keep_versions,
        )
        if persist_now:
            store.persist(force=True)
        return store

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expected_encoder: dict[str, Any] | None = None,
        version: int | None = None,
        use_gpu: gpu.UseGpu = "auto",
        gpus: gpu.GpuSelection = None,
        gpu_shard: bool = False,
        keep_versions: int = 3,
    ) -> FaissVectorStore:
        """Load the live version (or `version`) fully into memory.

        Checksums are verified first; nothing on disk is kept open, so the version directory
        may be garbage-collected afterwards. Raises `EncoderMismatchError` when
        `expected_encoder` differs from the encoder recorded in the manifest.
        """
        root = Path(path)
        manifest = persist.read_manifest(root, version)
        if expected_encoder is not None and not same_encoder(expected_encoder, manifest.encoder):
            raise EncoderMismatchError.between(root, manifest.encoder, expected_encoder)
        vdir = persist.version_dir(root, manifest.version)
        for name in (persist.INDEX_FILE, persist.DOCSTORE_FILE):
            if name not in manifest.files:
                raise IndexCorruptedError.for_file(
                    vdir / persist.MANIFEST_FILE, f"it does not list {name}"
                )
        persist.verify_files(vdir, manifest)
        correction = None
        if CORRECTION_FILE in manifest.files:
            try:
                correction = VectorCorrection.load(vdir / CORRECTION_FILE)
            except ValueError as exc:
                raise IndexCorruptedError.for_file(vdir / CORRECTION_FILE, f"invalid ({exc})") from exc
        index_path = vdir / persist.INDEX_FILE
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise IndexCorruptedError.for_file(
                index_path, f"FAISS cannot read it ({_last_line(exc)})"
            ) from exc
        try:
            nodes = NodeStore.load(vdir / persist.DOCSTORE_FILE)
            live_ids = nodes.select_faiss_ids()
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptedError.for_file(
                vdir / persist.DOCSTORE_FILE, f"SQLite: {exc}"
            ) from exc
        placement = gpu.choose_placement(use_gpu, gpus, gpu_shard)
        try:
            vectors = VectorIndex.restore(
                manifest.spec,
                index,
                trained=manifest.trained,
                trained_on=manifest.trained_on,
                live_ids=live_ids,
                placement=placement,
            )
        except ValueError as exc:
            raise IndexCorruptedError.for_file(
                index_path, f"it disagrees with the docstore: {exc}"
            ) from exc
        stored_max = int(kinds.stored_ids(index).max(initial=-1))
        next_id = max(
            manifest.next_id,
            int(nodes.get_state("next_id") or 0),
            stored_max + 1,
            nodes.max_faiss_id() + 1,
        )
        return cls(
            root=root,
            spec=manifest.spec,
            encoder=manifest.encoder,
            vectors=vectors,
            nodes=nodes,
            next_id=next_id,
            manifest=manifest,
            keep_versions=keep_versions,
            correction=correction,
        )

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether `path` holds an index."""
        return persist.exists(path)

    @staticmethod
    def read_manifest(path: str | Path, version: int | None = None) -> Manifest:
        """The manifest of the live version at `path` (or of `version`)."""
        return persist.read_manifest(path, version)

    @staticmethod
    def current_version(path: str | Path) -> int | None:
        """The live version number at `path`, None when there is no index."""
        return persist.current_version(path)

    def persist(
        self, persist_path: str | None = None, fs: Any = None, *, force: bool = False
    ) -> int:
        """Write a new version and make it live; returns its number.

        Nothing is written when nothing changed since the last persist (unless `force`).
        Due maintenance runs first: dropping tombstones, re-training IVF after growth.
        `persist_path`/`fs` exist for LlamaIndex's ``StorageContext.persist``; the store
        always writes to the directory it is bound to.
        """
        if persist_path is not None:
            logger.debug("persist_path %s ignored: writing to %s", persist_path, self._root)
        with self._lock:
            if not (self._dirty or force):
                return self._version
            self._warn_if_overtaken()
            reason = self._vectors.maintenance_reason()
            if reason is not None:
                logger.info("rebuilding %s before persisting (%s)", self._root, reason)
                self._vectors.rebuild(retrain=reason == "retrain")
            self._nodes.set_state("next_id", str(self._next_id))
            with persist.VersionWriter(self._root, self._keep_versions) as writer:
                index_path = writer.path / persist.INDEX_FILE
                faiss.write_index(self._vectors.index, str(index_path))
                self._nodes.save(writer.path / persist.DOCSTORE_FILE)
                if self._correction is not None:
                    self._correction.save(writer.path / CORRECTION_FILE)
                writer.commit(self._build_manifest(writer.path))
            assert writer.manifest is not None
            self._manifest = writer.manifest
            self._version = writer.manifest.version
            self._dirty = False
            return self._version

    def _build_manifest(self, folder: Path) -> Manifest:
        return Manifest(
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            encoder=self._encoder,
            dim=self._spec.dim,
            metric=self._spec.metric,
            index_kind=self._spec.index_kind,
            index_structure=self._vectors.structure,
            trained=self._vectors.trained,
            trained_on=self._vectors.trained_on,
            count=self._vectors.count,
            next_id=self._next_id,
            tombstones=self._vectors.tombstones,
            params=self._spec.params,
            files={
                name: persist.file_record(folder / name)
                for name in (persist.INDEX_FILE, persist.DOCSTORE_FILE, CORRECTION_FILE)
                if name != CORRECTION_FILE or self._correction is not None
            },
            faiss_version=faiss.__version__,
        )

    def _warn_if_overtaken(self) -> None:
        try:
            live = persist.current_version(self._root)
        except IndexCorruptedError:
            live = None  # our commit rewrites CURRENT anyway
        if self._version and live is not None and live != self._version:
            logger.warning(
                "%s: version %s went live since this store loaded version %s; persisting "
                "replaces it (one writer per index directory)",
                self._root,
                live,
                self._version,
            )

    # ------------------------------------------------------------ properties

    @property
    def client(self) -> Any:
        """The CPU FAISS index (the master copy)."""
        return self._vectors.index

    @property
    def path(self) -> Path:
        """The index directory."""
        return self._root

    @property
    def version(self) -> int:
        """The version this store last persisted or was opened at."""
        return self._version

    @property
    def count(self) -> int:
        """Live vectors."""
        with self._lock:
            return self._vectors.count

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._spec.dim

    @property
    def metric(self) -> Metric:
        """``ip`` (inner product; cosine for normalised vectors) or ``l2``."""
        return self._spec.metric

    @property
    def index_kind(self) -> str:
        """The kind name or FAISS factory string the store was created with."""
        return self._spec.index_kind

    @property
    def spec(self) -> IndexSpec:
        """Dimension, metric, kind and parameters."""
        return self._spec

    @property
    def encoder(self) -> dict[str, Any]:
        """The encoder description recorded in the manifest."""
        return dict(self._encoder)

    @property
    def manifest(self) -> Manifest | None:
        """Manifest of the last persisted or opened version."""
        return self._manifest

    @property
    def device(self) -> str:
        """Where unfiltered searches run: ``cpu``, ``gpu:0``…"""
        return self._vectors.placement.describe()

    @property
    def dirty(self) -> bool:
        """Whether there are changes not yet persisted."""
        return self._dirty

    @property
    def next_id(self) -> int:
        """The FAISS id the next added node will get."""
        return self._next_id

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"FaissVectorStore(path='{self._root}', version={self._version}, "
                f"count={self._vectors.count}, dim={self._spec.dim}, metric='{self._spec.metric}', "
                f"kind='{self._spec.index_kind}', structure='{self._vectors.structure}', "
                f"device='{self.device}', dirty={self._dirty})"
            )

    __str__ = __repr__

    # -------------------------------------------------------------- writing

    def add(
        self,
        nodes: Sequence[BaseNode],
        *,
        embeddings: np.ndarray | None = None,
        corrected: bool = False,
        **add_kwargs: Any,
    ) -> list[str]:
        """Add nodes with embeddings; a node whose node_id exists replaces it (upsert).

        `embeddings` (one row per node) may carry the vectors instead of ``node.embedding``,
        which spares building Python lists for large batches. Vectors are the encoder's; the
        store applies its correction, unless ``corrected`` says they already went through the
        same correction (vectors copied from another version of this index).
        """
        if not nodes:
            return []
        last_position = {node.node_id: pos for pos, node in enumerate(nodes)}
        positions = sorted(last_position.values())
        unique = [nodes[pos] for pos in positions]
        if embeddings is not None:
            x = self._checked_matrix(np.asarray(embeddings, dtype=np.float32), nodes)[positions]
        else:
            x = self._embedding_matrix(unique)
        with self._lock:
            if self._correction is not None and not corrected:
                x = self._correction.documents(x)
            ids = np.arange(self._next_id, self._next_id + len(unique), dtype=np.int64)
            rows = [NodeRow.from_node(node, int(i)) for node, i in zip(unique, ids, strict=True)]
            self._vectors.add(ids, x)  # may refuse (IndexTrainingError) before any change
            self._next_id += len(unique)
            replaced = self._nodes.replace(rows)
            self._vectors.remove(np.asarray(replaced, dtype=np.int64))
            self._touch()
        return [node.node_id for node in nodes]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of source document `ref_doc_id`, and its recorded hash."""
        with self._lock:
            ids = self._nodes.faiss_ids_for_ref_doc(ref_doc_id)
            if ids:
                self._vectors.remove(np.asarray(ids, dtype=np.int64))
                self._nodes.delete_faiss_ids(ids)
            self._nodes.delete_doc(ref_doc_id)
            self._touch()

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """Delete nodes by id, by metadata filter, or both (nodes matching both)."""
        if node_ids is None and filters is None:
            raise ValueError("pass node_ids and/or filters; use clear() to delete everything")
        with self._lock:
            ids = self._select(filters, node_ids=node_ids)
            if ids is not None and len(ids):
                self._vectors.remove(ids)
                self._nodes.delete_faiss_ids(ids.tolist())
                self._touch()

    def clear(self) -> None:
        """Delete every node and document hash (ids already given out stay used)."""
        with self._lock:
            self._vectors.reset()
            self._nodes.clear()
            self._touch()

    def train(self) -> None:
        """Train (or re-train) an IVF/PQ kind on the vectors held; IndexTrainingError if too few."""
        with self._lock:
            self._vectors.train()
            self._touch()

    def optimize(self, *, force: bool = False) -> str | None:
        """Run due maintenance now (or a full rebuild with `force`); returns what was done."""
        with self._lock:
            reason = "rebuild" if force else self._vectors.maintenance_reason()
            if reason is not None:
                self._vectors.rebuild(retrain=reason in ("retrain", "rebuild"))
                self._touch()
            return reason

    def _touch(self) -> None:
        self._dirty = True
        self._filter_cache.clear()

    def _embedding_matrix(self, nodes: Sequence[BaseNode]) -> np.ndarray:
        missing = [n.node_id for n in nodes if n.embedding is None]
        if missing:
            raise ValueError(
                f"{len(missing)} node(s) have no embedding (first: {missing[0]!r}); embed them "
                "before adding (VectorStoreIndex does this with its embed_model)"
            )
        for node in nodes:
            if len(node.embedding or ()) != self._spec.dim:
                raise ValueError(self._dim_message(node.node_id, len(node.embedding or ())))
        x = np.asarray([n.embedding for n in nodes], dtype=np.float32)
        return self._checked_matrix(x, nodes)

    def _checked_matrix(self, x: np.ndarray, nodes: Sequence[BaseNode]) -> np.ndarray:
        if x.ndim != 2 or len(x) != len(nodes):
            raise ValueError(f"embeddings has shape {x.shape}; expected ({len(nodes)}, dim)")
        if x.shape[1] != self._spec.dim:
            raise ValueError(self._dim_message(nodes[0].node_id, x.shape[1]))
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad = nodes[int(np.argmin(finite))].node_id
            raise ValueError(f"node {bad!r} has NaN or infinite values in its embedding")
        return np.ascontiguousarray(x)

    def _dim_message(self, node_id: str, dim: int) -> str:
        return (
            f"node {node_id!r} has a {dim}-dimensional embedding, but the index at {self._root} "
            f"holds {self._spec.dim}-dimensional vectors from encoder "
            f"{canonical_encoder(self._encoder)}; use that encoder or rebuild the index"
        )

    # -------------------------------------------------------------- reading

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Top-k nodes for the query, honouring filters, node_ids and doc_ids in every mode.

        Modes (LlamaIndex's ``VectorStoreQueryMode``):

        * ``DEFAULT``: dense search for ``query.query_embedding``;
        * ``TEXT_SEARCH`` / ``SPARSE``: BM25 keyword search for ``query.query_str``;
        * ``HYBRID``: both, fused (see `indexes.fusion`): ``alpha`` weighs the dense side
          (1 = dense only, None = the tuned default); ``sparse_top_k`` keyword candidates
          (default 100) and ``hybrid_top_k`` results (default ``similarity_top_k``).

        ``ids`` are node ids; dense similarities are inner products for ``ip`` and
        ``1 / (1 + squared L2 distance)`` for ``l2``, keyword scores are BM25, hybrid scores the
        fused value in [0, 1]; higher is better everywhere. Search knobs ``nprobe``,
        ``ef_search`` and ``k_factor``, and ``fusion`` (``convex`` or ``rrf``) may be passed as
        keyword arguments (``as_retriever(vector_store_kwargs={...})``).
        """
        mode = VectorStoreQueryMode(query.mode)
        knobs = {k: v for k, v in kwargs.items() if k in _SEARCH_KNOBS}
        dense_wanted = mode in _DENSE_MODES
        if mode not in (*_SPARSE_MODES, *_DENSE_MODES):
            raise ValueError(
                f"query mode {mode.value!r} is not supported; FaissVectorStore does "
                "'default' (dense), 'sparse'/'text_search' (BM25) and 'hybrid'"
            )
        if mode != VectorStoreQueryMode.DEFAULT:
            if query.query_str is None or not query.query_str.strip():
                raise ValueError(f"query mode {mode.value!r} needs query_str (the query text)")
            self._require_sparse(mode)
        if dense_wanted and query.query_embedding is None:
            if mode == VectorStoreQueryMode.HYBRID:
                raise ValueError("hybrid queries need query_embedding as well as query_str")
            logger.warning("query without query_embedding: returning no results")
            return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
        k = query.similarity_top_k
        if mode == VectorStoreQueryMode.HYBRID:
            k = query.hybrid_top_k or k
        with self._lock:
            allowed = self._select(
                query.filters, node_ids=query.node_ids or None, doc_ids=query.doc_ids or None
            )
            if mode == VectorStoreQueryMode.DEFAULT:
                hits = self._dense_hits(
                    np.asarray([query.query_embedding], dtype=np.float32), k, allowed, knobs
                )[0]
            elif mode in _SPARSE_MODES:
                hits = self._nodes.sparse_search(query.query_str or "", k, allowed)
            else:
                depth = max(k, fusion.CANDIDATES)
                dense = self._dense_hits(
                    np.asarray([query.query_embedding], dtype=np.float32), depth, allowed, knobs
                )[0]
                sparse_hits = self._nodes.sparse_search(
                    query.query_str or "", query.sparse_top_k or depth, allowed
                )
                method = kwargs.get("fusion", fusion.DEFAULT_FUSION)
                hits = fusion.fuse(dense, sparse_hits, method=method, alpha=query.alpha)[:k]
            rows = self._nodes.rows([faiss_id for faiss_id, _ in hits])
        found = [(rows[i], score) for i, score in hits if i in rows]
        return VectorStoreQueryResult(
            nodes=[row.to_node() for row, _ in found],
            similarities=[score for _, score in found],
            ids=[row.node_id for row, _ in found],
        )

    @property
    def correction(self) -> VectorCorrection | None:
        """The geometry correction applied to documents at add and to queries at search."""
        return self._correction

    def correction_drift(self, sample: int = 100_000) -> dict[str, Any] | None:
        """How far the stored vectors have drifted from the correction's fit (None: none);
        reads at most ``sample`` vectors."""
        if self._correction is None:
            return None
        vectors = []
        for _, vector in self.iter_embeddings():
            vectors.append(vector)
            if len(vectors) >= sample:
                break
        return self._correction.drift(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim))

    def correction_summary(self) -> dict[str, Any] | None:
        """The correction's variant and what it was fitted on, for reports (None: none)."""
        return None if self._correction is None else self._correction.summary()

    def set_correction(self, correction: VectorCorrection | None) -> None:
        """Use ``correction`` from now on; only while the store is empty, since vectors already
        stored were corrected (or not) with the statistics they were added under."""
        with self._lock:
            if self._vectors.count:
                raise ValueError(
                    f"the index at {self._root} already holds {self._vectors.count} vectors; its "
                    "correction is frozen until `htp-index rebuild` fits a new one"
                )
            if correction is not None and correction.dim != self._spec.dim:
                raise ValueError(f"correction is {correction.dim}-d, the index {self._spec.dim}-d")
            self._correction = correction
            self._touch()

    @property
    def has_sparse(self) -> bool:
        """Whether keyword (BM25) and hybrid search are available (not on indexes written
        before the keyword table existed, until they are rebuilt)."""
        with self._lock:
            return self._nodes.has_sparse

    @property
    def query_modes(self) -> list[str]:
        """The query modes this index serves: ``dense``, and ``sparse``/``hybrid`` with keywords."""
        return ["dense", "sparse", "hybrid"] if self.has_sparse else ["dense"]

    def add_sparse(self) -> None:
        """Index the stored node texts for keyword search (an index written before it existed);
        the next :meth:`persist` writes it. No vector changes."""
        with self._lock:
            if not self._nodes.has_sparse:
                self._nodes.add_sparse()
                self._touch()

    def keyword_rows(self) -> int | None:
        """Rows of the keyword index after FTS5's integrity check against the nodes (None
        without a keyword table); raises `IndexCorruptedError` if they are out of step."""
        with self._lock:
            return self._nodes.check_sparse(self._root)

    def _require_sparse(self, mode: VectorStoreQueryMode) -> None:
        if not self._nodes.has_sparse:
            raise SparseIndexMissingError.at(self._root, mode.value)

    def search(
        self,
        embeddings: np.ndarray | Sequence[Sequence[float]],
        k: int,
        *,
        filters: MetadataFilters | None = None,
        node_ids: Sequence[str] | None = None,
        doc_ids: Sequence[str] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: float | None = None,
    ) -> list[list[Hit]]:
        """Batch dense search: for each query row, the top-`k` (node_id, similarity) pairs."""
        xq = np.asarray(embeddings, dtype=np.float32)
        if xq.ndim == 1:
            xq = xq[None, :]
        knobs = {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor}
        with self._lock:
            allowed = self._select(filters, node_ids=node_ids, doc_ids=doc_ids)
            hits = self._dense_hits(xq, k, allowed, knobs)
            found = self._nodes.rows(sorted({i for row in hits for i, _ in row}))
        return [[(found[i].node_id, score) for i, score in row if i in found] for row in hits]

    def _dense_hits(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None, knobs: dict[str, Any]
    ) -> list[list[tuple[int, float]]]:
        """(faiss id, similarity) of the top-`k` vectors for each query row (caller locks)."""
        if xq.ndim != 2 or xq.shape[1] != self._spec.dim:
            raise ValueError(
                f"query embedding has shape {tuple(xq.shape)}; the index at {self._root} holds "
                f"{self._spec.dim}-dimensional vectors"
            )
        if k <= 0:
            return [[] for _ in range(len(xq))]
        if self._correction is not None:
            xq = self._correction.queries(xq)
        scores, ids = self._vectors.search(xq, k, allowed, **knobs)
        return [
            [(int(i), self._similarity(float(s))) for s, i in zip(srow, irow, strict=True) if i >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def _similarity(self, score: float) -> float:
        return score if self._spec.metric == "ip" else 1.0 / (1.0 + max(score, 0.0))

    def _select(
        self,
        filters: MetadataFilters | None,
        *,
        node_ids: Sequence[str] | None = None,
        doc_ids: Sequence[str] | None = None,
    ) -> np.ndarray | None:
        """Allowed faiss ids, or None when nothing restricts the search."""
        if filters is not None and not filters.filters:
            filters = None
        if filters is None and node_ids is None and doc_ids is None:
            return None
        key = filters_key(filters) if node_ids is None and doc_ids is None else None
        if key is not None and key in self._filter_cache:
            return self._filter_cache[key]
        where, params = compile_filters(filters) if filters is not None else ("1", [])
        ids = self._nodes.select_faiss_ids(where, params, node_ids=node_ids, ref_doc_ids=doc_ids)
        if key is not None:
            if len(self._filter_cache) >= _FILTER_CACHE_SIZE:
                self._filter_cache.clear()
            self._filter_cache[key] = ids
        return ids

    def get_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
    ) -> list[BaseNode]:
        """Nodes by id (in the order given), by filter, or all of them."""
        with self._lock:
            if filters is None and node_ids is not None:
                rows = self._nodes.rows_by_node_id(node_ids)
            else:
                ids = self._select(filters, node_ids=node_ids)
                ids = self._nodes.select_faiss_ids() if ids is None else ids
                by_id = self._nodes.rows(ids.tolist())
                rows = [by_id[int(i)] for i in ids if int(i) in by_id]
        return [row.to_node() for row in rows]

    def all_nodes(self) -> list[BaseNode]:
        """Every node (text, metadata, relationships; no embedding), in id order."""
        return self.get_nodes()

    def iter_embeddings(self, batch_size: int = 1024) -> Iterator[tuple[str, np.ndarray]]:
        """Every (node_id, vector) pair, in id order, for rebuilds and diagnostics.

        Vectors are reconstructed from the index: exact for the named kinds, approximate for
        factory strings that keep only compressed codes.
        """
        after = -1
        while True:
            with self._lock:
                page = self._nodes.page_ids(after, batch_size)
                if not page:
                    return
                vectors = self._vectors.reconstruct(np.array([p[0] for p in page], np.int64))
            yield from ((node_id, vec) for (_, node_id), vec in zip(page, vectors, strict=True))
            after = page[-1][0]

    # ---------------------------------------------------- document bookkeeping

    def set_doc_hash(self, ref_doc_id: str, doc_hash: str) -> None:
        """Record the content hash of a source document (for ingestion diffs)."""
        with self._lock:
            self._nodes.set_doc_hash(ref_doc_id, doc_hash)
            self._dirty = True

    def doc_hashes(self) -> dict[str, str]:
        """ref_doc_id -> hash of every recorded source document."""
        with self._lock:
            return self._nodes.doc_hashes()

    def get_doc_hash(self, ref_doc_id: str) -> str | None:
        """The recorded hash of one source document."""
        return self.doc_hashes().get(ref_doc_id)

    def faiss_ids(self, node_ids: Sequence[str]) -> dict[str, int]:
        """node_id -> stable FAISS id, for the given nodes that exist."""
        with self._lock:
            return self._nodes.faiss_ids_for_nodes(node_ids)

    def ref_doc_node_ids(self, ref_doc_id: str) -> list[str]:
        """Node ids of one source document."""
        with self._lock:
            return self._nodes.node_ids_for_ref_doc(ref_doc_id)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
