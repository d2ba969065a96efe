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

import itertools
import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery

from htp_embed import EncoderConfig, HTPEncoder, config_from_identity
from htp_embed.encoder import MaxLengthPastPositionsError
from htp_embed.fingerprint import accepts
from indexes import (
    EncoderMismatchError,
    FaissVectorStore,
    IndexConflictError,
    IndexNotFoundError,
    VectorCorrection,
    same_encoder,
)
from indexes.spec import Manifest
from pipelines.adapter import MIN_PAIRS
from pipelines.chunking import (
    MIN_CHUNK_SIZE,
    TEMPLATE_MARGIN,
    default_chunk_size,
    embed_text,
    make_splitter,
    split_documents,
)
from pipelines.correction import MIN_DOCUMENTS, fit_correction
from pipelines.encoder_check import record_check, require_same_vectors
from pipelines.errors import (
    CorrectionMismatchError,
    EmptySourceError,
    IndexKindMismatchError,
    MetricMismatchError,
    OptionConflictError,
    RebuildVerificationError,
    SplittingMismatchError,
)
from pipelines.file_stats import FileStatsCache
from pipelines.identity_check import expected_identity, index_accepts, require_encoder_record
from pipelines.lock import index_lock
from pipelines.runs import IngestPlan, RebuildPlan, RunStats, SplitNodes, plan_ingest
from pipelines.settings import Settings, load_settings
from pipelines.sources import (
    SUPPORTED_SUFFIXES,
    SourceDocument,
    SourceError,
    errors_by_id,
    iter_source,
    single_document,
    source_kind,
)

log = logging.getLogger(__name__)
#: A node's overlap with the next is at most this share of its size (as the splitter caps it).
MAX_OVERLAP_SHARE = 4

Progress = Callable[[int], None]
T = TypeVar("T")

# A version filled for the first time fits its vector correction on the first batches' nodes,
# at most this many: enough for the means (the pseudo-queries are capped at 1,024 anyway), and
# the vectors of a larger corpus never have to be held all at once.
CORRECTION_SAMPLE_NODES = 20_000
NodesOf = Callable[["EmbeddedBatch"], list[TextNode]]

# Settings whose value follows the model (layers, and whether its tokenizer needs a sink
# token) or the method (a sink only matters to htp/tp, so a vanilla index records none): an
# encoder onto another model or method takes their defaults for each one not given too. A
# recorded "no sink" used to carry over, so a Gemma index rebuilt onto SmolLM2 ran HTP
# without the sink it needs (15 NDCG@10 lost), and an environment or file model kept Gemma's
# layers.
_MODEL_DEFAULTS = {"rewire_start": None, "rewire_stop": None, "exit_layer": "default", "attention_sink": "auto"}
_METHOD_DEFAULTS = {"attention_sink": "auto"}


# --------------------------------------------------------------------------- embedding
@dataclass(frozen=True)
class EmbeddedBatch:
    """Vectors of a batch of nodes (row i is ``node_ids[i]``), the documents that could not be
    embedded (id -> why), the tokens the encoder ran, the nodes it had to cut to its window,
    and the identity of that encoder."""

    node_ids: list[str]
    vectors: np.ndarray
    identity: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    truncated: int = 0

    @cached_property
    def _row(self) -> dict[str, int]:
        return {node_id: i for i, node_id in enumerate(self.node_ids)}

    def rows_of(self, nodes: Sequence[TextNode]) -> np.ndarray:
        """The vectors of ``nodes``, in their order."""
        return self.vectors[[self._row[node.node_id] for node in nodes]].reshape(len(nodes), self.vectors.shape[1])


def embed_batch(batch: Sequence[TextNode], encoder: HTPEncoder, progress: Progress | None = None) -> EmbeddedBatch:
    """Embed a batch of nodes; if the batch fails, retry it document by document so one bad
    document costs only itself. This is the unit a task runner fans out."""
    shown = 0  # of this batch on the caller's bar, reported pass by pass

    def advance(count: int) -> None:
        nonlocal shown
        shown += count
        if progress:
            progress(count)

    try:
        return _embed(batch, encoder, advance)
    except Exception as exc:  # isolate the culprit, whatever broke
        log.warning("embedding batch failed (%s); retrying its documents one by one", exc)
    counted = shown  # the retry first covers what the bar already shows
    given = 0  # of the document being retried

    def advance_again(count: int) -> None:
        nonlocal counted, given
        given += count
        taken = min(count, counted)
        counted -= taken
        if progress and count > taken:
            progress(count - taken)

    groups: dict[str, list[TextNode]] = {}
    for node in batch:
        groups.setdefault(doc_id_of(node), []).append(node)
    parts: list[EmbeddedBatch] = []
    errors: dict[str, str] = {}
    for doc_id, nodes in groups.items():
        given = 0
        try:
            parts.append(_embed(nodes, encoder, advance_again))
        except Exception as exc:
            errors[doc_id] = f"could not embed: {type(exc).__name__}: {exc}"
            advance_again(len(nodes) - given)  # what its failed passes did not show
    return combine(parts, encoder.identity(), encoder.dim, errors)


def _embed(nodes: Sequence[TextNode], encoder: HTPEncoder, progress: Progress | None) -> EmbeddedBatch:
    encoded = encoder.encode_with_stats([embed_text(node) for node in nodes], on_batch=progress or None)
    return EmbeddedBatch([node.node_id for node in nodes], encoded.vectors, encoder.identity(), tokens=encoded.tokens,
                         truncated=encoded.truncated)


def combine(
    batches: Sequence[EmbeddedBatch], identity: dict[str, Any], dim: int, errors: Mapping[str, str] | None = None
) -> EmbeddedBatch:
    """One batch of all ``batches``, refusing any made by an encoder other than ``identity``."""
    for batch in batches:
        if not accepts(identity, batch.identity):
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
        identity, merged, sum(batch.tokens for batch in batches), sum(batch.truncated for batch in batches),
    )


def doc_id_of(node: TextNode) -> str:
    """The document a node belongs to: its source document, else the ``doc_id`` its metadata
    names, else (a node inserted on its own through LlamaIndex) the node itself. Such a node
    stopped every later rebuild and ingest with a bare ``KeyError: 'doc_id'``."""
    return node.ref_doc_id or str(node.metadata.get("doc_id") or node.node_id)


