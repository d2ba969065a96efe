"""The in-process query component: a persisted index as a LlamaIndex retriever.

    from pipelines.query import open_index
    index = open_index("my-index")
    retriever = index.as_retriever(similarity_top_k=5)
    for hit in retriever.retrieve("how are placeholders used?"):
        print(hit.score, hit.node.metadata["doc_id"], hit.node.get_content()[:80])

Queries are embedded with the same encoder (and query instruction) that built the index.
Every caller (the CLI, the HTTP service, evaluation, ``as_retriever``) searches through
`indexes.SegmentStore.retrieve` (LlamaIndex's ``query`` included): dense, keyword (BM25) or
hybrid, in one code path. Only ``as_index``/``as_retriever``/``embedding`` and reranking import
LlamaIndex, so a query from a cold process does not pay for it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from indexes import EncoderMismatchError, IndexNotFoundError, SegmentStore, sparse
from indexes.docstore import NodeRow
from indexes.fusion import Fusion
from indexes.keywords import analyse_query
from indexes.segment_store import is_count
from indexes.text import drop_controls, has_visible_text, lone_surrogate_problem
from pipelines.errors import DocumentRejected
from pipelines.settings import Settings, load_settings

if TYPE_CHECKING:  # LlamaIndex is imported only by the parts that hand its objects out (~1 s)
    from llama_index.core import VectorStoreIndex
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.vector_stores.types import MetadataFilters

    from htp_embed import HTPEncoder
    from htp_embed.llama_index import HTPEmbedding, QueryLikelihoodRerank
    from indexes import FaissVectorStore
    from pipelines.encoder_check import EncoderCheck

log = logging.getLogger(__name__)


QueryMode = Literal["dense", "sparse", "hybrid"]
QUERY_MODES: tuple[str, ...] = ("dense", "sparse", "hybrid")
# LlamaIndex's names of the modes (VectorStoreQueryMode values), for as_retriever
_STORE_MODES = {"dense": "default", "sparse": "sparse", "hybrid": "hybrid"}


class InvalidQueryError(ValueError):
    """A query that cannot be answered as asked: a text that is not text (it holds a lone
    UTF-16 surrogate, e.g. from a JSON ``"\\ud800"`` escape, which neither a tokenizer nor the
    keyword index can read), or an option that does not apply to its mode."""


def check_query_text(text: str) -> str:
    """``text`` as it is searched, if it is valid Unicode text with something in it: without
    control characters and soft hyphens, as ingest reads every document (`drop_controls`);
    else an :class:`InvalidQueryError` saying what is wrong, instead of the tokenizer's bare
    ``TypeError`` or the encoder's word for a document ("text 0 is empty")."""
    if not text.strip():
        raise InvalidQueryError("the query is empty or only whitespace: there is nothing to search for")
    if not has_visible_text(text):  # "\u200b", "\x00": ingest refuses such documents as empty
        raise InvalidQueryError("the query holds only invisible characters (controls, zero-width or "
                                "format characters): there is nothing to search for")
    problem = lone_surrogate_problem(text, "the query")
    if problem is not None:
        raise InvalidQueryError(problem)
    return drop_controls(text)


@dataclass(frozen=True)
class SearchRequest:
    """One query: its text, how many results, filters, and how to search.

    ``mode``, ``alpha`` and ``rerank`` None take the index's defaults (settings ``query_mode``,
    ``alpha`` and ``rerank``); ``alpha`` is the weight of the dense side in hybrid mode;
    ``rerank`` reorders the best hits by the decoder's query likelihood
    (:class:`htp_embed.llama_index.QueryLikelihoodRerank`).
    """

    query: str
    top_k: int = 5
    filters: MetadataFilters | None = None
    mode: QueryMode | None = None
    alpha: float | None = None
    rerank: bool | None = None


