"""Immutable segments: the unit an index version is made of.

A segment is a folder under ``segments/`` holding a range of nodes, written once and never
changed (like a Lucene segment)::

    segments/seg-000000001200-3f9a1c2e/
      ids.npy          # int64 faiss ids, ascending: row i of every file below is ids[i]
      vectors.faiss    # the vectors, IndexIDMap2 over the index kind (FAISS native format)
      nodes.sqlite     # text, metadata and relationships of each row (see `indexes.docstore`)
      kw.*             # the keyword postings of the rows (see `indexes.keywords`)
      del-v000009.npy  # rows deleted as of version 9 (tombstones; one file per change)

Versions name segments in their manifest (`indexes.spec.SegmentRecord`) with the files'
sizes and sha256, computed here once, when they are written. Opening checks sizes only and
maps the files: FAISS reads flat codes in place (``IO_FLAG_MMAP_IFC``), ids and postings are
``np.load(mmap_mode="r")``, rows are read from SQLite per hit. A process keeps one reader per
segment (`open_segment`), so a service that switches to a version sharing most segments with
the old one opens only the new ones.

A segment is written into a staging folder (``.tmp-<pid>@<host>~…``) and published into
``segments/`` under the commit lock, just before the manifest that names it (`indexes.persist`).
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import secrets
import shutil
import socket
import sqlite3
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import ann, gpu, heap, keywords, kinds
from .docstore import NodeRow, NodeStore
from .durable import fsync_path, make_shared_dir
from .errors import UNREADABLE_ARRAY, IndexCorruptedError, SystemLimitError, system_limit
from .spec import FileRecord, IndexSpec, SegmentRecord
from .vectors import VectorIndex

logger = logging.getLogger(__name__)

SEGMENTS_DIR = "segments"
IDS_FILE = "ids.npy"
VECTORS_FILE = "vectors.faiss"
ROWS_FILE = "nodes.sqlite"
DELETES_PREFIX = "del-"
TMP_PREFIX = ".tmp-"


def segments_dir(root: Path) -> Path:
    """Where the segments of the index at ``root`` live."""
    return Path(root) / SEGMENTS_DIR


def staging_prefix() -> str:
    """Prefix of this process's staging folders: the pid and host let a later writer tell a
    crashed writer's leftovers (pid gone) from another writer's work in progress."""
    return f"{TMP_PREFIX}{os.getpid()}@{socket.gethostname()}~"


@dataclass
class WrittenSegment:
    """A segment written into its staging folder, not yet named by any version."""

    staging: Path
    record: SegmentRecord
    reader: SegmentReader


def write_segment(
    root: Path,
    spec: IndexSpec,
    ids: np.ndarray,
    vectors: np.ndarray | ann.VectorSource,
    rows: Iterable[NodeRow],
    *,
    texts: Sequence[str] | None = None,
    keyword_parts: Sequence[tuple[keywords.KeywordSegment, np.ndarray]] | None = None,
    shared_centroids: np.ndarray | None = None,
    row_files: Sequence[tuple[Path, np.ndarray]] | None = None,
    index_rows: int = 0,
) -> WrittenSegment:
    """Write one segment of ``rows`` (ascending ``ids``, one vector each) into a staging folder.

    Keyword postings come from ``texts`` (analysed here) or, for a merge, from the postings
    of the merged segments (``keyword_parts``: segment and kept local rows, in id order).
    A merge also names the merged segments' rows files and their deleted ids (``row_files``):
    SQLite copies those rows, and ``rows`` is read only when a file is gone.
    The vectors are indexed last, and may come part by part (a merge's live rows,
    `indexes.ann.VectorSource`), so the keyword merge's memory, the vectors and their FAISS
    index are never all held at once: compacting 9 segments of 180k rows peaked at 2.1 GiB of
    anonymous memory with all three held, 1.2 GiB in this order.
    A large segment of kind ``auto`` (or a middling one in a large index: ``index_rows``, the
    live rows of the index it joins, its own included) becomes IVF, reusing
    ``shared_centroids`` (the index's quantizer) when given (see `indexes.ann.wants_ivf`).
    Every file is fsynced and checksummed now: nobody hashes it again until ``verify``.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("a segment needs at least one id")
    _check_vector_count(ids, vectors)
    if np.any(np.diff(ids) <= 0):
        raise ValueError("segment ids must be strictly ascending")
    base = segments_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    staging = make_shared_dir(base, staging_prefix())
    try:
        record = _write_files(
            staging, spec, ids, vectors, rows, texts, keyword_parts, shared_centroids, row_files, index_rows
        )
        reader = SegmentReader.open(staging, record, spec)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)  # a failed write leaves nothing behind
        if staging.exists():  # out of file descriptors, rmtree cannot list it: once they are freed
            atexit.register(shutil.rmtree, staging, True)
        if isinstance(exc, OSError | sqlite3.OperationalError):
            raise _write_failure(root, exc) from exc
        raise
    return WrittenSegment(staging=staging, record=record, reader=reader)