# --------------------------------------------------------------------------- where steps run
class StepRunner(Protocol):
    """Where a session's steps run: :class:`InProcess`, or Prefect tasks (``flows``)."""

    def run(self, name: str, step: Callable[..., T], *args: Any) -> T:
        """Run one step (``plan``, ``split``, ``apply-and-persist``…) and return its result."""
        ...

    def embed(self, batches: list[list[TextNode]], session: IndexSession) -> Iterable[EmbeddedBatch]:
        """Embed every batch with exactly ``session.settings.encoder``, in order; a runner may
        yield each batch as it is done, so the writer holds one batch of vectors at a time."""
        ...


@dataclass
class InProcess:
    """Every step here, in this process, reporting embedding progress to the caller."""

    progress: Progress | None = None
    on_total: Callable[[int], None] | None = None

    def run(self, name: str, step: Callable[..., T], *args: Any) -> T:
        return step(*args)

    def embed(self, batches: list[list[TextNode]], session: IndexSession) -> Iterator[EmbeddedBatch]:
        if self.on_total:
            self.on_total(sum(len(batch) for batch in batches))
        return (embed_batch(batch, session.encoder, self.progress) for batch in batches)


# --------------------------------------------------------------------------- the session
# Nodes laid out at once when a rebuild checks that the stored ones fit (bounds the memory).
_LAYOUT_BATCH = 1024


def resolve_encoder(
    manifest: Manifest | None, settings: Settings, overrides: Mapping[str, Any] | None = None
) -> EncoderConfig:
    """The encoder of this session: an existing index's recorded encoder (a new index: the
    settings'), with the encoder settings given explicitly (file, environment, option) and then
    ``overrides`` (a rebuild's new model, method…) applied on top. Runtime settings (device,
    batch size) always come from ``settings``."""
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if manifest is None:
        base = settings.encoder
    else:
        base = config_from_identity(manifest.encoder, **settings.runtime_encoder_settings())
        given = {**settings.explicit_encoder_settings(), **given}
    defaults: dict[str, Any] = {}
    if given.get("model", base.model) != base.model:
        defaults |= _MODEL_DEFAULTS
    if given.get("method", base.method) != base.method:
        defaults |= _METHOD_DEFAULTS
    given = {**{key: value for key, value in defaults.items() if key not in given}, **given}
    return EncoderConfig(**{**base.model_dump(), **given}) if given else base


def _where_set(name: str, option: str | None) -> str:
    """Where a splitting setting may have been given: the asking command's option, if it has one,
    the environment, or the settings file."""
    return (f"{option}, " if option else "") + f"HTP_INDEX_{name.upper()} or {name} in the settings file"


# Options of some methods only, by the identity field of the methods they concern
# (EncodingMethod.identity_fields): K is HTP's, rewiring HTP's and TP's.
_METHOD_ONLY_OPTIONS = {"--k": "k", "--rewire-start": "rewire", "--rewire-stop": "rewire"}


