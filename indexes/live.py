"""What a writer or reader holds of an index: its segments with their tombstones, and the rows
added since the last flush.

* `LiveSegment`: one sealed segment (`indexes.segments.SegmentReader`, shared by the whole
  process) plus what *this* version says of it: the ids it deleted, the file those were
  written to, and whether the segment is still in its staging folder (flushed, not committed).
* `PendingRows`: rows added but not yet written as a segment, held in memory the way Qdrant
  and Milvus hold their growing segment: exact (flat) vectors, rows in an in-memory SQLite,
  keyword postings analysed when a keyword query first needs them.

Both answer the same questions (which ids do you hold, search them, give me these rows), so
the store can fan a query out over them without caring which is which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import gpu, keywords
from .docstore import NodeRow, NodeStore
from .segments import SegmentReader
from .spec import IndexSpec, NamedFile, SegmentRecord
from .vectors import VectorIndex, members


@dataclass
class LiveSegment:
    """A sealed segment as one version sees it."""

    reader: SegmentReader
    deleted: np.ndarray
    deletes_file: NamedFile | None = None
    changed: bool = False
    staging: Path | None = None
    view: VectorIndex | None = None
    _kw_mask: np.ndarray | None = field(default=None, repr=False)
    _kw_dead: keywords.Tombstones | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        reader: SegmentReader,
        spec: IndexSpec,
        placement: gpu.Placement | None,
        *,
        deleted: np.ndarray | None = None,
        deletes_file: NamedFile | None = None,
        staging: Path | None = None,
    ) -> LiveSegment:
        """Wrap ``reader`` with this version's tombstones."""
        dead = np.empty(0, np.int64) if deleted is None else np.asarray(deleted, np.int64)
        segment = cls(reader, dead, deletes_file=deletes_file, staging=staging)
        segment.view = reader.vectors(spec, dead, placement)
        return segment

    @property
    def name(self) -> str:
        """The segment's folder name."""
        return self.reader.name

    @property
    def live(self) -> int:
        """Rows this version serves from the segment."""
        return self.reader.record.rows - len(self.deleted)

    def delete(self, faiss_ids: np.ndarray) -> int:
        """Tombstone those of ``faiss_ids`` the segment holds; returns how many were live."""
        held = np.unique(self.reader.holds(faiss_ids))
        if len(held) == 0:
            return 0
        # Binary search in the sorted tombstones, and one insertion: np.setdiff1d and union1d
        # re-sorted every tombstone of the segment at each call, so deleting D documents one
        # by one (as ingest does) cost ~D x the tombstones held (37,495 deletions at 500k
        # nodes: 115 s, the last 5,000 four times slower than the first).
        at = np.searchsorted(self.deleted, held)
        known = at < len(self.deleted)
        known[known] = self.deleted[at[known]] == held[known]
        fresh = held[~known]
        if len(fresh) == 0:
            return 0
        self.deleted = np.insert(self.deleted, at[~known], fresh)
        self.changed = True
        self._kw_mask = self._kw_dead = None
        assert self.view is not None
        self.view._dead.update(int(i) for i in fresh)
        self.view._dead_arr = None
        self.view._replica_stale = True
        return len(fresh)

    def live_ids(self, candidates: np.ndarray | None = None, *, ascending: bool = False) -> np.ndarray:
        """The segment's live ids (or those of ``candidates`` it holds and has not deleted;
        ``ascending``: they are sorted, so only their part in the segment's id range is read)."""
        if candidates is None:
            ids = np.asarray(self.reader.ids)
        else:
            ids = self.reader.holds(self.reader.within(candidates) if ascending else candidates)
        if len(self.deleted):
            ids = ids[~members(self.deleted, ids)]
        return ids

    def keyword_mask(self, allowed: np.ndarray | None) -> np.ndarray | None:
        """Rows a keyword query may return: not deleted, and in ``allowed`` (ascending) when
        given."""
        if allowed is None:
            if not len(self.deleted):
                return None
            if self._kw_mask is None:  # the rows the statistics' tombstones leave
                self._kw_mask = ~self.keyword_tombstones().dead
            return self._kw_mask
        mask = np.zeros(self.reader.record.rows, dtype=bool)
        mask[self.reader.positions(self.reader.within(allowed))] = True
        if len(self.deleted):
            mask &= ~self.keyword_tombstones().dead
        return mask

    def keyword_tombstones(self) -> keywords.Tombstones | None:
        """The deleted rows as the keyword statistics leave them out (None: none deleted)."""
        if not len(self.deleted):
            return None
        if self._kw_dead is None:
            self._kw_dead = keywords.Tombstones(self.reader.keywords, self.reader.positions(self.deleted))
        return self._kw_dead

    def record(self) -> SegmentRecord:
        """The manifest entry of the segment in the version being committed."""
        return self.reader.record.model_copy(
            update={"deletes": self.deletes_file, "deleted": len(self.deleted)}
        )

    def rows(self, faiss_ids: np.ndarray) -> dict[int, NodeRow]:
        """Rows of those of ``faiss_ids`` this segment serves."""
        ids = self.live_ids(faiss_ids)
        if len(ids) == 0:
            return {}
        with self.reader.rows_lock:
            return self.reader.rows.rows(ids.tolist())


