"""`FaissVectorStore`: a LlamaIndex vector store on FAISS that deletes, upserts, filters,
searches dense, keyword and hybrid, and persists versions made of immutable segments.

LlamaIndex's own FAISS stores cannot delete or upsert, reuse ids, ignore GPUs and refuse
metadata filters. This one is `indexes.segment_store.SegmentStore` (the storage engine, which
imports nothing of LlamaIndex, so a query need not) as a ``BasePydanticVectorStore``: every
method of the engine, plus LlamaIndex's `query` on `SegmentStore.retrieve`. Text, metadata
and relationships are stored with the vectors (``stores_text = True``: `VectorStoreIndex`
needs no separate docstore).

Use `FaissVectorStore.create` for a new index and `FaissVectorStore.open` for an existing one::

    store = FaissVectorStore.create("idx", dim=384, encoder={"model": "minilm"}, index_kind="hnsw")
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(
        vector_store=store), embed_model=embed_model)
    store.persist()                                   # -> 2: version 2 is live
    store = FaissVectorStore.open("idx", expected_encoder={"model": "minilm"})
    retriever = VectorStoreIndex.from_vector_store(store, embed_model=embed_model).as_retriever(
        similarity_top_k=5, filters=MetadataFilters(filters=[MetadataFilter(key="year",
        value=2020, operator=FilterOperator.GTE)]))
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)

from . import fusion, gpu
from .correction import VectorCorrection
from .live import LiveSegment, PendingRows
from .merge_policy import MergePolicy
from .segment_store import FLUSH_ROWS, SearchMode, SegmentStore
from .spec import IndexSpec, Manifest, NamedFile
from .text import has_visible_text, lone_surrogate_problem

logger = logging.getLogger(__name__)

#: LlamaIndex's query modes and the engine's.
#: The search knobs ``query`` passes on to :meth:`SegmentStore.retrieve` (``fusion`` besides).
_KNOBS = ("nprobe", "ef_search", "k_factor")
_MODES: dict[VectorStoreQueryMode, SearchMode] = {
    VectorStoreQueryMode.DEFAULT: "dense",
    VectorStoreQueryMode.TEXT_SEARCH: "sparse",
    VectorStoreQueryMode.SPARSE: "sparse",
    VectorStoreQueryMode.HYBRID: "hybrid",
}


class FaissVectorStore(SegmentStore, BasePydanticVectorStore):
    """A :class:`SegmentStore` that LlamaIndex can use as its vector store."""

    stores_text: bool = True
    is_embedding_query: bool = True
    flat_metadata: bool = False

    # The engine's state, declared as pydantic private attributes (SegmentStore.__init__ sets them).
    _lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)
    _root: Path = PrivateAttr()
    _spec: IndexSpec = PrivateAttr()
    _encoder: dict[str, Any] = PrivateAttr()
    _placement: gpu.Placement = PrivateAttr()
    _segments: list[LiveSegment] = PrivateAttr(default_factory=list)
    _pending: PendingRows = PrivateAttr()
    _docs_files: list[NamedFile] = PrivateAttr(default_factory=list)
    _docs: dict[str, str] | None = PrivateAttr(default=None)
    _docs_set: dict[str, str] = PrivateAttr(default_factory=dict)
    _docs_deleted: set[str] = PrivateAttr(default_factory=set)
    _docs_reset: bool = PrivateAttr(default=False)
    _manifest: Manifest | None = PrivateAttr(default=None)
    _version: int = PrivateAttr(default=0)
    _base: int | None = PrivateAttr(default=None)
    _replace_live: bool = PrivateAttr(default=False)
    _next_id: int = PrivateAttr(default=0)
    _keep_versions: int = PrivateAttr(default=3)
    _dirty: bool = PrivateAttr(default=True)
    _filter_cache: dict[str, np.ndarray] = PrivateAttr(default_factory=dict)
    _correction: VectorCorrection | None = PrivateAttr(default=None)
    _splitting: dict[str, int] | None = PrivateAttr(default=None)
    _encoder_check: dict[str, Any] | None = PrivateAttr(default=None)
    _correction_kind: str | None = PrivateAttr(default=None)
    _policy: MergePolicy = PrivateAttr(default_factory=MergePolicy)
    _flush_rows: int = PrivateAttr(default=FLUSH_ROWS)

    def __init__(self, **engine: Any) -> None:
        """Internal: use `create` or `open`."""
        BasePydanticVectorStore.__init__(self)
        SegmentStore.__init__(self, **engine)

    @classmethod
    def serving(cls, store: SegmentStore) -> FaissVectorStore:
        """``store`` as LlamaIndex's vector store: the same engine state taken over (segments,
        pending rows, caches), nothing opened again. Reopened by path and version number, the
        adapter failed as "corrupted" once retention had removed that version (which ``store``
        still serves from its open files), and after the folder was replaced it read another
        index's version of that number. ``store`` itself should not be used afterwards."""
        if isinstance(store, cls):
            return store
        adapter = cls.__new__(cls)
        BasePydanticVectorStore.__init__(adapter)
        for name, value in vars(store).items():
            setattr(adapter, name, value)
        return adapter

    @classmethod
    def class_name(cls) -> str:
        """Name LlamaIndex uses when it serialises components."""
        return "HtpFaissVectorStore"

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Top-k nodes for the query, honouring filters, node_ids and doc_ids in every mode.

        Modes (LlamaIndex's ``VectorStoreQueryMode``): ``DEFAULT`` is dense search for
        ``query.query_embedding``; ``TEXT_SEARCH`` / ``SPARSE`` BM25 keyword search for
        ``query.query_str``; ``HYBRID`` both, fused: ``alpha`` weighs the dense side, with
        ``sparse_top_k`` keyword candidates and ``hybrid_top_k`` results (default
        ``similarity_top_k``). Scores and the knobs ``nprobe``, ``ef_search``, ``k_factor``
        and ``fusion`` (``convex`` or ``rrf``, passed as keyword arguments, e.g.
        ``as_retriever(vector_store_kwargs={...})``) are :meth:`SegmentStore.retrieve`'s.
        """
        asked = VectorStoreQueryMode(query.mode)
        mode = _MODES.get(asked)
        if mode is None:
            raise ValueError(
                f"query mode {asked.value!r} is not supported; FaissVectorStore "
                "does 'default' (dense), 'sparse'/'text_search' (BM25) and 'hybrid'"
            )
        # an invisible query (a zero-width space) was answered [] here, where every path refuses it
        if mode != "dense" and (query.query_str is None or not has_visible_text(query.query_str)):
            raise ValueError(f"query mode {asked.value!r} needs query_str (the query text), with a visible "
                             "character: an empty or invisible one (zero-width, controls) searches for nothing")
        problem = None if query.query_str is None else lone_surrogate_problem(query.query_str, "query_str")
        if problem is not None:  # the keyword side answered one; the encoder refuses it
            raise ValueError(problem)
        if mode != "sparse" and query.query_embedding is None:
            if mode == "hybrid":
                raise ValueError("hybrid queries need query_embedding as well as query_str")
            # an empty query text reaches here unembedded: it was answered [] (with a log line)
            # where every other query path refuses it
            raise ValueError("a dense query needs query_embedding: the query is empty or only whitespace"
                             if query.query_str is not None and not query.query_str.strip()
                             else "a dense query needs query_embedding (none was given)")
        unknown = sorted(set(kwargs) - {*_KNOBS, "fusion"})
        if unknown:  # a misspelled knob ("nprob") was dropped, and the default used without a word
            raise TypeError(f"unknown store option(s) {', '.join(map(repr, unknown))}; FaissVectorStore.query "
                            f"takes {', '.join(sorted({*_KNOBS, 'fusion'}))}")
        knobs = {k: v for k, v in kwargs.items() if k in _KNOBS}
        # LlamaIndex's retriever sends node_ids=[] for every store that keeps the text (its own
        # node list is empty then), meaning no restriction; [] from retrieve() allows nothing.
        found = self.retrieve(
            mode, (query.hybrid_top_k or query.similarity_top_k) if mode == "hybrid" else query.similarity_top_k,
            embedding=query.query_embedding, text=query.query_str, filters=query.filters,
            node_ids=query.node_ids or None, doc_ids=query.doc_ids, alpha=query.alpha, sparse_k=query.sparse_top_k,
            fusion_method=kwargs.get("fusion", fusion.DEFAULT_FUSION), **knobs,
        )
        return VectorStoreQueryResult(
            nodes=[row.to_node() for row, _ in found],
            similarities=[score for _, score in found],
            ids=[row.node_id for row, _ in found],
        )