def refuse_options_the_method_ignores(
    index_dir: str | Path, settings: Settings, asked: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> None:
    """Refuse encoder options ``asked`` on the command line (``{"--k": "4"}``, None: not given)
    that the method of the run ignores: ``ingest --method vanilla --k 4`` indexed without a word
    of K, which only HTP uses. The method is the one the session would use (``overrides``,
    then the settings, then the index's own)."""
    given = [flag for flag, value in asked.items() if value is not None]
    if not given:
        return
    path = Path(index_dir)
    manifest = FaissVectorStore.read_manifest(path) if FaissVectorStore.exists(path) else None
    method = {key: value for key, value in (overrides or {}).items() if value is not None}.get("method") or (
        settings.encoder.method if manifest is None or "method" in settings.encoder.model_fields_set
        else str(manifest.encoder.get("method", settings.encoder.method)))
    refusal = options_the_method_ignores(method, given)
    if refusal:
        raise OptionConflictError(refusal)


def options_the_method_ignores(method: str, given: Sequence[str]) -> str | None:
    """Why ``given`` (options of :data:`_METHOD_ONLY_OPTIONS`, e.g. ``["--k"]``) do not apply
    to ``method``, or None when they all do: the one rule of which method uses which option,
    for ingest and rebuild as for eval (whose ``--method vanilla --k 3`` scored vanilla)."""
    from htp_embed.methods import method_for

    uses = method_for(method).identity_fields
    ignored = [flag for flag in given if _METHOD_ONLY_OPTIONS[flag] not in uses]
    if not ignored:
        return None
    users = [name for name in ("htp", "tp")
             if all(_METHOD_ONLY_OPTIONS[flag] in method_for(name).identity_fields for flag in ignored)]
    return (f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to method {method} "
            f"(only to {' and '.join(users)}): drop {'it' if len(ignored) == 1 else 'them'}, or choose --method "
            f"{users[0]}")


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
        self._writers: list[FaissVectorStore] = []  # stores this session writes: see abandon()
        self._applying = False  # an apply began and has not finished (a task retry runs it again)

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
        with index_lock(path, settings.lock_timeout, create=True):  # an ingest may start the index
            manifest = FaissVectorStore.read_manifest(path) if FaissVectorStore.exists(path) else None
            if manifest is not None:
                require_encoder_record(path, manifest.encoder)
            config = resolve_encoder(manifest, settings, encoder_overrides)
            session = cls(path, settings.model_copy(update={"encoder": config}), manifest, encoder, load_encoder)
            try:
                yield session
            except BaseException:
                session.abandon()
                raise

    def abandon(self) -> None:
        """Remove what the session's stores wrote and did not commit (see
        `SegmentStore.discard_uncommitted`); the live version is untouched."""
        for store in self._writers:
            try:
                store.discard_uncommitted()
            except OSError as exc:  # the next commit collects what is left
                log.warning("could not remove the uncommitted segments of %s: %s", self.index_dir, exc)
        self._writers.clear()

    # ---------------------------------------------------------------- what it holds
    @property
    def encoder(self) -> HTPEncoder:
        """The session's encoder, loaded on first use (a worker-side step never needs it here)."""
        if self._encoder is None:
            self._encoder = self._load(self.settings.encoder)
        return self._encoder

    def _load(self, config: EncoderConfig) -> HTPEncoder:
        """``load_encoder(config)``, a ``max_length`` the index recorded past the model's
        positions (an older htp-index took one) refused with the rebuild that mends it: its
        advice, "use max_length <= N", was refused again as another encoder than the index's."""
        try:
            return self._load_encoder(config)
        except MaxLengthPastPositionsError as exc:
            recorded = (self.manifest.encoder if self.manifest is not None else {}).get("max_length")
            if recorded != config.max_length:
                raise
            raise MaxLengthPastPositionsError(
                f"the index at {self.index_dir} was built with max_length={recorded}, more than {config.model} "
                f"holds (max_position_embeddings {exc.positions}), which an earlier htp-index took: queries "
                "still run, but nothing more is embedded into it until "
                f"`HTP_INDEX_ENCODER__MAX_LENGTH={exc.positions} htp-index rebuild --index {self.index_dir}` "
                "(with --source SOURCE if its nodes are longer than that)", exc.positions) from None

    @property
    def store(self) -> FaissVectorStore:
        """The index to write into: the existing one, opened once and refusing another encoder or
        index kind, or a new one that is first written by :meth:`apply`."""
        if self._store is None:
            self._store = self._open_store() if self.manifest else self._create_store(self.settings.index_kind)
        return self._store

    def _open_store(self) -> FaissVectorStore:
        settings = self.settings
        assert self.manifest is not None
        store = FaissVectorStore.open(
            self.index_dir, expected_encoder=self._expected_encoder(self.manifest.encoder),
            keep_versions=settings.keep_versions,
            **settings.faiss_placement(),
        )
        self._writers.append(store)
        current = self.encoder.identity()
        if not same_encoder(store.encoder, current):  # an older record it upgrades (checked above)
            store.upgrade_encoder(current)
        # The identity does not name the tokenizer, the config or our arithmetic: the encoder must
        # also still give the vectors the index recorded for its check texts.
        require_same_vectors(self.encoder, store.encoder_check, str(self.index_dir))
        if "index_kind" in settings.model_fields_set and settings.index_kind != store.index_kind:
            raise IndexKindMismatchError(
                f"the index at {self.index_dir} is a {store.index_kind!r} index; to make it "
                f"{settings.index_kind!r}, run `htp-index rebuild --index {self.index_dir} --index-kind "
                f"{settings.index_kind} --keep-vectors` (no re-embedding)"
            )
        if "metric" in settings.model_fields_set and settings.metric != self.manifest.metric:
            raise MetricMismatchError(
                f"the index at {self.index_dir} compares vectors by {self.manifest.metric!r}; to use "
                f"{settings.metric!r}, run `htp-index rebuild --index {self.index_dir} --keep-vectors` "
                f"with metric = {settings.metric!r} (no re-embedding), or drop the setting"
            )
        self._check_splitting(store.splitting, "this ingest", options={"chunk_size": "--chunk-size"})
        self._check_correction(store)
        return store

    def _check_correction(self, store: FaissVectorStore) -> None:
        """Refuse a correction set explicitly that differs from the one the index's vectors
        have: it was applied to nothing (``eval --pipeline --index-dir`` with ``correction =
        "none"`` scored a kept, centred index 92.3 where a fresh one scores 79.8). An index
        still too small for one (fewer than `MIN_DOCUMENTS` nodes) may get the one asked for."""
        if "correction" not in self.settings.model_fields_set:
            return
        stored = store.correction.kind if store.correction is not None else "none"
        if self.settings.correction == stored or (store.correction is None and store.count < MIN_DOCUMENTS):
            return
        if self.settings.correction == "adapter" and stored == "center" and store.correction.pseudo_queries < MIN_PAIRS:
            # What "adapter" fits from a corpus of too few sentences: its centring alone (the same
            # pairs a centring samples). Refused, every later ingest failed until a rebuild of
            # a corpus large enough, which fell back again at the same size.
            log.info("%s: correction 'center': its corpus gave %d pseudo-query pairs when fitted, fewer than "
                     "the adapter's %d; `htp-index rebuild` fits one once the corpus is large enough",
                     self.index_dir, store.correction.pseudo_queries, MIN_PAIRS)
            return
        raise CorrectionMismatchError(
            f"the index at {self.index_dir} holds vectors with correction {stored!r}; to use correction "
            f"{self.settings.correction!r}, run `htp-index rebuild --index {self.index_dir}` with it (re-embeds), "
            "or drop the setting"
        )

    # ---------------------------------------------------------------- splitting
    @property
    def splitting(self) -> dict[str, int]:
        """How this session splits documents into nodes: a value set explicitly (option, TOML,
        ``HTP_INDEX_*``) wins, then the one the index recorded, then the settings' default (the
        encoder's window): an index keeps one node size across ingests whatever a later run's
        defaults are."""
        settings, explicit = self.settings, self.settings.model_fields_set
        recorded = (self.manifest.splitting if self.manifest is not None else None) or {}
        fits = default_chunk_size(self.encoder)
        room = self.encoder.text_budget - TEMPLATE_MARGIN
        if room < MIN_CHUNK_SIZE:  # was held at the floor, and nearly every node cut to fit
            config = self.encoder.config
            needed = self.encoder.max_length_for(MIN_CHUNK_SIZE + TEMPLATE_MARGIN)
            raise OptionConflictError(
                f"max_length {config.max_length} leaves {max(room, 0)} tokens of text a node with method "
                f"{config.method}, less than the smallest node ({MIN_CHUNK_SIZE} tokens): raise max_length "
                f"by at least {needed - config.max_length} (to {needed})")
        size = ((settings.chunk_size if "chunk_size" in explicit else None) or recorded.get("chunk_size")
                or settings.chunk_size or fits)
        if size > fits:  # each node's vector would stand for its beginning only
            if "chunk_size" in explicit:
                raise OptionConflictError(
                    f"chunk_size {size} is more than the encoder's window holds ({fits} tokens of text at "
                    f"max_length {self.encoder.config.max_length} with method {self.encoder.config.method}): each "
                    f"node's vector would stand for its beginning only. Use at most {fits}, or leave it out")
            log.warning("nodes of %d tokens (as %s recorded) are more than encoder %s (method %s) holds: "
                        "splitting at %d tokens, so that no node is embedded from its beginning only",
                        size, self.index_dir, self.encoder.config.model, self.encoder.config.method, fits)
            size = fits
        overlap = settings.chunk_overlap if "chunk_overlap" in explicit else recorded.get("chunk_overlap", settings.chunk_overlap)
        most = int(size) // MAX_OVERLAP_SHARE
        if "chunk_overlap" in explicit and overlap > most:
            raise OptionConflictError(
                f"chunk_overlap {overlap} is more than 1/{MAX_OVERLAP_SHARE} of chunk_size {size}: at most {most}")
        # A default overlap is capped as the splitter caps it, so the index records what is used.
        return {"chunk_size": int(size), "chunk_overlap": min(int(overlap), most)}

    def _check_splitting(self, recorded: dict[str, int] | None, asked_by: str,
                         options: Mapping[str, str] | None = None) -> None:
        """Refuse a splitting set explicitly that differs from the one the index's nodes have:
        applied to new documents only, it would leave one index with two node sizes.
        ``options``: the command-line option of each setting that the asking command has (rebuild
        has none: its refusal told the user to drop a --chunk-size it never took)."""
        if not recorded:
            return
        explicit = self.settings.model_fields_set
        asked = {name: getattr(self.settings, name) for name in ("chunk_size", "chunk_overlap")
                 if name in explicit and getattr(self.settings, name) is not None}
        differing = {name: value for name, value in asked.items() if recorded.get(name) != value}
        if differing:
            now = ", ".join(f"{name} {recorded.get(name)}" for name in differing)
            wanted = ", ".join(f"{name} {value}" for name, value in differing.items())
            raise SplittingMismatchError(
                f"the index at {self.index_dir} was split with {now}; {asked_by} asks for {wanted}, "
                "which would give it nodes of two sizes. To split every document anew, run "
                f"`htp-index rebuild --index {self.index_dir} --source SOURCE` with that setting, or drop "
                "the setting (" + "; ".join(_where_set(name, (options or {}).get(name)) for name in differing) + ")"
            )

    def _expected_encoder(self, recorded: dict[str, Any]) -> dict[str, Any]:
        """The identity the store must record: this session's encoder's, or the older record it
        upgrades (an architecture-only fingerprint; logged once)."""
        identity = self.encoder.identity()
        index_accepts(self.index_dir, recorded, identity)
        return expected_identity(recorded, identity)

    def _create_store(self, index_kind: str, *, dim: int | None = None, encoder: dict[str, Any] | None = None,
                      replaces: int | None = None) -> FaissVectorStore:
        """An empty store at the index directory; nothing is written (and a live version keeps
        serving) until its first persist. ``replaces``: the live version a rebuild read (see
        `FaissVectorStore.create`)."""
        if self.manifest is None:
            log.info("creating a new %s index at %s", index_kind, self.index_dir)
        store = FaissVectorStore.create(
            self.index_dir, dim=dim or self.encoder.dim, encoder=encoder or self.encoder.identity(),
            metric=self._metric(), index_kind=index_kind, keep_versions=self.settings.keep_versions,
            overwrite=self.manifest is not None, persist_now=False, replaces=replaces,
            **self.settings.faiss_placement(),
        )
        self._writers.append(store)
        return store

    def _switch_to_rebuilt(self, new: FaissVectorStore, read: int | None) -> int:
        """Commit a rebuilt version; a version another writer committed since the rebuild read
        the live one is kept live, and the rebuild says so (it used to be dropped silently)."""
        try:
            return new.persist(force=True)
        except IndexConflictError as exc:
            raise IndexConflictError(
                f"another writer committed to {self.index_dir} after this rebuild read version {read} "
                "(a program writing through the Python API, which takes no lock): the rebuild was not "
                "switched to, and that writer's change stays live. Run the rebuild again",
                path=self.index_dir,
            ) from exc

    def _metric(self) -> str:
        """The distance a new version uses: one set explicitly, else the live index's (a rebuild
        used to switch an ``l2`` index to the default ``ip`` without a word)."""
        if "metric" in self.settings.model_fields_set or self.manifest is None:
            return self.settings.metric
        return self.manifest.metric

    def _correction_kind(self) -> str:
        """The correction a version filled for the first time fits: one set explicitly, else
        the one the index recorded, else the live version's kind (a rebuild under other
        settings used to turn an ``adapter`` index into a ``center`` one without a word), else
        the settings' default. The record matters where no correction says it: an index built
        with ``none`` (or too small for one yet) was given the default ``center`` by the next
        ingest or rebuild under default settings. A live version with neither gets the
        default: it may predate corrections, which is what ``rebuild`` adds to such an index."""
        if "correction" in self.settings.model_fields_set or self.manifest is None:
            return self.settings.correction
        live = self.live_store
        if live.correction_kind is not None:
            return live.correction_kind
        return live.correction.kind if live.correction is not None else self.settings.correction

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
        max_bytes = int(self.settings.max_document_mb * 2**20)
        indexed = self.store.doc_hashes()
        files = None
        if self.settings.trust_file_stats and source_kind(source) == "folder":
            files = FileStatsCache.for_source(self.index_dir, Path(source), max_bytes)
            items = files.observe(iter_source(source, max_bytes=max_bytes, known=files.known(indexed),
                                              exclude=self.settings.exclude))
        else:
            items = iter_source(source, max_bytes=max_bytes, exclude=self.settings.exclude)
        delete_missing = self.settings.delete_missing
        if delete_missing and single_document(source):
            log.info("%s is a single document: it is added or updated, the index's others are kept", source)
            delete_missing = False
        plan = plan_ingest(items, indexed, delete_missing=delete_missing)
        plan.files = files.records if files is not None else None
        self._replace_unrecorded(plan)
        if plan.deleted and not (plan.new or plan.changed or plan.unchanged):
            raise self._empty_source(source, len(plan.deleted), plan.errors)
        if not (plan.new or plan.changed or plan.unchanged or plan.errors or self.store.count):
            log.warning("the source %s holds no documents: the index stays empty (files read: %s; names "
                        "starting with '.' are left out)", source, ", ".join(sorted(SUPPORTED_SUFFIXES)))
        log.info("plan: %d new, %d changed, %d deleted, %d unchanged, %d unreadable",
                 len(plan.new), len(plan.changed), len(plan.deleted), len(plan.unchanged), len(plan.errors))
        return plan

    def _replace_unrecorded(self, plan: IngestPlan) -> None:
        """Move to ``plan.changed`` the "new" documents the index already holds nodes of without
        a recorded hash (written or updated through LlamaIndex's ``as_index()`` or the store
        API, which record none): they are replaced, where they used to be added a second time
        beside the nodes already there, and counted as added."""
        if not plan.new or not self.store.count:
            return
        held = {doc.doc_id for doc in plan.new if self.store.ref_doc_node_ids(doc.doc_id)}
        if held:
            log.info("%d document(s) of the source are in the index without a recorded hash (written "
                     "outside ingest, e.g. through LlamaIndex): their nodes are replaced", len(held))
            plan.changed.extend(doc for doc in plan.new if doc.doc_id in held)
            plan.new = [doc for doc in plan.new if doc.doc_id not in held]

    def _empty_source(self, source: Any, indexed: int, errors: Sequence[SourceError]) -> EmptySourceError:
        """The refusal of a source without one readable document while the index holds some."""
        found = (f"no document that could be read ({len(errors)} unreadable, e.g. {errors[0].doc_id}: "
                 f"{errors[0].error})" if errors else "no documents")
        return EmptySourceError(
            f"the source {source if isinstance(source, str | Path) else '(texts)'} holds {found} "
            f"but the index at {self.index_dir} holds {indexed}: nothing was changed (an unmounted, "
            "emptied or half-written source must not delete the whole index). To empty it on purpose, "
            f"remove {self.index_dir}, or ingest with --keep-missing to add without deleting"
        )

    def split(self, docs: Sequence[SourceDocument]) -> SplitNodes:
        """Nodes of each document, sized for the encoder's window; a document that fails to
        split is reported and skipped."""
        splitting = self.splitting
        splitter = make_splitter(self.encoder.tokenize, splitting["chunk_size"], splitting["chunk_overlap"])
        result = SplitNodes()
        for doc in docs:
            try:
                result.by_doc[doc.doc_id] = split_documents([doc], splitter)
            except Exception as exc:
                result.errors[doc.doc_id] = f"could not split: {type(exc).__name__}: {exc}"
        return result

    def apply(self, plan: IngestPlan, split: SplitNodes, embedded: Iterable[EmbeddedBatch]) -> RunStats:
        """Check the vectors came from the index's encoder, replace changed documents' nodes,
        add new ones, remove deleted ones, record hashes, and persist a new version.

        A retry after a failure part-way (the flows retry this step) starts from the index as
        committed: the store the failed attempt changed is dropped and opened again. It was
        reused, and an attempt that had fitted the correction, taking the earlier nodes out to
        write them back corrected, left them out for good on the retry (a run that ended
        Completed with 6 documents gone)."""
        if self._applying:
            self.abandon()
            self._store = None  # nothing of it is live: persist is the last step
        self._applying = True
        store = self.store
        if store.splitting is None:  # a new index records its splitting
            if self.manifest is not None and store.count:
                # Written before htp-index recorded it: any --chunk-size was taken without a word
                # and the index mixed node sizes. From this run on its size holds.
                log.warning("the index at %s records no node size (written by an older htp-index); recording "
                            "this run's (%s) so that later runs split new documents the same way. To split "
                            "every document anew, run `htp-index rebuild --index %s --source SOURCE`",
                            self.index_dir, ", ".join(f"{k} {v}" for k, v in self.splitting.items()), self.index_dir)
            store.record_splitting(self.splitting)
        if store.encoder_check is None:  # a new index, or one written before checks were recorded
            store.record_encoder_check(record_check(self.encoder))
        if self.manifest is None or "correction" in self.settings.model_fields_set:
            # A new index records the correction it was built with, and so does one still too
            # small for it that a setting asks another of (`_check_correction` refuses the rest)
            store.record_correction_kind(self._correction_kind())
        stats = RunStats()
        stats.fail_all(errors_by_id(plan.errors))
        stats.fail_all(split.errors)
        for doc_id in plan.deleted:  # first: a correction fitted by this run must not count them
            store.delete(doc_id)
        written = self.fill(
            store, nodes_by_id(split.by_doc), embedded, stats,
            hashes={doc.doc_id: doc.content_hash for doc in plan.to_embed},
            replace={doc.doc_id for doc in plan.changed},
        )
        stats.added = sum(1 for doc in plan.new if doc.doc_id in written)
        stats.updated = sum(1 for doc in plan.changed if doc.doc_id in written)
        stats.deleted = len(plan.deleted)
        stats.unchanged = len(plan.unchanged)
        first = store.manifest is None
        stats.version = store.persist(force=first) if plan.changes_anything or first else store.version
        stats.count = store.count
        if plan.files is not None:  # committed: the files whose documents it holds need no reading next run
            plan.files.save(store.doc_hashes())
        self._applying = False
        return stats

    def fill(
        self,
        store: FaissVectorStore,
        nodes_of: NodesOf,
        embedded: Iterable[EmbeddedBatch],
        stats: RunStats,
        *,
        hashes: Mapping[str, str],
        replace: Collection[str] = (),
        corrected: bool = False,
    ) -> set[str]:
        """Write documents into ``store`` batch by batch as their vectors arrive: the one path
        by which ingest, rebuild and rebuild --keep-vectors fill a version.

        Each batch holds whole documents; a document whose embedding failed is reported and
        keeps its previous nodes; one in ``replace`` loses its old nodes just before its new
        ones go in. A store that is being filled for the first time fits its vector correction
        first, on up to `CORRECTION_SAMPLE_NODES` nodes of the first batches. Vectors pass
        through one batch at a time (the store writes a segment every ``flush_rows`` rows), so
        memory does not grow with the corpus. Returns the documents written."""
        written: set[str] = set()
        pending = self._correction_sample(store, nodes_of, embedded, corrected, replace)
        for batch in pending:
            if not accepts(store.encoder, batch.identity):
                raise EncoderMismatchError(
                    f"an embedding batch came from encoder {batch.identity}, but the index's "
                    f"encoder is {store.encoder}; nothing was written"
                )
            stats.tokens += batch.tokens
            stats.nodes_truncated += batch.truncated
            stats.fail_all(batch.errors)
            docs: dict[str, list[TextNode]] = {}
            for node in nodes_of(batch):
                docs.setdefault(doc_id_of(node), []).append(node)
            for doc_id, nodes in docs.items():
                if doc_id in batch.errors:
                    continue
                if doc_id in replace:
                    store.delete(doc_id)
                store.add(nodes, embeddings=batch.rows_of(nodes), corrected=corrected)
                if doc_id in hashes:
                    store.set_doc_hash(doc_id, hashes[doc_id])
                written.add(doc_id)
                stats.nodes_embedded += len(nodes)
        return written

    def _correction_sample(
        self,
        store: FaissVectorStore,
        nodes_of: NodesOf,
        embedded: Iterable[EmbeddedBatch],
        corrected: bool,
        replace: Collection[str] = (),
    ) -> Iterable[EmbeddedBatch]:
        """``embedded`` again, after fitting the correction of a store filled for the first time
        on the first batches (up to `CORRECTION_SAMPLE_NODES` nodes, held meanwhile).

        A store that already holds a few nodes but too few for a correction (a first ingest of
        fewer than `MIN_DOCUMENTS` nodes) counts as filled for the first time too: its nodes
        join the sample and are written again corrected. Before, such an index never got a
        correction from later ingests (dense NDCG@10 on the development split: 34.4 without, 45.7
        with, ``benchmarks/results/quality/pseudo_queries.md``), unless someone ran a rebuild.
        The stored nodes of documents this run replaces are left out of the sample (their new
        version is in it; the old one was counted twice, and fitted the correction one node
        early), though written back corrected until their replacement lands."""
        if (store.count >= MIN_DOCUMENTS or store.correction is not None or corrected
                or self._correction_kind() == "none"):
            return embedded
        stored = list(StoredBatches(store)) if store.count else []  # raw: no correction yet
        stream = iter(embedded)
        held: list[EmbeddedBatch] = []
        for batch in stream:
            held.append(batch)
            if sum(len(b.node_ids) for b in held) >= CORRECTION_SAMPLE_NODES:
                break
        if not held:  # nothing new: the stored nodes alone were too few before, and still are
            return stream
        good = [(batch, [n for n in nodes_of(batch) if doc_id_of(n) not in batch.errors]) for batch in held]
        good += [(batch, [n for n in batch.nodes if doc_id_of(n) not in replace]) for batch in stored]
        nodes = [node for _, batch_nodes in good for node in batch_nodes]
        if not nodes:
            return itertools.chain(held, stream)
        correction = fit_correction(np.concatenate([batch.rows_of(batch_nodes) for batch, batch_nodes in good]),
                                    [embed_text(node) for node in nodes], self.encoder, kind=self._correction_kind())
        if correction is not None:
            self._set_correction(store, correction, stored)
        return itertools.chain(held, stream)

    @staticmethod
    def _set_correction(store: FaissVectorStore, correction: VectorCorrection, stored: Sequence[StoredBatch]) -> None:
        """Give ``store`` its correction; the nodes ``stored`` (read raw before it had one) go
        out first (a store takes a correction only while empty) and back in corrected, with
        their documents' hashes."""
        hashes = store.doc_hashes()
        docs: dict[str, list[tuple[StoredBatch, TextNode]]] = {}
        for batch in stored:
            for node in batch.nodes:
                docs.setdefault(doc_id_of(node), []).append((batch, node))
        for doc_id in docs:
            store.delete(doc_id)
        store.set_correction(correction)
        log.info("fitted the vector correction on %d nodes and %d pseudo-queries",
                 correction.fitted_on, correction.pseudo_queries)
        for doc_id, pairs in docs.items():
            store.add([node for _, node in pairs], embeddings=np.stack([batch.rows_of([node])[0] for batch, node in pairs]))
            if doc_id in hashes:
                store.set_doc_hash(doc_id, hashes[doc_id])
        if docs:
            log.info("wrote the %d nodes of the earlier, smaller ingest again, corrected",
                     sum(len(pairs) for pairs in docs.values()))

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
        if source is None:  # the stored nodes as they were split
            self._check_splitting(live.splitting, "a rebuild from the stored nodes")
            stored = stored_documents(live)
            self._require_nodes_fit(stored)
            return RebuildPlan(self._rebuild_kind(index_kind, live.index_kind), SplitNodes(stored),
                               live.doc_hashes(), splitting=self._splitting_to_fit(live.splitting),
                               indexed=frozenset(stored), base_version=live.version)
        items = list(iter_source(source, max_bytes=int(self.settings.max_document_mb * 2**20),
                                 exclude=self.settings.exclude))
        readable = [item for item in items if isinstance(item, SourceDocument)]
        indexed = live.doc_hashes()
        # Documents written outside ingest (LlamaIndex's as_index(), the store API) have no
        # recorded hash: they were left out of the new version without a word, even with
        # --keep-missing. They count as indexed documents that this source may not hold.
        unrecorded: dict[str, list[str]] = {}
        for node in live.iter_nodes():  # rows only: no vector is read
            if doc_id_of(node) not in indexed:
                unrecorded.setdefault(doc_id_of(node), []).append(node.node_id)
        indexed.update(dict.fromkeys(unrecorded, ""))
        failed = [item for item in items if isinstance(item, SourceError)]
        if not readable and indexed and self.settings.delete_missing:
            raise self._empty_source(source, len(indexed), failed)
        split = self.split(readable)
        hashes = {doc.doc_id: doc.content_hash for doc in readable if doc.doc_id not in split.errors}
        errors = errors_by_id(failed)
        # As in ingest, an indexed document that fails keeps its indexed version: its stored
        # nodes go into the new version (re-embedded). So does one missing from the source where
        # ingest would keep it: under an error's ``covers`` prefix (a folder that could not be
        # listed), with --keep-missing, or beside a single-document source.
        covered = tuple({item.covers for item in failed if item.covers is not None})
        keep_missing = not self.settings.delete_missing or single_document(source)
        read = {doc.doc_id for doc in readable}
        deleted: list[str] = []
        for doc_id in indexed:
            if doc_id in hashes:  # read and split (a repeated _id's error is not its failure)
                continue
            failure = errors if doc_id in errors else split.errors if doc_id in split.errors else None
            if failure is None and (doc_id in read or not (keep_missing or doc_id.startswith(covered))):
                if doc_id not in read:
                    deleted.append(doc_id)
                continue
            nodes = live.get_nodes(node_ids=unrecorded.get(doc_id) or live.ref_doc_node_ids(doc_id))
            if nodes:
                split.by_doc[doc_id] = [_fresh_node(node) for node in nodes]  # type: ignore[arg-type]
                if indexed[doc_id]:  # one written outside ingest stays without a hash
                    hashes[doc_id] = indexed[doc_id]
                if failure is not None:
                    failure[doc_id] += "; its indexed version is kept"
        if deleted:
            log.info("rebuild: %d indexed document(s) are gone from the source and are left out "
                     "(keep them with --keep-missing), e.g. %s", len(deleted), deleted[0])
        return RebuildPlan(self._rebuild_kind(index_kind, live.index_kind), split, hashes, errors, self.splitting,
                           deleted=sorted(deleted), indexed=frozenset(indexed), base_version=live.version)

    def _require_nodes_fit(self, stored: Mapping[str, Sequence[TextNode]]) -> None:
        """Refuse a rebuild from the stored nodes if some would not fit the session's encoder
        untruncated (its vector would stand for the node's beginning only). Each node is laid
        out as the encoder will run it: comparing the chunk size the index recorded refused
        every ``--k`` or ``--method`` that took a few tokens of room, even for nodes of 20
        tokens, and comparing token counts with :attr:`HTPEncoder.text_budget` missed a fixed
        K's placeholders, two a block, so a node's length depends on its sentences
        (``--k 1`` cut 6 of 7 nodes of short sentences, exit 0). The rebuild embeds every node
        anyway; the layout is the tokenising half of that work."""
        texts = [embed_text(node) for nodes in stored.values() for node in nodes]
        over: list[int] = []
        for start in range(0, len(texts), _LAYOUT_BATCH):
            batch = texts[start:start + _LAYOUT_BATCH]
            over += [self.encoder.count_tokens(text)
                     for text, layout in zip(batch, self.encoder.layouts(batch), strict=True) if layout.truncated]
        if over:
            config = self.encoder.config
            fixed_k = config.method == "htp" and config.k.kind == "fixed"
            raise SplittingMismatchError(
                f"{len(over)} of the {len(texts)} nodes of the index at {self.index_dir} are longer than encoder "
                f"{config.model} with method {config.method}{f' k={config.k}' if fixed_k else ''} holds "
                f"untruncated at max_length {config.max_length} (the longest has {max(over)} tokens of text), so "
                "their vectors would stand for their beginnings only. Run "
                f"`htp-index rebuild --index {self.index_dir} --source SOURCE` (re-splits every document to fit)"
                + ("; a fixed K adds two placeholders every K sentences, so many short sentences outgrow the "
                   "window: a larger --k or adaptive holds more" if fixed_k else ""))

    def _splitting_to_fit(self, recorded: dict[str, int] | None) -> dict[str, int] | None:
        """The splitting a rebuild from the stored nodes records: the index's, its chunk size
        capped at what the session's encoder holds, so later ingests split new documents to fit."""
        fits = default_chunk_size(self.encoder)
        if not recorded or recorded["chunk_size"] <= fits:
            return recorded
        return {"chunk_size": fits, "chunk_overlap": min(recorded.get("chunk_overlap", 0), fits // MAX_OVERLAP_SHARE)}

    def _rebuild_kind(self, asked: str | None, live_kind: str) -> str:
        """The kind a rebuild writes: the one asked for, else one the settings set explicitly
        (htp-index.toml, ``HTP_INDEX_INDEX_KIND``: what ingest refuses a mismatch with, naming
        rebuild), else the live index's."""
        if asked:
            return asked
        if "index_kind" in self.settings.model_fields_set:
            return self.settings.index_kind
        return live_kind

    def write_rebuild(self, plan: RebuildPlan, embedded: Iterable[EmbeddedBatch]) -> RunStats:
        """Build the new version beside the live one as batches arrive, verify it, and switch
        to it atomically."""
        new = self._create_store(plan.index_kind, replaces=plan.base_version)
        if plan.splitting:
            new.record_splitting(plan.splitting)
        new.record_encoder_check(record_check(self.encoder))  # re-embedded by this encoder
        new.record_correction_kind(self._correction_kind())
        stats = RunStats()
        stats.fail_all(plan.errors)
        stats.fail_all(plan.nodes.errors)
        written = self.fill(new, nodes_by_id(plan.nodes.by_doc), embedded, stats, hashes=plan.hashes)
        unembedded = sorted(set(plan.nodes.by_doc) - written)
        if unembedded:
            # Switching would drop them (ingest keeps such a document's nodes; a new version has
            # no old ones to keep): the live version stays as it is.
            first = unembedded[0]
            raise RebuildVerificationError(
                f"{len(unembedded)} document(s) could not be embedded (e.g. {first}: "
                f"{next((e['error'] for e in stats.errors if e['doc_id'] == first), 'see the log')}); the rebuild was not switched to "
                "and the live version is unchanged. Run it again, or remove those documents first"
            )
        expected = sum(len(plan.nodes.by_doc[doc_id]) for doc_id in written)
        verify(new, expected, self.encoder.encode_queries(["probe"])[0] if expected else None)
        # "added" for every document read as if the index had been empty (a rebuild printed
        # "added 5183" for an index of 5,183): re-embedded documents it held are updated
        stats.updated = len(written & plan.indexed)
        stats.added = len(written) - stats.updated
        stats.deleted = len(plan.deleted)
        stats.version = self._switch_to_rebuilt(new, plan.base_version)
        stats.count = new.count
        return stats

    def rebuild_keeping_vectors(self, index_kind: str | None = None) -> RunStats:
        """A new version from the stored nodes *and vectors*: adds what an index written by an
        older htp-index lacks (a vector correction fitted on its stored vectors, which are then
        still as the encoder made them), or changes the index kind. Nodes and vectors stream
        from the old version a batch at a time. The encoder is loaded only to embed the
        pseudo-queries of a new correction."""
        old = self.live_store
        self._check_splitting(old.splitting, "a rebuild keeping the vectors")
        corrected = old.correction is not None
        stored_kind = old.correction.kind if old.correction is not None else "none"
        if "correction" in self.settings.model_fields_set and corrected and self.settings.correction != stored_kind:
            # The stored vectors come with their correction; it used to be copied over a
            # different explicit setting without a word.
            raise CorrectionMismatchError(  # bad usage: a retry fails the same way
                f"the index at {self.index_dir} holds vectors corrected with {stored_kind!r}; a rebuild "
                f"keeping them keeps that. To use correction {self.settings.correction!r}, run "
                f"`htp-index rebuild --index {self.index_dir}` without --keep-vectors (it re-embeds)"
            )
        new = self._create_store(self._rebuild_kind(index_kind, old.index_kind), dim=old.dim, encoder=old.encoder,
                                 replaces=old.version)
        if old.splitting:
            new.record_splitting(old.splitting)
        new.record_encoder_check(old.encoder_check)  # the vectors, and so their encoder, stay
        kind = self._correction_kind()  # an index built with "none" keeps it unless one is set
        new.record_correction_kind(kind)
        if corrected:
            new.set_correction(old.correction)
        elif kind != "none" and old.count and (
            self._encoder is None or not accepts(old.encoder, self._encoder.identity())
        ):
            # The pseudo-queries must come from the encoder that made the stored vectors: reuse
            # a given encoder only if it is that one, else load exactly that one (once).
            self._encoder = self._load(config_from_identity(old.encoder, **self.settings.runtime_encoder_settings()))
        if not corrected and kind != "none" and old.count:
            # ... and it must still embed as that one did, or the fitted correction would be off
            require_same_vectors(self.encoder, old.encoder_check, str(self.index_dir))
        stored = StoredBatches(old, self.settings.nodes_per_batch)
        stats = RunStats()
        written = self.fill(new, stored.nodes_of, stored, stats, hashes=old.doc_hashes(),
                            corrected=corrected)
        stats.nodes_embedded = 0  # nothing was embedded: the vectors are the stored ones
        verify(new, old.count, None)
        stats.unchanged = len(written)  # carried over as they were, vectors and all
        stats.version = self._switch_to_rebuilt(new, old.version)
        stats.count = new.count
        return stats


@dataclass(frozen=True)
class StoredBatch(EmbeddedBatch):
    """An `EmbeddedBatch` read back from a version, carrying its nodes: the correction's sample
    holds several batches before any is written, so each must keep its own nodes."""

    nodes: list[TextNode] = field(default_factory=list)


class StoredBatches:
    """The stored nodes and vectors of a version as batches of whole documents, read a batch
    at a time (for rebuild --keep-vectors: nothing is embedded, nothing held whole)."""

    def __init__(self, store: FaissVectorStore, nodes_per_batch: int = 4096) -> None:
        self.store = store
        self.nodes_per_batch = nodes_per_batch

    @staticmethod
    def nodes_of(batch: EmbeddedBatch) -> list[TextNode]:
        """The nodes of a batch this reader yielded."""
        if not isinstance(batch, StoredBatch):
            raise TypeError(f"not a batch of stored nodes: {type(batch).__name__}")
        return batch.nodes

    def __iter__(self) -> Iterator[StoredBatch]:
        nodes: list[TextNode] = []
        vectors: list[np.ndarray] = []
        for node, vector in self.store.iter_nodes_with_embeddings():
            fresh = _fresh_node(node)
            if len(nodes) >= self.nodes_per_batch and doc_id_of(fresh) != doc_id_of(nodes[-1]):
                yield self._batch(nodes, vectors)
                nodes, vectors = [], []
            nodes.append(fresh)
            vectors.append(vector)
        if nodes:
            yield self._batch(nodes, vectors)

    def _batch(self, nodes: list[TextNode], vectors: list[np.ndarray]) -> StoredBatch:
        return StoredBatch([n.node_id for n in nodes], np.stack(vectors), self.store.encoder, nodes=nodes)


def nodes_by_id(by_doc: Mapping[str, Sequence[TextNode]]) -> NodesOf:
    """Look a batch's nodes up in a plan's documents (by node id, in the batch's order)."""
    index = {node.node_id: node for nodes in by_doc.values() for node in nodes}
    return lambda batch: [index[node_id] for node_id in batch.node_ids if node_id in index]


def _fresh_node(node: TextNode) -> TextNode:
    """A plain TextNode with the stored node's text, metadata and relationships."""
    return TextNode(
        id_=node.node_id, text=node.get_content(), metadata=dict(node.metadata),
        relationships=dict(node.relationships),
        excluded_embed_metadata_keys=list(node.excluded_embed_metadata_keys),
        excluded_llm_metadata_keys=list(node.excluded_llm_metadata_keys),
    )


def stored_documents(store: FaissVectorStore) -> dict[str, list[TextNode]]:
    """The nodes of every document in ``store``: text, metadata and relationships, no vectors."""
    by_doc: dict[str, list[TextNode]] = {}
    for node in store.all_nodes():
        fresh = _fresh_node(node)
        by_doc.setdefault(doc_id_of(node), []).append(fresh)
    return by_doc


def verify(store: FaissVectorStore, expected_count: int, probe: np.ndarray | None) -> None:
    """Checks before the switch: every node has its vector, and a search answers."""
    if store.count != expected_count:
        raise RebuildVerificationError(f"rebuilt index holds {store.count} vectors, expected {expected_count}")
    if probe is not None and expected_count:
        result = store.query(VectorStoreQuery(query_embedding=probe.tolist(), similarity_top_k=1))
        if not result.ids:
            raise RebuildVerificationError("rebuilt index returned nothing for a probe query")