class PendingRows:
    """Rows added since the last flush: exact vectors and rows in memory."""

    def __init__(self, spec: IndexSpec, placement: gpu.Placement | None) -> None:
        self.spec = IndexSpec(dim=spec.dim, metric=spec.metric, index_kind="flat")
        self.vectors = VectorIndex.empty(self.spec, placement)
        self.nodes = NodeStore.in_memory()
        self._keywords: tuple[keywords.KeywordSegment, np.ndarray] | None = None

    @property
    def count(self) -> int:
        """Rows held."""
        return self.vectors.count

    def add(self, ids: np.ndarray, x: np.ndarray, rows: list[NodeRow]) -> None:
        """Hold new rows (ids above every id held anywhere)."""
        self.vectors.add(ids, x)
        self.nodes.replace(rows)
        self._keywords = None

    def remove(self, faiss_ids: np.ndarray) -> int:
        """Drop those of ``faiss_ids`` held here; returns how many."""
        held = self.nodes.rows(np.asarray(faiss_ids).tolist())
        if not held:
            return 0
        ids = np.fromiter(held, dtype=np.int64, count=len(held))
        self.vectors.remove(ids)
        self.nodes.delete_faiss_ids(ids.tolist())
        self._keywords = None
        return len(ids)

    def keywords(self) -> tuple[keywords.KeywordSegment, np.ndarray]:
        """The held rows' keyword postings (analysed on first need) and their ids by row."""
        if self._keywords is None:
            rows = list(self.nodes.iter_rows())
            ids = np.fromiter((r.faiss_id for r in rows), dtype=np.int64, count=len(rows))
            self._keywords = (keywords.KeywordSegment.from_texts([r.text for r in rows]), ids)
        return self._keywords

    def take(self) -> tuple[np.ndarray, np.ndarray, list[NodeRow]]:
        """Everything held, in id order (ids, vectors, rows), for writing a segment."""
        rows = list(self.nodes.iter_rows())
        ids = np.fromiter((r.faiss_id for r in rows), dtype=np.int64, count=len(rows))
        return ids, self.vectors.reconstruct(ids), rows

    def reset(self) -> None:
        """Forget every row (after a flush wrote them, or a clear)."""
        self.vectors.reset()
        self.nodes.clear()
        self._keywords = None

    def search(self, xq: np.ndarray, k: int, allowed: np.ndarray | None, knobs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of the held rows."""
        if allowed is not None:
            allowed = np.asarray(allowed, np.int64)
            allowed = allowed[np.isin(allowed, self.vectors.live_ids())]
            if len(allowed) == 0:
                return self.vectors._empty(len(xq), k)
        return self.vectors.search(xq, k, allowed)