@dataclass
class OpenIndex:
    """A loaded index version with the encoder that built it.

    The encoder is loaded on first use (:attr:`encoder`), by ``load_encoder``: a keyword-only
    query never needs it, and loading a model takes seconds from a cold process."""

    path: Path
    store: SegmentStore
    load_encoder: Callable[[], HTPEncoder] = field(repr=False)
    default_mode: QueryMode = "hybrid"
    default_alpha: float | None = None
    fusion: Fusion = "convex"
    default_rerank: bool = False
    rerank_depth: int = 10
    rerank_passage_tokens: int = 64
    #: ``use_gpu``/``gpus``/``gpu_shard`` the store was opened with (LlamaIndex's copy gets the same)
    placement: dict[str, Any] = field(default_factory=dict)
    #: versions a commit through this index keeps (the settings' ``keep_versions``)
    keep_versions: int = 3
    #: the last :meth:`check_encoder` result (None: not run, or the index records no check)
    encoder_check: EncoderCheck | None = None
    _warned: bool = field(default=False, repr=False)
    _encoder: HTPEncoder | None = field(default=None, repr=False)
    _encoder_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def encoder(self) -> HTPEncoder:
        """The encoder that built this index, loaded on first use (once, whichever thread asks
        first); an error loading it (model missing, other weights) is raised here, each time."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    self._encoder = self.load_encoder()
        return self._encoder

    @property
    def version(self) -> int | None:
        return self.store.version

    @cached_property
    def embedding(self) -> HTPEmbedding:
        """The encoder as a LlamaIndex embedding model (for ``as_index``/``as_retriever``)."""
        from pipelines.query_embedding import QueryEmbedding

        return QueryEmbedding(encoder=self.encoder)

    @cached_property
    def reranker(self) -> QueryLikelihoodRerank:
        """The query-likelihood reranker on this index's decoder (built on first use)."""
        from htp_embed.llama_index import QueryLikelihoodRerank

        return QueryLikelihoodRerank(self.encoder, max_passage_tokens=self.rerank_passage_tokens)

    @property
    def modes(self) -> list[str]:
        """The query modes this index serves (keyword modes need its keyword table)."""
        return self.store.query_modes

    @cached_property
    def vector_store(self) -> FaissVectorStore:
        """This index's store as LlamaIndex's vector store (:class:`indexes.FaissVectorStore`,
        a `SegmentStore` LlamaIndex can drive), what ``as_index``/``as_retriever`` use.

        Made on first use (the query path never imports LlamaIndex) from :attr:`store` itself,
        whose open version it takes over, and from then on it *is* :attr:`store`: nodes
        LlamaIndex inserts through ``as_index()`` are what :meth:`search` finds, and the other
        way round (two store objects over one version would each miss the other's writes,
        silently), and it answers from the version :meth:`search` answers from even once
        retention has removed it or the folder was replaced.
        """
        from indexes import FaissVectorStore

        self.store = FaissVectorStore.serving(self.store)
        return self.store

    def as_index(self) -> VectorStoreIndex:
        """A LlamaIndex VectorStoreIndex over this store (for query engines, chat engines…).

        Its retrievers, and the engines built on them (``as_query_engine``, ``as_chat_engine``),
        search in this index's default mode with its alpha and fusion, as :meth:`search` does
        (a plain VectorStoreIndex searched dense-only: ~45 NDCG@10 on SciFact against ~72).
        Its engines also rerank when this index reranks by default (settings ``rerank``), as
        :meth:`search` does; ``rerank=True|False`` to an engine overrides that
        (:meth:`engine_defaults`). A retriever alone returns the fused hits.

        Documents inserted through it are split as ingest splits them: at the node size the
        index recorded, counting the encoder's tokens. LlamaIndex's default splitter made nodes
        of 1,024 of its own tokens, which the encoder cut to its window (its vector then stood
        for a node's beginning only)."""
        from pipelines.chunking import default_chunk_size, make_splitter

        recorded = self.store.splitting or {}
        splitter = make_splitter(self.encoder.tokenize, int(recorded.get("chunk_size") or default_chunk_size(self.encoder)),
                                 int(recorded.get("chunk_overlap", 32)))
        index = _index_with_defaults().from_vector_store(self.vector_store, embed_model=self.embedding,
                                                         transformations=[splitter])
        index.retriever_defaults = self.retriever_defaults
        index.engine_defaults = self.engine_defaults
        return index

    def as_retriever(self, similarity_top_k: int = 5, filters: MetadataFilters | None = None, **kwargs: Any) -> BaseRetriever:
        """A LlamaIndex retriever returning ``NodeWithScore``s with text, metadata and scores.

        ``vector_store_query_mode`` ("default", "sparse", "hybrid") and ``alpha`` work as for
        any LlamaIndex vector store; without them the retriever searches in this index's
        default mode, like :meth:`search`.
        """
        return self.as_index().as_retriever(similarity_top_k=similarity_top_k, filters=filters, **kwargs)

    def retriever_defaults(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A LlamaIndex retriever's arguments with this index's defaults filled in: its mode
        when none is named, its alpha (used by hybrid queries) and its fusion, under the
        caller's own store options (e.g. nprobe)."""
        kwargs = dict(kwargs)
        if "rerank" in kwargs:  # engines take it out first; LlamaIndex's retriever drops it unread
            raise TypeError("a retriever returns the fused hits and does not rerank: pass rerank= to "
                            "as_query_engine / as_chat_engine, or use OpenIndex.search(..., rerank=True)")
        if "vector_store_query_mode" not in kwargs:
            kwargs["vector_store_query_mode"] = _STORE_MODES[self.resolve_mode(None)]
        kwargs.setdefault("alpha", self.default_alpha)
        kwargs["vector_store_kwargs"] = {"fusion": self.fusion, **(kwargs.get("vector_store_kwargs") or {})}
        return kwargs

    def engine_defaults(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A LlamaIndex engine's arguments with this index's reranking: where the engine reranks
        (its ``rerank`` argument, else the index's default), it retrieves
        ``max(similarity_top_k, rerank_depth)`` nodes and keeps the reranker's best
        ``similarity_top_k`` (a :class:`~htp_embed.llama_index.QueryLikelihoodRerank` put before
        the caller's own postprocessors), the same hits and scores as :meth:`search`. Arguments
        that already hold a ``QueryLikelihoodRerank`` are left as they are: the caller's own
        (or one added here already, as ``as_chat_engine`` passes them on to
        ``as_query_engine``)."""
        from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K

        from htp_embed.llama_index import QueryLikelihoodRerank

        kwargs = dict(kwargs)
        postprocessors = list(kwargs.get("node_postprocessors") or [])
        if not self.reranks(kwargs.pop("rerank", None)) or any(
                isinstance(postprocessor, QueryLikelihoodRerank) for postprocessor in postprocessors):
            return kwargs
        top_k = int(kwargs.get("similarity_top_k") or DEFAULT_SIMILARITY_TOP_K)
        if top_k < 0:  # the copy below skips the reranker's own check, and max() hid it from the store's
            raise ValueError(f"similarity_top_k must be a whole number >= 0, not {top_k}")
        kwargs["similarity_top_k"] = max(top_k, self.rerank_depth)
        # a copy sharing the reranker's scorer (pydantic copies private attributes shallowly)
        kwargs["node_postprocessors"] = [self.reranker.model_copy(update={"top_n": top_k}), *postprocessors]
        return kwargs

    def check_encoder(self) -> EncoderCheck | None:
        """How closely this index's encoder reproduces the vectors the index recorded for its
        check texts (:mod:`pipelines.encoder_check`; None: the index records none), kept in
        :attr:`encoder_check`; a failure is logged as an error (queries are then embedded unlike
        the stored vectors). Embeds four short texts: :func:`open_index` runs it unless told
        not to (a one-shot ``htp-index query``, whose cold path it would slow)."""
        from pipelines.encoder_check import MIN_COSINE, compare

        recorded = self.store.encoder_check
        self.encoder_check = None if recorded is None else compare(self.encoder, recorded)
        if self.encoder_check is not None and not self.encoder_check.passed:
            log.error("the encoder embeds the check texts of %s unlike the encoder that built it (least "
                      "cosine %.4f, needed %s): its tokenizer, config or code changed in a way its identity "
                      "does not name, so queries are embedded unlike the stored vectors. Rebuild it "
                      "(`htp-index rebuild --index %s`) or restore that model folder",
                      self.path, self.encoder_check.min_cosine, MIN_COSINE, self.path)
        return self.encoder_check

    def reranks(self, rerank: bool | None) -> bool:
        """Whether a request with this ``rerank`` field is reranked (None: the index's default)."""
        return self.default_rerank if rerank is None else rerank

    def check_request(self, request: SearchRequest) -> QueryMode:
        """The mode ``request`` runs in, or a ``ValueError`` (:class:`InvalidQueryError`) where it
        cannot be answered as asked: a query that is not text, or an ``alpha`` (the dense side's
        weight in hybrid fusion) for a query that fuses nothing, which would be ignored."""
        check_query_text(request.query)
        if not is_count(request.top_k, 0):
            # the store refuses it, but a reranked request retrieves max(top_k, rerank_depth):
            # top_k -1 returned rerank_depth - 1 hits
            raise InvalidQueryError(f"top_k must be a whole number >= 0, not {request.top_k!r}")
        mode = self.resolve_mode(request.mode)
        if request.alpha is not None and mode != "hybrid":
            asked = f"mode {mode}" if request.mode else f"the default mode ({mode}: query_mode in the settings, or dense for an index without keywords)"
            raise InvalidQueryError(
                f"alpha weighs the dense side of a hybrid query; {asked} fuses nothing, so it would be "
                "ignored: leave alpha out, or ask for mode hybrid")
        return mode

    def query_warnings(self, query: str, mode: QueryMode | None = None, rerank: bool | None = None) -> list[str]:
        """What a caller should know about how ``query`` is answered in ``mode``, said with the
        answer (the log alone reaches an operator, not the app that asked):

        * the query has no keyword term, or more distinct words than keyword search uses
          (`sparse.MAX_QUERY_TERMS`);
        * the query is cut to fit the encoder's window: its vector stands for its beginning;
        * :meth:`check_encoder` found that this encoder embeds unlike the one that built the
          index: the dense side ranks by a different embedding than the stored vectors';
        * reranking (``rerank``; None: the index's default) scored the query's first
          `htp_embed.rerank.MAX_QUERY_TOKENS` tokens only.

        Costs nothing for a usual query; a query longer than the window's text budget in bytes
        is tokenised (run it off an event loop then: :meth:`HTPEncoder.may_truncate_query`).
        """
        mode = self.resolve_mode(mode)
        warnings = []
        left_out = sparse.terms_left_out(query) if mode != "dense" else 0
        if mode != "dense" and not analyse_query(query):  # FTS5's own tokens: "___" has none
            warnings.append("the query has no keyword term (only stop words, punctuation or symbols): keyword "
                            "search found nothing")
        if left_out:
            warnings.append(
                f"keyword search used the query's first {sparse.MAX_QUERY_TERMS} distinct words; "
                f"{left_out} more were left out")
        if self.reranks(rerank) and self.reranker.cuts_query(query):
            from htp_embed.rerank import MAX_QUERY_TOKENS

            warnings.append(f"reranking scored the likelihood of the query's first {MAX_QUERY_TOKENS} tokens only")
        if mode == "sparse":
            return warnings  # no vector: the rest does not apply
        keywords = "; keyword search used all of it" if mode == "hybrid" and not left_out else ""
        encoder = self.encoder
        if encoder.truncates_query(query):
            warnings.append(
                f"the query has more tokens than the encoder embeds (max_length={encoder.config.max_length}, "
                f"~{encoder.query_text_budget} of them for the query's text): its vector stands for its "
                f"beginning only{keywords}")
        check = self.encoder_check
        if check is not None and not check.passed:
            from pipelines.encoder_check import MIN_COSINE

            unaffected = "; keyword search is unaffected" if mode == "hybrid" else ""
            warnings.append(
                f"the encoder embeds unlike the one that built this index (least cosine {check.min_cosine:.4f} "
                f"on its check texts, needed {MIN_COSINE}): the query's vector is compared with vectors of "
                f"another embedding, so dense scores are unreliable{unaffected}. Rebuild the index "
                f"(`htp-index rebuild --index {self.path}`) or restore the model folder it was built with")
        return warnings

    def resolve_mode(self, mode: QueryMode | None) -> QueryMode:
        """The mode a request runs in: the one asked for, else the default this index supports.

        An index without a keyword table falls back to dense for the *default* mode (logged
        once); asking for sparse or hybrid on it explicitly raises `SparseIndexMissingError`.
        """
        if mode is not None:
            if mode not in QUERY_MODES:
                raise ValueError(f"unknown query mode {mode!r}; use one of {', '.join(QUERY_MODES)}")
            return mode
        if self.default_mode != "dense" and not self.store.has_sparse:
            if not self._warned:
                log.warning("%s has no keyword index, so it serves dense search; run "
                            "`htp-index rebuild --index %s --keep-vectors` to add hybrid search",
                            self.path, self.path)
                self._warned = True
            return "dense"
        return self.default_mode

    def search(self, query: str, top_k: int = 5, filters: MetadataFilters | None = None,
               *, mode: QueryMode | None = None, alpha: float | None = None,
               rerank: bool | None = None) -> list[dict[str, Any]]:
        """Results as plain dicts: ``node_id, doc_id, score, text, metadata``."""
        return self.search_many([SearchRequest(query, top_k, filters, mode, alpha, rerank)])[0]

    def search_many(self, requests: Sequence[SearchRequest]) -> list[list[dict[str, Any]]]:
        """Several queries at once, the one query path of the CLI, the service and evaluation.

        The queries that need a vector go through the encoder as one batch (one forward pass
        instead of one per request, what makes a busy service fast); each is then searched
        in its mode. Results are :meth:`search`'s, request by request, up to the last bits of
        the vectors: in bfloat16 a batch of several rows runs other kernels than a lone query
        (least cosine ~0.9999 measured), so a near-tie may rank differently when a request
        arrives with others than alone. A reranked request retrieves ``max(top_k,
        rerank_depth)`` hits and returns the reranker's best ``top_k``, scored by the blend
        (:func:`htp_embed.rerank.blend_scores`).
        """
        if not requests:
            return []
        modes = [self.check_request(request) for request in requests]
        texts = [drop_controls(request.query) for request in requests]  # checked above; read as documents are
        needs_vector = [i for i, mode in enumerate(modes) if mode != "sparse"]
        vectors = self.encoder.encode_queries([texts[i] for i in needs_vector]) if needs_vector else []
        by_request = dict(zip(needs_vector, vectors, strict=True))
        out = []
        for i, (request, mode, text) in enumerate(zip(requests, modes, texts, strict=True)):
            rerank = self.reranks(request.rerank) and request.top_k > 0
            found = self.store.retrieve(
                mode, max(request.top_k, self.rerank_depth) if rerank else request.top_k,
                embedding=by_request.get(i), text=text, filters=request.filters,
                alpha=self.default_alpha if request.alpha is None else request.alpha, fusion_method=self.fusion,
            )
            if rerank:
                found = self._reranked(text, request.top_k, found)
            out.append([result_dict(row, score) for row, score in found])
        return out

    def _reranked(self, query: str, top_k: int, found: list[tuple[NodeRow, float]]) -> list[tuple[NodeRow, float]]:
        """The reranker's best ``top_k`` of ``found`` (it reads LlamaIndex nodes), with its scores."""
        from llama_index.core.schema import NodeWithScore

        rows = {row.node_id: row for row, _ in found}
        hits = self.reranker.rerank(query, [NodeWithScore(node=row.to_node(), score=score)
                                            for row, score in found], top_k)
        return [(rows[hit.node.node_id], hit.score) for hit in hits]


def result_dict(row: NodeRow, score: float | None) -> dict[str, Any]:
    """One result as the CLI, the service and evaluation return it: ``node_id, doc_id, score,
    text, metadata``, read from the stored row (what ``row.to_node()`` would hold: the text,
    and the metadata as the node's own record has it)."""
    metadata = json.loads(row.node_json).get("metadata") or {}
    return {
        "node_id": row.node_id,
        "doc_id": row.ref_doc_id or metadata.get("doc_id"),
        "score": float(score) if score is not None else None,
        "text": row.text,
        "metadata": metadata,
    }


def open_index(
    index_dir: str | Path, settings: Settings | None = None, *, encoder: HTPEncoder | None = None,
    embedding: HTPEmbedding | None = None, check_encoder: bool = True, lazy_encoder: bool = False,
) -> OpenIndex:
    """Open the live version of an index with the encoder recorded in its manifest.

    Readers always follow the index: after a rebuild with another model or method, queries are
    embedded the new way. ``encoder`` (or a LlamaIndex ``embedding``'s encoder) is reused when
    it is that encoder (no reload); only runtime settings (device, batch size) are taken from
    ``settings``. The service passes the encoder it serves with: switching versions builds no
    LlamaIndex object. ``check_encoder`` compares the encoder with the index's recorded check
    (:meth:`OpenIndex.check_encoder`; it loads the model and embeds four short texts).
    ``lazy_encoder`` leaves loading the encoder to its first use (a keyword-only query never
    loads it; a model that cannot be loaded is then reported by the first query that needs
    it); otherwise it is loaded here, and such errors are raised here.
    """
    if encoder is None and embedding is not None:
        encoder = embedding.encoder
    path = Path(index_dir)
    if not SegmentStore.exists(path):
        raise IndexNotFoundError(f"no index at {path}; create one with: htp-index ingest SOURCE --index {path}")
    settings = settings or load_settings()
    # The store first, and its encoder from it: reading the manifest separately could pair a
    # version with the encoder of the one a concurrent rebuild just replaced.
    placement = settings.faiss_placement()
    store = SegmentStore.open(path, keep_versions=settings.keep_versions, **placement)
    recorded = store.encoder
    index = OpenIndex(path, store, lambda: _encoder_for(path, recorded, settings, encoder),
                      default_mode=settings.query_mode,
                      default_alpha=settings.alpha, fusion=settings.fusion, default_rerank=settings.rerank,
                      rerank_depth=settings.rerank_depth, rerank_passage_tokens=settings.rerank_passage_tokens,
                      placement=placement, keep_versions=settings.keep_versions)
    if check_encoder:
        index.check_encoder()
    elif not lazy_encoder:
        index.encoder  # noqa: B018 - loaded now, so that a model that cannot load fails the open
    return index


def _encoder_for(path: Path, recorded: dict[str, Any], settings: Settings, encoder: HTPEncoder | None) -> HTPEncoder:
    """The encoder recorded for the index at ``path``: ``encoder`` when it is that one, else
    loaded from the record with the settings' runtime options (device, batch size)."""
    from htp_embed import HTPEncoder, config_from_identity
    from pipelines.identity_check import (
        index_accepts,
        require_encoder_record,
        warn_ignored_encoder_settings,
    )

    require_encoder_record(path, recorded)
    folder = _moved_model_folder(path, recorded, settings) if encoder is None else {}
    if not folder:
        warn_ignored_encoder_settings(path, recorded, settings, "queries are embedded with it",
                                      f"run `htp-index rebuild --index {path}` with them to change the index's encoder")
    if encoder is None or not index_accepts(path, recorded, encoder.identity()):
        # Loaded from the record, the encoder can still differ: other weights saved under the
        # model's name (a fine-tune in the same directory) have another fingerprint.
        # A max_length past the model's positions (an older htp-index recorded one) is no bar to
        # a query, which never comes near it: refused, the index could not be searched at all.
        encoder = HTPEncoder(config_from_identity(recorded, **settings.runtime_encoder_settings(), **folder),
                             past_positions_ok=True)
        if not index_accepts(path, recorded, encoder.identity()):
            raise EncoderMismatchError.between(path, recorded, encoder.identity())
    return encoder


def _moved_model_folder(path: Path, recorded: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``{"model": folder}`` when the index's recorded model folder is not where it was recorded
    (moved, or a relative path recorded by an older version, seen from another directory) and
    the settings name the folder; ``{}`` when the record is found as it is. The weights must
    still be the same: the fingerprint is checked when the encoder is loaded."""
    from htp_embed.packaged_models import PACKAGED_MODELS, ModelNotAvailableError

    model = str(recorded.get("model", ""))
    if model in PACKAGED_MODELS or Path(model).expanduser().exists():
        return {}
    given = settings.explicit_encoder_settings().get("model")
    if given is not None:
        return {"model": given}
    raise ModelNotAvailableError(
        f"the index at {path} was built with the model folder {model!r}, which is not there "
        f"(seen from {Path.cwd()}); name the folder holding the same weights "
        f"({recorded.get('model_fingerprint')}) in the settings: model = \"/path/to/folder\" under "
        "[encoder] in htp-index.toml, or HTP_INDEX_ENCODER__MODEL=/path/to/folder"
    )


@cache
def _index_with_defaults() -> type[VectorStoreIndex]:
    """VectorStoreIndex whose retrievers take an open index's defaults (defined on first use:
    LlamaIndex is imported only when an app asks for it)."""
    from llama_index.core import VectorStoreIndex

    class IndexWithDefaults(VectorStoreIndex):
        retriever_defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        engine_defaults: Callable[[dict[str, Any]], dict[str, Any]] | None = None

        def as_retriever(self, **kwargs: Any) -> BaseRetriever:
            defaults = self.retriever_defaults
            return super().as_retriever(**(defaults(kwargs) if defaults is not None else kwargs))

        def as_query_engine(self, llm: Any = None, **kwargs: Any) -> Any:
            defaults = self.engine_defaults
            return super().as_query_engine(llm=llm, **(defaults(kwargs) if defaults is not None else kwargs))

        def as_chat_engine(self, *args: Any, **kwargs: Any) -> Any:
            defaults = self.engine_defaults
            return super().as_chat_engine(*args, **(defaults(kwargs) if defaults is not None else kwargs))

        def insert(self, document: Any, **insert_kwargs: Any) -> None:
            """Insert ``document``, replacing the nodes of a document of the same id the store
            already holds. LlamaIndex's insert added them beside the old ones, and its
            ``refresh_ref_docs``, whose hashes live in memory only, inserts every document
            again after a reopen: each refresh doubled the documents."""
            from pipelines.sources import clean_text, require_encodable

            doc_id = document.get_doc_id()
            text = document.get_content()
            cleaned = clean_text(text)  # as a file's text is read: controls and soft hyphens go
            if not has_visible_text(cleaned):
                # ingest refuses it; inserted, a zero-width space became a node every query
                # could rank, and whitespace returned without storing anything
                raise DocumentRejected(f"document {doc_id!r} is empty (no visible text): nothing to index")
            require_encodable(cleaned, f"document {doc_id!r}")  # was a TypeError from the tokenizer
            if document.metadata.get("doc_id", doc_id) != doc_id:  # as a JSONL record's is refused
                raise DocumentRejected(f"document {doc_id!r}: metadata key 'doc_id' is reserved: htp-index sets "
                                       "it to the document's id on every node; rename it")
            if cleaned != text or "doc_id" not in document.metadata:
                document = document.model_copy()  # the caller's document stays as it was given
                document.set_content(cleaned)
                # as ingest tags every node (a doc_id filter found no inserted document), kept
                # out of the text the encoder and the LLM see
                document.metadata = {**document.metadata, "doc_id": doc_id}
                document.excluded_embed_metadata_keys = [*document.excluded_embed_metadata_keys, "doc_id"]
                document.excluded_llm_metadata_keys = [*document.excluded_llm_metadata_keys, "doc_id"]
            if self._vector_store.ref_doc_node_ids(doc_id):
                self.delete_ref_doc(doc_id, delete_from_docstore=True)
            super().insert(document, **insert_kwargs)

    return IndexWithDefaults