def _write_failure(root: Path, exc: BaseException) -> OSError:
    """A failed segment write said with the index it was for and what to do: SQLite's bare
    "disk I/O error" and a write's "[Errno 28]" named neither, and running out of file
    descriptors came out as "could not read" a temporary folder."""
    cause = exc.__cause__ if isinstance(exc, SystemLimitError) and exc.__cause__ is not None else exc
    limit = system_limit(cause) or (str(exc) if isinstance(exc, SystemLimitError) else None)
    if limit is not None:
        return SystemLimitError(f"could not write a segment of the index at {root}: {limit}. Nothing was "
                                "committed; the index is not damaged")
    code = getattr(cause, "errno", None) or errno.EIO
    room = code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO)
    failure = OSError(f"could not write a segment of the index at {root} ({getattr(cause, 'strerror', None) or cause})"
                      + (". Is the disk full, or a file-size limit (ulimit -f) set?" if room else "")
                      + " Nothing was committed.")
    failure.errno = code
    return failure


def _check_vector_count(ids: np.ndarray, vectors: np.ndarray | ann.VectorSource) -> None:
    if len(ids) != len(vectors):
        raise ValueError(f"a segment needs one vector per id ({len(ids)} ids, {len(vectors)} vectors)")


def _write_vectors(
    staging: Path, spec: IndexSpec, ids: np.ndarray, vectors: np.ndarray | ann.VectorSource,
    shared_centroids: np.ndarray | None, index_rows: int,
) -> tuple[str, bool]:
    """Index ``vectors`` and write the FAISS file; returns the index's structure and whether it
    is trained. Nothing of it stays in memory: the reader maps or loads the file, and after an
    IVF build the freed lists go back to the system."""
    source = ann.ArrayVectors(ids, vectors) if isinstance(vectors, np.ndarray) else vectors
    if ann.wants_ivf(spec, len(ids), index_rows):
        structure = _write_ivf(staging / VECTORS_FILE, spec, source, shared_centroids)
        heap.release_free_memory()
        return structure, True
    # Small segments stay exact until a merge makes them big enough (or the index large enough).
    index = VectorIndex.empty(segment_spec(spec))
    index.add(ids, ann.gather(source, spec.dim))
    faiss.write_index(index.index, str(staging / VECTORS_FILE))
    return index.structure, index.trained


def _write_ivf(path: Path, spec: IndexSpec, source: ann.VectorSource, shared_centroids: np.ndarray | None) -> str:
    """Build the IVF index of ``source``, write it to ``path`` and return its structure (the
    index is freed when this returns)."""
    ivf, _ = ann.build_ivf(spec, source, shared_centroids)
    faiss.write_index(ivf, str(path))
    return kinds.describe(ivf)


