"""`SegmentStore`: vectors on FAISS, node rows and keyword postings, in versions made of
immutable segments; it deletes, upserts, filters, and searches dense, keyword and hybrid.

The storage engine under `indexes.store.FaissVectorStore` (the LlamaIndex vector store), and
what a query opens: it imports nothing of LlamaIndex, whose package costs ~1 s of a cold
`htp-index query` (its ``__init__`` imports every index, engine and storage class). Nodes
arrive as LlamaIndex nodes (`add`) and leave as `NodeRow`s (`retrieve`) or nodes
(`get_nodes`, converted on the way out); filters are LlamaIndex ``MetadataFilters``.

* every node gets a stable int64 FAISS id from a persisted counter, never reused;
* adding a node whose node_id exists replaces it (upsert); `delete` removes a document's
  nodes, `delete_nodes` removes nodes by id or filter, and removed vectors are never returned;
* `retrieve` honours ``MetadataFilters`` in every mode (inside the FAISS search, an ``IDSelector``);
* text, metadata and relationships are stored with the vectors;
* `persist` commits a new version and switches ``CURRENT`` atomically.

Storage (see `indexes.segments`, `indexes.persist`, `indexes.merge_policy`): a version is a
manifest naming immutable segments and per-segment tombstones. Added rows wait in memory
(`indexes.live.PendingRows`) until a flush writes them as a new segment (every
``flush_rows`` rows, and at persist); deletes tombstone rows of sealed segments; a commit
writes only the new segments, the changed tombstone files and a manifest, so its cost follows
the change, not the index. Opening maps the segments instead of loading them; queries fan out
over the segments and merge their top-k. Merges (`compact`, and after a persist when the
policy asks) rewrite neighbouring segments into one and drop deleted rows.

Any number of processes may read an index. Writers commit one at a time; a store whose
changes were made against a version that another writer has since replaced gets
`IndexConflictError` from `persist`, and nothing is written. All methods are thread-safe (one
re-entrant lock: queries from an HTTP server may run while another thread adds).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import faiss
import numpy as np

from . import ann, doclog, fusion, gpu, keywords, kinds, legacy, persist, segments
from .correction import VectorCorrection
from .docstore import NodeRow
from .errors import (
    EncoderMismatchError,
    HtpIndexError,
    IndexCorruptedError,
    IndexExistsError,
    IndexTrainingError,
)
from .live import LiveSegment, PendingRows
from .merge_policy import MergePolicy, SegmentSize
from .spec import (
    IndexParams,
    IndexSpec,
    Manifest,
    Metric,
    NamedFile,
    canonical_encoder,
    same_encoder,
)

if TYPE_CHECKING:  # LlamaIndex's types, imported by callers that use them: a query needs none
    from llama_index.core.schema import BaseNode
    from llama_index.core.vector_stores.types import MetadataFilters

logger = logging.getLogger(__name__)

_FILTER_CACHE_SIZE = 64
_SEARCH_KNOBS = ("nprobe", "ef_search", "k_factor")
SearchMode = Literal["dense", "sparse", "hybrid"]
SEARCH_MODES: tuple[str, ...] = ("dense", "sparse", "hybrid")
FLUSH_ROWS = 50_000
"""Rows held in memory before they are written as a segment: bounds a large ingest's memory."""

Hit = tuple[str, float]

#: The hash recorded for a document some of whose nodes `delete_nodes` removed: it matches no
#: content, so the next ingest of its source replaces the document whole (or deletes it).
NODES_DELETED_HASH = "nodes-deleted"


#: Opens of the live version tried while commits keep replacing it.
OPEN_ATTEMPTS = 3


def is_count(value: Any, least: int) -> bool:
    """Whether ``value`` is a whole number (a numpy one too, never a bool) of at least ``least``."""
    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value >= least


