"""Which segments to merge: a log-structured policy in the spirit of Lucene's merge policies.

Every commit adds a small segment, so without merges an index that takes ten documents a
minute would soon hold thousands of tiny segments, and every query would visit each. The
policy groups segments into *levels* by live rows (level L holds ``floor * factor**L`` rows
or fewer) and merges a run of ``segments_per_level`` neighbouring segments of one level into
one segment of the next. Each row is therefore rewritten about once per level (log of the
index size, amortised), and no level holds more than ``segments_per_level - 1`` segments in a
row. Only neighbours merge (as Lucene's ``LogMergePolicy`` and tantivy's do), which keeps the
rows of every segment in ascending id order. A segment whose deleted rows exceed
``max_deleted_fraction`` is rewritten alone to reclaim them (Lucene's ``deletesPctAllowed``),
and so is one the index has outgrown (written exact while the index was small, see
``SegmentSize.outgrown``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SegmentSize:
    """What the policy needs to know of a segment."""

    rows: int
    deleted: int
    outgrown: bool = False
    """Written exact (flat) while the index was small, and now a size the index writes as IVF
    (`indexes.ann.wants_ivf`): rewritten alone, once, like a segment with many deleted rows."""

    @property
    def live(self) -> int:
        """Rows a merge would keep."""
        return self.rows - self.deleted


@dataclass(frozen=True)
class MergePolicy:
    """Levels, fan-in and limits; the defaults keep a 1M-row index at a few dozen segments."""

    segments_per_level: int = 10
    floor_rows: int = 2_000
    factor: int = 10
    max_merged_rows: int = 2_000_000
    max_inline_rows: int = 250_000
    max_deleted_fraction: float = 0.2

    def level(self, segment: SegmentSize) -> int:
        """The level of a segment by its live rows."""
        rows = max(segment.live, self.floor_rows)
        return math.ceil(math.log(rows / self.floor_rows, self.factor) - 1e-9)

    def select(self, segments: Sequence[SegmentSize]) -> list[list[int]]:
        """Runs of neighbouring segment positions to merge, each into one segment (disjoint):
        those a commit runs inline, each writing at most ``max_inline_rows`` rows, so adding
        ten rows never turns into rewriting a million (`deferred` lists the bigger ones, which
        ``htp-index compact`` runs). A member of a deferred merge that the deleted-rows rule
        asks to rewrite is rewritten alone meanwhile: the deferred merge used to shield it, so
        ten segments of 50,000 rows at 30% deleted kept every deleted row until a compaction."""
        chosen: list[list[int]] = []
        for merge in self.due(segments):
            if self._rows(segments, merge) <= self.max_inline_rows:
                chosen.append(merge)
            elif len(merge) > 1:
                chosen.extend([i] for i in merge
                              if self._rewrite_alone(segments[i]) and segments[i].live <= self.max_inline_rows)
        return sorted(chosen)

    def _rewrite_alone(self, segment: SegmentSize) -> bool:
        """The deleted-rows rule (or an exact segment grown past its kind's size)."""
        return segment.deleted > self.max_deleted_fraction * segment.rows or segment.outgrown

    def deferred(self, segments: Sequence[SegmentSize]) -> list[list[int]]:
        """Merges the policy wants that are too big to run inside a commit."""
        return [m for m in self.due(segments) if self._rows(segments, m) > self.max_inline_rows]

    @staticmethod
    def _rows(segments: Sequence[SegmentSize], merge: list[int]) -> int:
        return sum(segments[i].live for i in merge)

    def due(self, segments: Sequence[SegmentSize]) -> list[list[int]]:
        """Every merge the level rule and the deleted-rows rule ask for (disjoint)."""
        merges: list[list[int]] = []
        taken: set[int] = set()
        position = 0
        while position < len(segments):
            level = self.level(segments[position])
            end = position
            while end < len(segments) and self.level(segments[end]) == level:
                end += 1
            run = list(range(position, end))
            while len(run) >= self.segments_per_level:
                batch = run[: self.segments_per_level]
                if sum(segments[i].live for i in batch) <= self.max_merged_rows:
                    merges.append(batch)
                    taken.update(batch)
                run = run[self.segments_per_level :]
            position = end
        for i, segment in enumerate(segments):
            if i not in taken and self._rewrite_alone(segment):
                merges.append([i])
        return sorted(merges)

    def select_all(self, segments: Sequence[SegmentSize]) -> list[list[int]]:
        """Merge everything (``htp-index compact``): neighbours up to ``max_merged_rows`` each,
        so every deleted row is dropped and the segment count is as small as the limit allows."""
        merges: list[list[int]] = []
        batch: list[int] = []
        rows = 0
        for i, segment in enumerate(segments):
            if batch and rows + segment.live > self.max_merged_rows:
                merges.append(batch)
                batch, rows = [], 0
            batch.append(i)
            rows += segment.live
        if batch:
            merges.append(batch)
        return [m for m in merges if len(m) > 1 or segments[m[0]].deleted or segments[m[0]].outgrown]