def _write_files(
    staging: Path,
    spec: IndexSpec,
    ids: np.ndarray,
    vectors: np.ndarray | ann.VectorSource,
    rows: Iterable[NodeRow],
    texts: Sequence[str] | None,
    keyword_parts: Sequence[tuple[keywords.KeywordSegment, np.ndarray]] | None,
    shared_centroids: np.ndarray | None,
    row_files: Sequence[tuple[Path, np.ndarray]] | None = None,
    index_rows: int = 0,
) -> SegmentRecord:
    name = f"seg-{int(ids[0]):012d}-{secrets.token_hex(4)}"
    with open(staging / IDS_FILE, "wb") as fh:
        np.save(fh, ids)
    written: list[str] = []

    def counted(source: Iterable[NodeRow]) -> Iterator[NodeRow]:
        for row in source:
            if len(written) >= len(ids) or row.faiss_id != ids[len(written)]:
                raise ValueError(f"row {row.node_id!r} is out of step with the segment's ids")
            written.append(row.text if keyword_parts is None and texts is None else "")
            yield row

    copied = None
    if row_files is not None:
        if keyword_parts is None:
            raise ValueError("rows are copied from files only in a merge (with keyword_parts)")
        copied = NodeStore.copy_files(staging / ROWS_FILE, row_files)
    if copied is not None:
        if not np.array_equal(copied, ids):
            raise ValueError(f"the copied rows ({len(copied)}) are out of step with the segment's {len(ids)} ids")
    else:
        NodeStore.write_file(staging / ROWS_FILE, counted(rows))
        if len(written) != len(ids):
            raise ValueError(f"a segment needs one row per id ({len(ids)} ids, {len(written)} rows)")
    if keyword_parts is not None:
        keywords.merge_keyword_indexes(staging, keyword_parts)
    else:
        keywords.write_keyword_index(staging, list(texts) if texts is not None else written)
    written.clear()  # the texts were only for the keyword index
    structure, trained = _write_vectors(staging, spec, ids, vectors, shared_centroids, index_rows)
    names = [IDS_FILE, VECTORS_FILE, ROWS_FILE, *keywords.KEYWORD_FILES]
    for file_name in (VECTORS_FILE, IDS_FILE):
        fsync_path(staging / file_name)
    fsync_path(staging)
    from .persist import file_record  # persist imports this module

    record = SegmentRecord(
        name=name,
        rows=len(ids),
        min_id=int(ids[0]),
        max_id=int(ids[-1]),
        structure=structure,
        trained=trained,
        files={n: file_record(staging / n) for n in names},
    )
    return record