class SegmentStore:
    """Segments of FAISS vectors, node rows and keyword postings; see the module docstring."""

    def __init__(
        self,
        *,
        root: Path,
        spec: IndexSpec,
        encoder: dict[str, Any],
        placement: gpu.Placement,
        manifest: Manifest | None = None,
        base: int | None = None,
        keep_versions: int = 3,
        correction: VectorCorrection | None = None,
        merge_policy: MergePolicy | None = None,
        flush_rows: int | None = None,
    ) -> None:
        """Internal: use `create` or `open`."""
        self._lock = threading.RLock()
        self._segments: list[LiveSegment] = []
        self._docs_files: list[NamedFile] = []
        self._docs: dict[str, str] | None = None
        self._docs_set: dict[str, str] = {}
        self._docs_deleted: set[str] = set()
        self._docs_reset = False
        self._replace_live = False
        self._filter_cache: dict[str, np.ndarray] = {}
        self._root = root
        self._spec = spec
        self._encoder = dict(encoder)
        self._placement = placement
        self._pending = PendingRows(spec, placement)
        self._manifest = manifest
        self._version = manifest.version if manifest else 0
        self._base = base
        self._next_id = manifest.next_id if manifest else 0
        self._keep_versions = keep_versions
        self._dirty = manifest is None
        self._correction = correction
        self._splitting = dict(manifest.splitting) if manifest is not None and manifest.splitting else None
        self._encoder_check = manifest.encoder_check if manifest is not None else None
        self._correction_kind = manifest.correction_kind if manifest is not None else None
        self._policy = merge_policy or MergePolicy()
        flush_rows = FLUSH_ROWS if flush_rows is None else flush_rows
        if flush_rows < 1:
            raise ValueError("flush_rows must be at least 1")
        self._flush_rows = flush_rows

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dim: int,
        encoder: dict[str, Any],
        metric: Metric = "ip",
        index_kind: str = "auto",
        params: IndexParams | dict[str, Any] | None = None,
        use_gpu: gpu.UseGpu = "auto",
        gpus: gpu.GpuSelection = None,
        gpu_shard: bool = False,
        keep_versions: int = 3,
        overwrite: bool = False,
        persist_now: bool = True,
        merge_policy: MergePolicy | None = None,
        flush_rows: int | None = None,
        replaces: int | None = None,
    ) -> Self:
        """A new, empty store bound to `path`, persisted at once as version 1.

        Persisting the empty version immediately means the directory is always openable and
        records its encoder from the start. With ``overwrite=True`` an existing index is
        replaced by a new empty version (older versions are kept per `keep_versions`).
        ``overwrite=True, persist_now=False`` stages a replacement: the live version keeps
        serving until this store's first :meth:`persist` switches to it (used by rebuild).
        ``replaces`` is then the live version the replacement was made from: if another writer
        commits before the switch (a program writing through the API takes no lock), the
        switch raises `IndexConflictError` instead of dropping that change without a word.
        """
        root = Path(path)
        if persist.exists(root) and not overwrite:
            raise IndexExistsError.at(root)
        if replaces is not None and (persist_now or not overwrite):
            raise ValueError("replaces names the version a staged replacement was made from: "
                             "it needs overwrite=True and persist_now=False")
        if not isinstance(encoder, dict):
            raise TypeError("encoder must be a dict describing the encoder (model, method, ...)")
        json.dumps(encoder)  # fail now, not at persist, on something JSON cannot hold
        if not isinstance(params, IndexParams):
            params = IndexParams.model_validate(params or {})
        spec = IndexSpec(dim=dim, metric=metric, index_kind=index_kind, params=params)
        kinds.validate_spec(spec)
        store = cls(
            root=root,
            spec=spec,
            encoder=encoder,
            placement=gpu.choose_placement(use_gpu, gpus, gpu_shard),
            keep_versions=keep_versions,
            merge_policy=merge_policy,
            flush_rows=flush_rows,
        )
        store._replace_live = replaces is None
        store._base = replaces
        store._docs_reset = True
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
        merge_policy: MergePolicy | None = None,
        flush_rows: int | None = None,
    ) -> Self:
        """Open the live version (or `version`) without loading it.

        Checks the manifest's own checksum and every named file's size (``verify`` hashes
        every byte); maps vectors, ids and postings; reads node rows only for what a call
        returns. Segments already open in this process are shared, not opened twice. Raises
        `EncoderMismatchError` when `expected_encoder` differs from the manifest's encoder.
        An index of the format-1 layout is loaded whole and rewritten as segments by the next
        persist (`migrate`). Opening the live version retries when a commit moved it and
        collected the files of the one being opened (that is not damage).
        """
        root = Path(path)
        options = {"expected_encoder": expected_encoder, "use_gpu": use_gpu, "gpus": gpus,
                   "gpu_shard": gpu_shard, "keep_versions": keep_versions, "merge_policy": merge_policy,
                   "flush_rows": flush_rows}
        for attempt in range(OPEN_ATTEMPTS):
            live = persist.current_version(root) if version is None else version
            try:
                return cls._open_version(root, live, **options)
            except IndexCorruptedError:
                if version is not None or attempt == OPEN_ATTEMPTS - 1 or persist.current_version(root) == live:
                    raise
                logger.info("version %s of %s was replaced while it opened; opening the live one", live, root)
        raise AssertionError("unreachable")

    @classmethod
    def _open_version(
        cls,
        root: Path,
        version: int | None,
        *,
        expected_encoder: dict[str, Any] | None,
        use_gpu: gpu.UseGpu,
        gpus: gpu.GpuSelection,
        gpu_shard: bool,
        keep_versions: int,
        merge_policy: MergePolicy | None,
        flush_rows: int | None,
    ) -> Self:
        manifest = persist.read_manifest(root, version)
        if expected_encoder is not None and not same_encoder(expected_encoder, manifest.encoder):
            raise EncoderMismatchError.between(root, manifest.encoder, expected_encoder)
        placement = gpu.choose_placement(use_gpu, gpus, gpu_shard)
        vdir = persist.version_dir(root, manifest.version)
        store = cls(
            root=root,
            spec=manifest.spec,
            encoder=manifest.encoder,
            placement=placement,
            manifest=manifest,
            # Changes are made against the version read: if it is not (or no longer) the live
            # one when they are persisted, that is a conflict, never a silent roll-back of the
            # versions committed after it.
            base=manifest.version,
            keep_versions=keep_versions,
            correction=read_correction(vdir, manifest),
            merge_policy=merge_policy,
            flush_rows=flush_rows,
        )
        if manifest.format_version < 2:
            store._load_format1(vdir, manifest)
            return store
        for record in manifest.segments:
            reader = segments.open_segment(root, record, manifest.spec)
            deleted = None
            if record.deletes is not None:
                persist.check_file(root / record.deletes.path, record.deletes)
                deleted = segments.read_deletes(root / record.deletes.path, record.deleted)
            store._segments.append(
                LiveSegment.of(
                    reader, manifest.spec, placement, deleted=deleted, deletes_file=record.deletes
                )
            )
        for entry in manifest.docs:
            segments.check_sizes(root, {entry.path: entry})
        store._docs_files = list(manifest.docs)
        return store

    def _load_format1(self, vdir: Path, manifest: Manifest) -> None:
        loaded = legacy.load_version(vdir, manifest)
        logger.warning(
            "the index at %s is in the format of htp-index before segments (a full copy per "
            "version); it is served as is and rewritten into segments at the next write "
            "(`htp-index migrate --index %s` does it now)",
            self._root,
            self._root,
        )
        if len(loaded.ids):
            self._pending.add(loaded.ids, loaded.vectors, loaded.rows)
        self._next_id = max(self._next_id, loaded.next_id)
        self._docs = dict(loaded.docs)
        self._docs_reset = True
        self._replace_live = True
        self._dirty = True

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

    @staticmethod
    def manifest_stamp(path: str | Path, version: int) -> tuple[int, int] | None:
        """Which file a version's manifest is; see `persist.manifest_stamp`."""
        return persist.manifest_stamp(path, version)

    @staticmethod
    def verify(path: str | Path, version: int | None = None) -> dict[str, int]:
        """Read and hash every file of the live version (or `version`); see `persist.verify`."""
        return persist.verify(path, version)

    def persist(
        self, persist_path: str | None = None, fs: Any = None, *, force: bool = False
    ) -> int:
        """Commit a new version and make it live; returns its number.

        Nothing is written when nothing changed since the last persist (unless `force`).
        Pending rows are written as a segment, the merge policy's merges run, and the commit
        writes only what is new (see `indexes.persist.commit`).

        `persist_path` is what LlamaIndex's ``StorageContext.persist(persist_dir)`` passes. The
        index itself always lives in its own directory (versions and segments cannot be
        copied into a JSON file), so at `persist_path` the store writes a small pointer naming
        the index directory and version; `from_persist_path` opens the index from it.
        """
        with self._lock:
            version = self._commit(force=force)
            if persist_path is not None:
                self._write_pointer(Path(persist_path), version)
            return version

    def restore(self, over: int | None = None) -> int:
        """Make the version this store opened live again (a roll-back): commits a new version
        equal to it, with this store's changes if any; returns its number. The versions after
        it stay on disk as ``keep_versions`` allows.

        The one way to write over versions committed after the one opened: a plain
        :meth:`persist` of changes made against an older version raises `IndexConflictError`
        rather than dropping those versions silently. ``over`` is the live version the caller
        decided to roll back: a version committed after it raises `IndexConflictError` too (a
        change acknowledged while the restore ran was dropped without a word); None rolls back
        whatever is live.
        """
        with self._lock:
            before = self._replace_live, self._base
            self._replace_live, self._base = (True, self._base) if over is None else (False, over)
            try:
                return self._commit(force=True)
            except BaseException:
                self._replace_live, self._base = before
                raise

    @classmethod
    def from_persist_path(cls, persist_path: str | Path, **open_kwargs: Any) -> Self:
        """Open the index a pointer written by ``persist(persist_path)`` names."""
        path = Path(persist_path)
        try:
            pointer = json.loads(path.read_text(encoding="utf-8"))
            root = pointer["htp_index"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HtpIndexError(
                f"{path} is not a pointer to an htp-index index ({exc}); open the index "
                f"directory itself with {cls.__name__}.open(PATH)"
            ) from exc
        return cls.open(root, **open_kwargs)

    def _write_pointer(self, path: Path, version: int) -> None:
        if path.resolve() == self._root.resolve() or self._root.resolve() in path.resolve().parents:
            return  # inside the index itself: nothing to point at
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"htp_index": str(self._root.resolve()), "version": version}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(body), encoding="utf-8")
        tmp.rename(path)

    def _commit(self, *, force: bool) -> int:
        with self._lock:
            if not (self._dirty or force):
                return self._version
            self._flush()
            self._merge(self._policy.select(self._sizes()))
            waiting = self._policy.deferred(self._sizes())
            if waiting:
                logger.warning(
                    "%s: %d merge(s) of more than %d rows are due; they do not run inside a "
                    "commit: run `htp-index compact --index %s` (queries visit %d segments)",
                    self._root, len(waiting), self._policy.max_inline_rows, self._root,
                    len(self._segments),
                )
            publish = [(s.staging, s.name) for s in self._segments if s.staging is not None]
            manifest = persist.commit(
                self._root,
                publish=publish,
                build=self._build_manifest,
                correction_text=(
                    None if self._correction is None else self._correction.model_dump_json()
                ),
                keep_versions=self._keep_versions,
                expected_live=None if self._replace_live else self._base,
            )
            for segment in self._segments:
                if segment.staging is not None:
                    segments.register_published(
                        segment.reader, segments.segments_dir(self._root) / segment.name
                    )
                    segment.staging = None
                segment.changed = False
            self._docs_files = list(manifest.docs)
            if self._docs is not None:
                self._docs = self._merged_docs()
            self._docs_set, self._docs_deleted, self._docs_reset = {}, set(), False
            self._manifest = manifest
            self._version = self._base = manifest.version
            self._replace_live = False
            self._dirty = False
            return self._version

    def upgrade_encoder(self, encoder: dict[str, Any]) -> None:
        """Record ``encoder`` as this index's encoder from the next commit on, for a record the
        caller has established describes the same vectors in more detail (an older, coarser
        model fingerprint). Writes nothing by itself: the next write carries it."""
        json.dumps(encoder)
        with self._lock:
            if not same_encoder(encoder, self._encoder):
                logger.info("%s: the encoder record is upgraded at the next write", self._root)
                self._encoder = dict(encoder)

    def migrate(self) -> int:
        """Write an index of the format-1 layout as segments now (otherwise at the next write)."""
        with self._lock:
            return self.persist(force=True)

    def _build_manifest(self, version: int) -> Manifest:
        records = []
        for segment in self._segments:
            if segment.changed:
                path = segments.write_deletes(self._root, segment.name, version, segment.deleted)
                record = persist.file_record(path)
                segment.deletes_file = NamedFile(
                    path=path.relative_to(self._root).as_posix(),
                    sha256=record.sha256,
                    bytes=record.bytes,
                )
            records.append(segment.record())
        structures = sorted({r.structure for r in records}) or [segments.describe_kind(self._spec)]
        return Manifest(
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            encoder=self._encoder,
            dim=self._spec.dim,
            metric=self._spec.metric,
            index_kind=self._spec.index_kind,
            index_structure=" | ".join(structures),
            trained=all(r.trained for r in records),
            trained_on=0,
            count=sum(r.live for r in records),
            next_id=self._next_id,
            tombstones=sum(r.deleted for r in records),
            params=self._spec.params,
            segments=records,
            docs=self._docs_log(version),
            splitting=self._splitting,
            encoder_check=self._encoder_check,
            correction_kind=self._correction_kind,
            faiss_version=faiss.__version__,
        )

    def _docs_log(self, version: int) -> list[NamedFile]:
        """The docs log the new version names: unchanged, plus a delta, or a new base."""
        if not (self._docs_set or self._docs_deleted or self._docs_reset):
            return list(self._docs_files)
        if self._docs_reset or len(self._docs_files) >= doclog.MAX_DELTAS:
            base = doclog.write_entry(
                self._root, version, base=True, set_=self._merged_docs(), delete=[]
            )
            return [base]
        delta = doclog.write_entry(
            self._root,
            version,
            base=False,
            set_=dict(self._docs_set),
            delete=sorted(self._docs_deleted),
        )
        return [*self._docs_files, delta]

    # ------------------------------------------------------------ properties

    @property
    def client(self) -> Any:
        """The FAISS index of the rows not yet written as a segment (each segment has its own)."""
        return self._pending.vectors.index

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
            return self._live_rows()

    def _live_rows(self) -> int:
        """Live rows, pending ones included (caller locks)."""
        return self._pending.count + sum(s.live for s in self._segments)

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
        """Where unfiltered searches run: ``cpu``, ``gpu:0``…, or ``gpu:0+cpu`` when some
        segments are of a kind the GPU cannot search."""
        with self._lock:
            views = [s.view for s in self._segments if s.view is not None]
            if self._pending.count or not views:
                views.append(self._pending.vectors)
            places = {v.placement.describe() for v in views}
        return "+".join(sorted(places, key=lambda p: p == "cpu"))

    @property
    def dirty(self) -> bool:
        """Whether there are changes not yet persisted."""
        return self._dirty

    @property
    def next_id(self) -> int:
        """The FAISS id the next added node will get."""
        return self._next_id

    @property
    def segment_count(self) -> int:
        """Sealed segments (written or committed) this store searches, besides pending rows."""
        return len(self._segments)

    def segment_summary(self) -> list[dict[str, Any]]:
        """One line per segment: name, rows, deleted rows, structure (for ``info``)."""
        with self._lock:
            return [
                {
                    "name": s.name,
                    "rows": s.reader.record.rows,
                    "deleted": len(s.deleted),
                    "structure": s.reader.record.structure,
                }
                for s in self._segments
            ]

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"{type(self).__name__}(path='{self._root}', version={self._version}, "
                f"count={self.count}, segments={len(self._segments)}, dim={self._spec.dim}, "
                f"metric='{self._spec.metric}', kind='{self._spec.index_kind}', "
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
            self._check_trainable(len(unique))
            if self._correction is not None and not corrected:
                x = self._correction.documents(x)
            ids = np.arange(self._next_id, self._next_id + len(unique), dtype=np.int64)
            rows = [NodeRow.from_node(node, int(i)) for node, i in zip(unique, ids, strict=True)]
            replaced = self._faiss_ids_of([n.node_id for n in unique])
            self._remove(replaced)
            self._pending.add(ids, x, rows)
            self._next_id += len(unique)
            self._touch()
            if self._pending.count >= self._flush_rows:
                self._flush()
        return [node.node_id for node in nodes]

    def _check_trainable(self, adding: int) -> None:
        """``train_fallback='raise'``: refuse an add that leaves a kind needing training with
        fewer vectors than it trains on, before anything changes."""
        spec = self._spec
        if spec.params.train_fallback != "raise" or not kinds.needs_training(spec):
            return
        total = self.count + adding
        floor = kinds.min_train_vectors(spec)
        if total < floor:
            raise IndexTrainingError.too_few(spec.index_kind, floor, total)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of source document `ref_doc_id`, and its recorded hash."""
        with self._lock:
            ids = [self._pending.nodes.faiss_ids_for_ref_doc(ref_doc_id)]
            for segment in self._segments:
                with segment.reader.rows_lock:
                    found = segment.reader.rows.faiss_ids_for_ref_doc(ref_doc_id)
                ids.append(found)
            self._remove(np.asarray([i for part in ids for i in part], dtype=np.int64))
            self._docs_set.pop(ref_doc_id, None)
            self._docs_deleted.add(ref_doc_id)
            if self._docs is not None:
                self._docs.pop(ref_doc_id, None)
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
                touched = {row.ref_doc_id for row in self._rows(ids).values() if row.ref_doc_id}
                self._remove(ids)
                hashes = self._merged_docs()
                for ref_doc_id in touched & hashes.keys():
                    # Its recorded hash still matched the source, so every later ingest took
                    # the document as unchanged and never put the deleted nodes back
                    self.set_doc_hash(ref_doc_id, NODES_DELETED_HASH)
                self._touch()

    def discard_uncommitted(self) -> None:
        """Remove the segment folders this store wrote and never committed, for a writer that
        gives up (a failed ingest or rebuild): a failed commit puts its segments back into
        their staging folders so that a caller may retry, but a command that exits left them
        until some later commit, and on a full disk they held the room its retry needed. The
        store is not to be used afterwards."""
        with self._lock:
            for segment in self._segments:
                if segment.staging is not None and not segment.staging.is_dir():
                    segment.staging = None  # renamed into segments/ by a commit that then failed: kept
                _discard_staging(segment)
            self._pending.reset()

    def clear(self) -> None:
        """Delete every node and document hash (ids already given out stay used)."""
        with self._lock:
            self._pending.reset()
            self._segments = []
            self._docs = {}
            self._docs_set, self._docs_deleted, self._docs_reset = {}, set(), True
            self._touch()

    def _remove(self, faiss_ids: np.ndarray) -> None:
        """Delete ids wherever they are: dropped from pending rows, tombstoned in segments."""
        faiss_ids = np.asarray(faiss_ids, dtype=np.int64)
        if len(faiss_ids) == 0:
            return
        self._pending.remove(faiss_ids)
        for segment in self._segments:
            segment.delete(faiss_ids)
        emptied = [s for s in self._segments if s.live == 0]
        for segment in emptied:
            _discard_staging(segment)
        self._segments = [s for s in self._segments if s.live > 0]

    def train(self) -> None:
        """Write pending rows and merge every segment, so a kind that needs training (IVF, PQ)
        is trained on as many vectors as the merge limit allows; IndexTrainingError if too few."""
        with self._lock:
            if kinds.needs_training(self._spec) and self.count < kinds.min_train_vectors(self._spec):
                raise IndexTrainingError.too_few(
                    self._spec.index_kind, kinds.min_train_vectors(self._spec), self.count
                )
            self.compact(everything=True)

    def optimize(self, *, force: bool = False) -> str | None:
        """Run due merges now (every segment with `force`); returns what was done, if anything."""
        with self._lock:
            merged = self.compact(everything=force)
            return f"merged {merged} group(s) of segments" if merged else None

    def compact(self, *, everything: bool = False) -> int:
        """Write pending rows as a segment and run every merge the policy has due, including
        those too big to run inside a commit (all neighbours up to the size limit, dropping
        every deleted row, with ``everything``); returns the number of merges. The next
        :meth:`persist` commits the result."""
        with self._lock:
            self._flush()
            sizes = self._sizes()
            plan = self._policy.select_all(sizes) if everything else self._policy.due(sizes)
            self._merge(plan)
            if plan:
                self._touch()
            return len(plan)

    def _sizes(self) -> list[SegmentSize]:
        index_rows = self._live_rows()
        return [
            SegmentSize(
                rows=s.reader.record.rows, deleted=len(s.deleted),
                outgrown=(faiss.try_extract_index_ivf(s.reader.index) is None
                          and ann.wants_ivf(self._spec, s.live, index_rows)),
            )
            for s in self._segments
        ]

    def _flush(self) -> None:
        """Write pending rows as a new (staged) segment."""
        if self._pending.count == 0:
            return
        index_rows = self._live_rows()
        ids, x, rows = self._pending.take()
        written = segments.write_segment(
            self._root, self._spec, ids, x, rows, shared_centroids=self._shared_centroids(),
            index_rows=index_rows,
        )
        self._segments.append(
            LiveSegment.of(written.reader, self._spec, self._placement, staging=written.staging)
        )
        self._pending.reset()
        self._dirty = True

    def _shared_centroids(self) -> np.ndarray | None:
        """The index's IVF quantizer: the centroids of its largest IVF segment (kind auto)."""
        best = None
        for segment in self._segments:
            if faiss.try_extract_index_ivf(segment.reader.index) is not None and (
                best is None or segment.reader.record.rows > best.reader.record.rows
            ):
                best = segment
        return None if best is None else ann.centroids_of(best.reader.index)

    def _merge(self, plan: list[list[int]]) -> None:
        """Replace each group of neighbouring segments by one segment of their live rows."""
        if not plan:
            return
        merged: dict[int, LiveSegment] = {}
        dropped: set[int] = set()
        try:
            self._merge_groups(plan, merged, dropped)
        except BaseException:
            for segment in merged.values():  # written for this merge, never to be committed
                _discard_staging(segment)
            raise
        kept: list[LiveSegment] = []
        for i, segment in enumerate(self._segments):
            if i in merged:
                kept.append(merged[i])
            elif i not in dropped:
                kept.append(segment)
            if i in dropped:
                _discard_staging(segment)
        self._segments = kept
        self._dirty = True

    def _merge_groups(self, plan: list[list[int]], merged: dict[int, LiveSegment], dropped: set[int]) -> None:
        """Write each group's merged segment into ``merged`` (by its first position)."""
        for group in plan:
            parts = [self._segments[i] for i in group]
            for part in parts:
                if part.staging is None:  # committed: checked before being copied (staged ones were just written)
                    persist.check_segment_files(part.reader.folder, part.reader.record.files)
            ids = np.concatenate([p.live_ids() for p in parts])
            dropped.update(group)
            if len(ids) == 0:
                continue
            keyword_parts = [(p.reader.keywords, p.reader.positions(p.live_ids())) for p in parts]
            written = segments.write_segment(
                self._root,
                self._spec,
                ids,
                LiveVectors(parts),
                _live_rows(parts),
                keyword_parts=keyword_parts,
                shared_centroids=self._shared_centroids(),
                row_files=[(p.reader.folder / segments.ROWS_FILE, p.deleted) for p in parts],
                index_rows=self._live_rows(),
            )
            merged[group[0]] = LiveSegment.of(
                written.reader, self._spec, self._placement, staging=written.staging
            )
            logger.info(
                "merged %d segment(s) of %s into %s (%d rows)",
                len(group),
                self._root,
                written.record.name,
                len(ids),
            )

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

    def retrieve(
        self,
        mode: SearchMode,
        k: int,
        *,
        embedding: np.ndarray | Sequence[float] | None = None,
        text: str | None = None,
        filters: MetadataFilters | None = None,
        node_ids: Sequence[str] | None = None,
        doc_ids: Sequence[str] | None = None,
        alpha: float | None = None,
        sparse_k: int | None = None,
        fusion_method: str = fusion.DEFAULT_FUSION,
        **knobs: Any,
    ) -> list[tuple[NodeRow, float]]:
        """The top-``k`` rows and their scores for one query, honouring filters, node ids and
        document ids in every mode; the search every query path runs (LlamaIndex's ``query``
        included), without LlamaIndex objects.

        Modes: ``dense`` searches ``embedding``; ``sparse`` runs BM25 keyword search for
        ``text``; ``hybrid`` does both and fuses them (see `indexes.fusion`): ``alpha`` weighs
        the dense side (1 = dense only, None = the tuned default), ``sparse_k`` keyword
        candidates fused (default ``fusion.CANDIDATES``; a larger ``k`` searches deeper, but
        what ranks above the windows stays as it is), ``fusion_method`` ``convex`` or
        ``rrf``. Dense similarities are inner products for ``ip`` and ``1 / (1 + squared L2
        distance)`` for ``l2``, keyword scores are BM25, hybrid scores the fused value in
        [0, 1]; higher is better everywhere. ``knobs``: ``nprobe``, ``ef_search``, ``k_factor``.
        """
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
        if not is_count(k, 0):
            # hybrid slices its fused list with k: a negative k returned all but the last hits
            raise ValueError(f"k must be a whole number >= 0, not {k!r}")
        if sparse_k is not None and not is_count(sparse_k, 1):
            # a negative one searched no keywords (hybrid was dense alone), 0 meant the default
            raise ValueError(f"sparse_k must be a whole number >= 1 (or None: the default), not {sparse_k!r}")
        unknown = set(knobs) - set(_SEARCH_KNOBS)
        if unknown:
            raise TypeError(f"unknown search options {sorted(unknown)}; use {', '.join(_SEARCH_KNOBS)}")
        if mode != "dense" and (text is None or not text.strip()):
            raise ValueError(f"{mode} search needs the query text")
        if mode != "sparse" and embedding is None:
            raise ValueError(f"{mode} search needs the query embedding")
        with self._lock:
            allowed = self._select(filters, node_ids=node_ids, doc_ids=doc_ids)  # [] allows nothing, as in LlamaIndex
            if mode == "dense":
                hits = self._dense_hits(np.asarray([embedding], dtype=np.float32), k, allowed, knobs)[0]
            elif mode == "sparse":
                hits = self._keyword_hits(text or "", k, allowed)
            else:
                # each side is fused within its window (see `indexes.fusion`); a deeper list,
                # for a k past the window, extends the ranking below it
                depth = max(k, fusion.CANDIDATES)
                sparse_window = int(sparse_k or fusion.CANDIDATES)
                dense = self._dense_hits(np.asarray([embedding], dtype=np.float32), depth, allowed, knobs)[0]
                sparse_hits = self._keyword_hits(text or "", max(sparse_window, int(k)), allowed)
                hits = fusion.fuse(dense, sparse_hits, method=fusion_method, alpha=alpha,
                                   sparse_window=sparse_window)[:k]
            rows = self._rows([faiss_id for faiss_id, _ in hits])
        return [(rows[i], score) for i, score in hits if i in rows]

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

    @property
    def splitting(self) -> dict[str, int] | None:
        """How the pipeline that fills this index splits documents into nodes, as it recorded
        (None: not recorded). The store keeps it from version to version; it does not use it."""
        return None if self._splitting is None else dict(self._splitting)

    def record_splitting(self, splitting: dict[str, int]) -> None:
        """Record how documents were split into this index's nodes (the next persist writes it)."""
        with self._lock:
            if splitting != self._splitting:
                self._splitting = dict(splitting)
                self._dirty = True

    @property
    def encoder_check(self) -> dict[str, Any] | None:
        """What the encoder that built this index gave for a few fixed texts, as the pipeline
        recorded it (None: not recorded). Kept from version to version; the store does not read it."""
        return self._encoder_check

    def record_encoder_check(self, check: dict[str, Any] | None) -> None:
        """Record the encoder check the next persist writes (None: drop it)."""
        with self._lock:
            if check != self._encoder_check:
                self._encoder_check = check
                self._dirty = True

    @property
    def correction_kind(self) -> str | None:
        """The vector correction the pipeline chose for this index ('none' included), as it
        recorded it (None: not recorded). Kept from version to version; the store does not read it."""
        return self._correction_kind

    def record_correction_kind(self, kind: str | None) -> None:
        """Record the correction kind the next persist writes (None: drop it)."""
        with self._lock:
            if kind != self._correction_kind:
                self._correction_kind = kind
                self._dirty = True

    def set_correction(self, correction: VectorCorrection | None) -> None:
        """Use ``correction`` from now on; only while the store is empty, since vectors already
        stored were corrected (or not) with the statistics they were added under."""
        with self._lock:
            if self.count:
                raise ValueError(
                    f"the index at {self._root} already holds {self.count} vectors; its "
                    "correction is frozen until `htp-index rebuild` fits a new one"
                )
            if correction is not None and correction.dim != self._spec.dim:
                raise ValueError(f"correction is {correction.dim}-d, the index {self._spec.dim}-d")
            self._correction = correction
            self._touch()

    @property
    def has_sparse(self) -> bool:
        """Whether keyword (BM25) and hybrid search are available: always, since every segment
        carries its postings (indexes of the first layout get them when they are opened)."""
        return True

    @property
    def query_modes(self) -> list[str]:
        """The query modes this index serves."""
        return ["dense", "sparse", "hybrid"]

    def keyword_rows(self) -> int:
        """Live rows of the keyword side; equals `count` when both sides are in step."""
        with self._lock:
            total = self._pending.keywords()[0].rows
            for segment in self._segments:
                if segment.reader.keywords.rows != segment.reader.record.rows:
                    raise IndexCorruptedError.for_file(
                        segment.reader.folder,
                        f"its keyword postings hold {segment.reader.keywords.rows} rows, "
                        f"its vectors {segment.reader.record.rows}",
                    )
                total += segment.live
            return total

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
            found = self._rows(sorted({i for row in hits for i, _ in row}))
        return [[(found[i].node_id, score) for i, score in row if i in found] for row in hits]

    def _dense_hits(
        self, xq: np.ndarray, k: int, allowed: np.ndarray | None, knobs: dict[str, Any]
    ) -> list[list[tuple[int, float]]]:
        """(faiss id, similarity) of the top-`k` vectors for each query row (caller locks):
        each segment and the pending rows are searched, and their top-k merged."""
        if xq.ndim != 2 or xq.shape[1] != self._spec.dim:
            raise ValueError(
                f"query embedding has shape {tuple(xq.shape)}; the index at {self._root} holds "
                f"{self._spec.dim}-dimensional vectors"
            )
        if not np.isfinite(xq).all():
            # FAISS ranks nothing against NaN: dense answered [] and hybrid keyword hits alone
            raise ValueError("query embedding has NaN or infinite values")
        # FAISS and the merge size their results by k: a k of 10**9 over 65 rows asked for
        # gigabytes (MemoryError, or the process killed) where it means "every row"
        k = min(int(k), self._live_rows())  # int: FAISS's SWIG wrapper refuses numpy integers
        if k <= 0:
            return [[] for _ in range(len(xq))]
        if self._correction is not None:
            xq = self._correction.queries(xq)
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        if self._pending.count:
            parts.append(self._pending.search(xq, k, allowed, knobs))
        for segment in self._segments:
            subset = None if allowed is None else segment.live_ids(allowed, ascending=True)
            if subset is not None and len(subset) == 0:
                continue
            assert segment.view is not None
            parts.append(segment.view.search(xq, k, subset, **knobs))
        scores, ids = merge_top_k(parts, k, len(xq), larger_is_better=self._spec.metric == "ip")
        similarities = self._similarities(scores)
        return [
            list(zip(irow[irow >= 0].tolist(), srow[irow >= 0].tolist(), strict=True))
            for srow, irow in zip(similarities, ids, strict=True)
        ]

    def _keyword_hits(self, text: str, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        """(faiss id, BM25) of the top-`k` rows for ``text`` over every segment and pending row,
        with statistics over all of them (caller locks)."""
        pending_kw, pending_ids = self._pending.keywords()
        parts = [pending_kw] + [s.reader.keywords for s in self._segments]
        pending_mask = None if allowed is None else np.isin(pending_ids, allowed)
        masks = [pending_mask] + [s.keyword_mask(allowed) for s in self._segments]
        id_maps = [pending_ids] + [s.reader.ids for s in self._segments]
        deleted = [None] + [s.keyword_tombstones() for s in self._segments]
        return [
            (int(id_maps[part][row]), score)
            for part, row, score in keywords.search(parts, masks, text, k, id_maps, deleted)
        ]

    def _similarities(self, scores: np.ndarray) -> np.ndarray:
        """FAISS's scores as similarities, in float64 (a hybrid query converts 100 per segment:
        one array operation rather than a Python call each)."""
        scores = scores.astype(np.float64)
        return scores if self._spec.metric == "ip" else 1.0 / (1.0 + np.maximum(scores, 0.0))

    def _select(
        self,
        filters: MetadataFilters | None,
        *,
        node_ids: Sequence[str] | None = None,
        doc_ids: Sequence[str] | None = None,
    ) -> np.ndarray | None:
        """Allowed faiss ids (ascending), or None when nothing restricts the search."""
        if filters is not None:
            from .filters import require_metadata_filters

            require_metadata_filters(filters)
            if not filters.filters:
                filters = None
        if filters is None and node_ids is None and doc_ids is None:
            return None
        # LlamaIndex's filter types are imported when there is something to filter
        from .filters import compile_filters, filters_key

        where, params = compile_filters(filters) if filters is not None else ("1", [])
        key = filters_key(where, params) if node_ids is None and doc_ids is None else None
        if key is not None and key in self._filter_cache:
            return self._filter_cache[key]
        parts = [
            self._pending.nodes.select_faiss_ids(
                where, params, node_ids=node_ids, ref_doc_ids=doc_ids
            )
        ]
        for segment in self._segments:
            # each segment's answer to a metadata filter is kept by its reader for every later
            # version (at 500k nodes a new filter, or the first after a write, scanned them all)
            found = segment.reader.select(where, params, key=key, node_ids=node_ids, ref_doc_ids=doc_ids)
            parts.append(segment.live_ids(found, ascending=True) if len(segment.deleted) else found)
        ids = np.sort(np.concatenate(parts))
        if key is not None:
            if len(self._filter_cache) >= _FILTER_CACHE_SIZE:
                self._filter_cache.clear()
            self._filter_cache[key] = ids
        return ids

    def _rows(self, faiss_ids: Sequence[int]) -> dict[int, NodeRow]:
        """Rows of the live ids among ``faiss_ids``, read from where each one lives."""
        if len(faiss_ids) == 0:
            return {}
        wanted = np.asarray(list(faiss_ids), dtype=np.int64)
        found = self._pending.nodes.rows(wanted.tolist())
        for segment in self._segments:
            found.update(segment.rows(wanted))
        return found

    def _faiss_ids_of(self, node_ids: Sequence[str]) -> np.ndarray:
        return np.fromiter(self._faiss_ids_by_node(node_ids).values(), dtype=np.int64)

    def _faiss_ids_by_node(self, node_ids: Sequence[str]) -> dict[str, int]:
        found = self._pending.nodes.faiss_ids_for_nodes(node_ids)
        for segment in self._segments:
            with segment.reader.rows_lock:
                held = segment.reader.rows.faiss_ids_for_nodes(node_ids)
            if held and len(segment.deleted):
                live = set(segment.live_ids(np.fromiter(held.values(), np.int64)).tolist())
                held = {n: i for n, i in held.items() if i in live}
            found.update(held)
        return found

    def get_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
    ) -> list[BaseNode]:
        """Nodes by id (in the order given), by filter, or all of them."""
        with self._lock:
            if filters is None and node_ids is not None:
                by_node = self._faiss_ids_by_node(node_ids)
                rows = self._rows(list(by_node.values()))
                ordered = [rows[by_node[n]] for n in node_ids if n in by_node and by_node[n] in rows]
            else:
                ids = self._select(filters, node_ids=node_ids)
                ids = self._all_ids() if ids is None else ids
                rows = self._rows(ids.tolist())
                ordered = [rows[int(i)] for i in ids if int(i) in rows]
        return [row.to_node() for row in ordered]

    def _all_ids(self) -> np.ndarray:
        parts = [self._pending.vectors.live_ids()] + [s.live_ids() for s in self._segments]
        return np.sort(np.concatenate(parts))

    def all_nodes(self) -> list[BaseNode]:
        """Every node (text, metadata, relationships; no embedding), in id order."""
        return self.get_nodes()

    def iter_embeddings(self, batch_size: int = 1024) -> Iterator[tuple[str, np.ndarray]]:
        """Every (node_id, vector) pair, segment by segment in id order, for rebuilds and
        diagnostics; vectors are read from the segments, a batch at a time.

        Vectors are reconstructed from the index: exact for the named kinds, approximate for
        factory strings that keep only compressed codes.
        """
        for row, vector in self._iter_rows_with_vectors(batch_size):
            yield row.node_id, vector

    def iter_nodes_with_embeddings(self, batch_size: int = 1024) -> Iterator[tuple[BaseNode, np.ndarray]]:
        """Every (node, vector) pair in the order of `iter_embeddings`, read a batch at a time
        (a rebuild from stored vectors never holds the index whole)."""
        for row, vector in self._iter_rows_with_vectors(batch_size):
            yield row.to_node(), vector

    def iter_nodes(self, batch_size: int = 1024) -> Iterator[BaseNode]:
        """Every node (no embedding) in the order of `iter_embeddings`, read a batch at a time
        and without reading any vector (what a pass over the documents needs)."""
        for row, _ in self._iter_rows_with_vectors(batch_size, vectors=False):
            yield row.to_node()

    def _iter_rows_with_vectors(self, batch_size: int, *, vectors: bool = True) -> Iterator[tuple[NodeRow, np.ndarray | None]]:
        """Live rows with their vectors (None each with ``vectors`` False: none is read)."""
        with self._lock:
            sources: list[Any] = [*self._segments, self._pending]
        for source in sources:
            if isinstance(source, LiveSegment):
                ids = source.live_ids()
                reconstruct = source.reader.reconstruct
            else:
                with self._lock:
                    ids = np.sort(source.vectors.live_ids())
                reconstruct = source.vectors.reconstruct
            for start in range(0, len(ids), batch_size):
                block = ids[start : start + batch_size]
                with self._lock:
                    rows = self._rows(block.tolist())
                    read = reconstruct(block) if vectors else [None] * len(block)
                for faiss_id, vector in zip(block, read, strict=True):
                    row = rows.get(int(faiss_id))
                    if row is not None:
                        yield row, vector

    # ---------------------------------------------------- document bookkeeping

    def set_doc_hash(self, ref_doc_id: str, doc_hash: str) -> None:
        """Record the content hash of a source document (for ingestion diffs)."""
        with self._lock:
            self._docs_set[ref_doc_id] = doc_hash
            self._docs_deleted.discard(ref_doc_id)
            if self._docs is not None:
                self._docs[ref_doc_id] = doc_hash
            self._dirty = True

    def doc_hashes(self) -> dict[str, str]:
        """ref_doc_id -> hash of every recorded source document (read from the docs log on
        first use: queries never need it)."""
        with self._lock:
            return dict(self._merged_docs())

    def _merged_docs(self) -> dict[str, str]:
        if self._docs is None:
            base = {} if self._docs_reset else doclog.replay(self._root, self._docs_files)
            for doc_id in self._docs_deleted:
                base.pop(doc_id, None)
            base.update(self._docs_set)
            self._docs = base
        return self._docs

    def get_doc_hash(self, ref_doc_id: str) -> str | None:
        """The recorded hash of one source document."""
        return self.doc_hashes().get(ref_doc_id)

    def faiss_ids(self, node_ids: Sequence[str]) -> dict[str, int]:
        """node_id -> stable FAISS id, for the given nodes that exist."""
        with self._lock:
            return self._faiss_ids_by_node(node_ids)

    def ref_doc_node_ids(self, ref_doc_id: str) -> list[str]:
        """Node ids of one source document, in id order."""
        with self._lock:
            found: list[tuple[int, str]] = []
            for segment in self._segments:
                with segment.reader.rows_lock:
                    ids = segment.reader.rows.faiss_ids_for_ref_doc(ref_doc_id)
                live = set(segment.live_ids(np.asarray(ids, np.int64)).tolist()) if ids else set()
                rows = self._rows(sorted(live))
                found.extend((i, rows[i].node_id) for i in live if i in rows)
            pending = self._pending.nodes.faiss_ids_for_ref_doc(ref_doc_id)
            rows = self._pending.nodes.rows(pending)
            found.extend((i, rows[i].node_id) for i in pending if i in rows)
            return [node_id for _, node_id in sorted(found)]