class SegmentReader:
    """The files of one segment, opened in place and shared by every store of this process.

    Read-only and thread-safe for searches; per-version state (tombstones, GPU replicas) lives
    in the store's `LiveSegment`, never here.
    """

    def __init__(
        self,
        folder: Path,
        record: SegmentRecord,
        index: faiss.Index,
        ids: np.ndarray,
        rows: NodeStore,
        kw: keywords.KeywordSegment,
    ) -> None:
        self.folder = folder
        self.record = record
        self.index = index
        self.ids = ids
        self.rows = rows
        self.keywords = kw
        self.rows_lock = threading.Lock()
        # metadata filter -> matching ids: the segment never changes, so an answer holds for
        # every version that names it (a store's own cache is emptied by each write)
        self._selected: OrderedDict[str, np.ndarray] = OrderedDict()
        self._selected_ids = 0
        # A sqlite3 connection that has run a statement sits in a reference cycle (its statement
        # cache), so only a full garbage collection closed it: a service that switched versions
        # for hours kept a handle on every segment it had served, deleted files included, and
        # compaction gave no disk space back. Closed as soon as the last version lets go.
        weakref.finalize(self, rows.close)

    @property
    def name(self) -> str:
        """The segment's folder name."""
        return self.record.name

    @classmethod
    def open(cls, folder: Path, record: SegmentRecord, spec: IndexSpec) -> SegmentReader:
        """Open the segment at ``folder``: checks the files' sizes, maps, loads nothing whole."""
        check_sizes(folder, record.files)
        path = folder / VECTORS_FILE
        try:
            try:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
            except RuntimeError:  # kinds whose codes FAISS cannot map are read whole
                index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexCorruptedError.unreadable(path, f"FAISS cannot read it ({_last_line(exc)})", exc) from exc
        if index.d != spec.dim:
            raise IndexCorruptedError.for_file(path, f"it holds {index.d}-d vectors, not {spec.dim}-d")
        try:
            ids = np.load(folder / IDS_FILE, mmap_mode="r")
        except UNREADABLE_ARRAY as exc:
            raise IndexCorruptedError.unreadable(folder / IDS_FILE, f"unreadable ({exc})", exc) from exc
        if len(ids) != record.rows or index.ntotal != record.rows:
            raise IndexCorruptedError.for_file(
                folder, f"it holds {len(ids)} ids and {index.ntotal} vectors, the manifest {record.rows}"
            )
        try:
            kw = keywords.KeywordSegment.open(folder)
        except UNREADABLE_ARRAY as exc:
            raise IndexCorruptedError.unreadable(folder, f"its keyword postings are unreadable ({exc})", exc) from exc
        rows = NodeStore.open_readonly(folder / ROWS_FILE)
        return cls(folder, record, index, ids, rows, kw)

    def vectors(self, spec: IndexSpec, deleted: np.ndarray, placement: gpu.Placement | None) -> VectorIndex:
        """A searchable view of the vectors with ``deleted`` ids masked (the index is shared)."""
        return VectorIndex(
            spec, self.index, trained=self.record.trained, tombstones=deleted, placement=placement
        )

    def select(self, where: str, params: Sequence[Any], *, key: str | None = None,
               node_ids: Sequence[str] | None = None, ref_doc_ids: Sequence[str] | None = None) -> np.ndarray:
        """Ascending faiss ids of this segment's rows matching a compiled filter (deleted rows
        included: tombstones belong to a version). With ``key`` (the filter's, without id
        restrictions) the answer is kept, within ``SELECTED_IDS_PER_ROW`` ids per row of the
        segment, least recently used first out."""
        with self.rows_lock:
            if key is not None and key in self._selected:
                self._selected.move_to_end(key)
                return self._selected[key]
            found = self.rows.select_faiss_ids(where, params, node_ids=node_ids, ref_doc_ids=ref_doc_ids)
            if key is not None:
                found.setflags(write=False)
                self._selected[key] = found
                self._selected_ids += len(found)
                budget = SELECTED_IDS_PER_ROW * max(self.record.rows, 1)
                while len(self._selected) > 1 and (self._selected_ids > budget or len(self._selected) > SELECTED_KEYS):
                    _, dropped = self._selected.popitem(last=False)
                    self._selected_ids -= len(dropped)
            return found

    def within(self, ascending: np.ndarray) -> np.ndarray:
        """The part of ``ascending`` (sorted ids) inside this segment's id range: two binary
        searches, where a mask over all of them cost O(all) in every segment."""
        lo, hi = np.searchsorted(ascending, (self.record.min_id, self.record.max_id + 1))
        return ascending[lo:hi]

    def positions(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Local rows of those of ``faiss_ids`` this segment holds."""
        faiss_ids = np.asarray(faiss_ids, dtype=np.int64)
        if len(faiss_ids) == 0:
            return np.empty(0, dtype=np.int64)
        pos = np.searchsorted(self.ids, faiss_ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        return pos[self.ids[pos] == faiss_ids]

    def holds(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Those of ``faiss_ids`` (any order) this segment holds."""
        faiss_ids = np.asarray(faiss_ids, dtype=np.int64)
        if len(faiss_ids) == 0:
            return faiss_ids
        inside = faiss_ids[(faiss_ids >= self.record.min_id) & (faiss_ids <= self.record.max_id)]
        if len(inside) == 0:
            return inside
        pos = np.minimum(np.searchsorted(self.ids, inside), len(self.ids) - 1)
        return inside[self.ids[pos] == inside]

    def reconstruct(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``faiss_ids`` (which this segment holds)."""
        faiss_ids = np.ascontiguousarray(faiss_ids, dtype=np.int64)
        if len(faiss_ids) == 0:
            return np.empty((0, self.index.d), dtype=np.float32)
        return self.index.reconstruct_batch(faiss_ids)


#: Metadata-filter answers a segment reader keeps: ids per row of the segment (8 bytes each)
#: and filters at most.
SELECTED_IDS_PER_ROW = 4
SELECTED_KEYS = 256

_READERS: weakref.WeakValueDictionary[str, SegmentReader] = weakref.WeakValueDictionary()
_READERS_LOCK = threading.Lock()


def open_segment(root: Path, record: SegmentRecord, spec: IndexSpec) -> SegmentReader:
    """The process's reader of segment ``record`` of the index at ``root`` (opened once)."""
    folder = segments_dir(root) / record.name
    check_sizes(folder, record.files)  # even when held open: the files on disk must be whole
    key = _reader_key(folder)
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is not None and reader.record.files == record.files:
            return reader
    reader = SegmentReader.open(folder, record, spec)
    with _READERS_LOCK:
        _READERS[key] = reader
    return reader


def register_published(reader: SegmentReader, folder: Path) -> None:
    """Remember a reader whose staging folder was just published at ``folder``."""
    reader.folder = folder
    with _READERS_LOCK:
        _READERS[_reader_key(folder)] = reader


def _reader_key(folder: Path) -> str:
    try:
        inode = (folder / IDS_FILE).stat().st_ino
    except OSError:
        inode = 0
    return f"{folder.resolve()}#{inode}"


def check_sizes(folder: Path, files: dict[str, FileRecord]) -> None:
    """Raise `IndexCorruptedError` naming the first listed file that is missing or resized."""
    for file_name, record in sorted(files.items()):
        path = folder / file_name
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise IndexCorruptedError.for_file(path, "the file is missing") from exc
        if size != record.bytes:
            raise IndexCorruptedError.for_file(
                path, f"it has {size} bytes but the manifest recorded {record.bytes} (truncated?)"
            )


def write_deletes(root: Path, segment: str, version: int, deleted: np.ndarray) -> Path:
    """Write a segment's tombstones for ``version`` (sorted int64 ids) durably; returns the path.

    Written to a temporary name and renamed, so a reader never sees a partial file.
    """
    folder = segments_dir(root) / segment
    final = folder / f"{DELETES_PREFIX}v{version:06d}.npy"
    tmp = folder / f".{final.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(np.sort(deleted), dtype=np.int64))
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, final)
    fsync_path(folder)  # the new name must reach the disk before a manifest names it
    return final


def read_deletes(path: Path, expected: int) -> np.ndarray:
    """Tombstones written by `write_deletes`; raises `IndexCorruptedError` when unreadable."""
    try:
        ids = np.load(path)
    except UNREADABLE_ARRAY as exc:
        raise IndexCorruptedError.unreadable(path, f"unreadable ({exc})", exc) from exc
    if ids.dtype != np.int64 or ids.ndim != 1 or len(ids) != expected:
        raise IndexCorruptedError.for_file(path, f"it should hold {expected} int64 ids")
    return ids


def segment_spec(spec: IndexSpec) -> IndexSpec:
    """The spec segments are built with: a kind that needs training falls back to exact search
    in segments too small to train it (the store enforces ``train_fallback='raise'`` itself)."""
    if spec.params.train_fallback == "exact":
        return spec
    params = spec.params.model_copy(update={"train_fallback": "exact"})
    return spec.model_copy(update={"params": params})


def describe_kind(spec: IndexSpec) -> str:
    """The structure a segment of ``spec`` gets (for manifests of empty versions)."""
    return kinds.describe(VectorIndex.empty(spec).index)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