def merge_top_k(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, nq: int, *, larger_is_better: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several (scores, ids) results per query row; missing results are -1.

    Equal scores are ordered by id, oldest first (``docs/storage.md``): a top-k is then the
    start of any larger top-k, and the order does not hang on which part (pending rows, a
    segment) holds a row, nor on FAISS, which returns a segment's tied hits newest first.
    A flat segment's part holds its oldest tied rows (FAISS keeps the first of equal scores
    it meets, scanning in id order).

    In numpy rather than ``faiss.ResultHeap``: its heap operations open an OpenMP parallel
    region per call, which cost 15 ms per single-query search on a busy 2-core machine."""
    if not parts:
        return np.zeros((nq, k), np.float32), np.full((nq, k), -1, np.int64)
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    worst = -np.inf if larger_is_better else np.inf
    keyed = np.where(ids >= 0, scores, worst)
    order = np.lexsort((ids, -keyed if larger_is_better else keyed), axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    return top_scores, top_ids


#: Vectors a merge reads from a segment at a time (16k x 640-d floats: 40 MiB).
MERGE_READ_ROWS = 16_384


class LiveVectors:
    """The vectors of ``parts``' live rows in id order, read part by part when the segment
    writer indexes them (`indexes.ann.VectorSource`): a merge never holds them all in one array
    beside the FAISS index they go into."""

    def __init__(self, parts: Sequence[LiveSegment]):
        self._parts = list(parts)
        self._ids = [part.live_ids() for part in self._parts]
        self._starts = np.cumsum([0, *(len(ids) for ids in self._ids)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for part, ids in zip(self._parts, self._ids, strict=True):
            for start in range(0, len(ids), MERGE_READ_ROWS):
                run = ids[start : start + MERGE_READ_ROWS]
                yield run, part.reader.reconstruct(run)

    def take(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self._parts[0].reader.index.d), dtype=np.float32)
        which = np.searchsorted(self._starts, positions, side="right") - 1
        for i, (part, ids) in enumerate(zip(self._parts, self._ids, strict=True)):
            mine = np.flatnonzero(which == i)
            if len(mine):
                out[mine] = part.reader.reconstruct(ids[positions[mine] - self._starts[i]])
        return out


def _live_rows(parts: Sequence[LiveSegment]) -> Iterator[NodeRow]:
    """The rows of ``parts`` that are not deleted, in id order, streamed from their files."""
    for part in parts:
        dead = set(part.deleted.tolist())
        for row in part.reader.rows.iter_rows(lock=part.reader.rows_lock):
            if row.faiss_id not in dead:
                yield row


def _discard_staging(segment: LiveSegment) -> None:
    """Remove a segment this store wrote but will not commit (merged away or emptied).

    Its open files stay readable through the reader until it is dropped; a committed segment
    is left alone: it goes when no kept version names it."""
    if segment.staging is None:
        return
    for path in segment.staging.iterdir():
        path.unlink(missing_ok=True)
    segment.staging.rmdir()
    segment.staging = None


def read_correction(vdir: Path, manifest: Manifest) -> VectorCorrection | None:
    """The version's correction (format 2: listed in the manifest; format 1: in ``files``); a
    missing, unreadable or changed file is `IndexCorruptedError` naming it (opening and `info`
    both)."""
    listed = manifest.correction is not None or persist.CORRECTION_NAME in manifest.files
    if not listed:
        return None
    path = vdir / persist.CORRECTION_NAME
    record = manifest.correction or manifest.files[persist.CORRECTION_NAME]
    # Applied to every query, and copied into each later version: a changed digit would shift
    # every answer without a word and pass `verify` once copied (~2 MB at most: a few ms).
    persist.check_file(path, record)
    try:
        return VectorCorrection.load(path)
    except FileNotFoundError as exc:
        raise IndexCorruptedError.for_file(path, "the file is missing") from exc
    except ValueError as exc:
        raise IndexCorruptedError.for_file(path, f"invalid ({exc})") from exc
