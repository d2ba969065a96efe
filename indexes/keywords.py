"""Keyword (BM25) search over immutable segments, scored exactly as SQLite FTS5 scores.

Why this exists: FTS5's ``ORDER BY bm25`` scores every matching row, so a 12-term OR query
costs time linear in the corpus (1.7 s at 1M documents, ``docs/keyword_engine.md``). Here each
segment stores plain posting arrays (``.npy`` files, memory-mapped on open) and a query is
answered by MaxScore with block-max bounds: only documents that can still enter the top k are
scored in full, so the work follows the rare query terms rather than the corpus size. A
segment that holds few postings of the query's tokens (small segments, rare tokens) is
scanned in one pass instead, which costs less than pruning it (`SCAN_POSTINGS`).

Analysis and scoring are FTS5's own, so quality is unchanged:

* documents are folded as queries are (`indexes.sparse.fold_text`: NFKC, and the format
  characters inside words dropped), then tokenized by SQLite itself (an in-memory FTS5 table
  with tokenizer ``porter unicode61 remove_diacritics 2`` and an ``fts5vocab`` 'instance'
  table), so tokens, term frequencies and document lengths (every token, stop words included)
  are FTS5's over the folded text;
* a query is cut by `query_terms` (as `indexes.sparse` does), each term is tokenized the same
  way, and every resulting token counts once per term that produced it (FTS5 sums over the
  OR'ed phrases). A term the tokenizer splits (``foo_bar``) is a phrase in FTS5; here its
  tokens count as separate terms (the only known difference);
* BM25 is FTS5's ``bm25()``: k1 = 1.2, b = 0.75, idf = ln((N - n + 0.5) / (n + 0.5)) floored
  at 1e-6, avgdl = total tokens / N; returned positive. N, avgdl and n are global over every
  row of every given segment that is not deleted (`Tombstones`), masked by a filter or not, so
  a score never depends on how rows fall into segments, on filters, or on deletions not yet
  merged away. (Lucene's rule, deleted rows counting until merged, made a just-updated document
  score lower than in a fresh index: its old text made its own words look commoner.)

Files of one segment (`KEYWORD_FILES`), all little-endian ``.npy`` but the JSON header:

* ``keywords.json``: format, tokenizer, rows, total tokens, term and posting counts;
* ``kw_terms.npy`` (uint8): the sorted distinct tokens, UTF-8, concatenated;
  ``kw_term_offsets.npy`` (int64, terms + 1): where each token starts in it;
* ``kw_post_offsets.npy`` (int64, terms + 1): each token's slice of the postings;
  ``kw_docs.npy`` (int32): local rows, ascending within a token; ``kw_tfs.npy`` (int32);
* ``kw_doclen.npy`` (int32, rows): tokens per row;
* ``kw_block_offsets.npy`` (int64, terms + 1), ``kw_block_maxtf.npy`` and
  ``kw_block_mindl.npy`` (int32): per block of `BLOCK` postings of a token, the largest tf and
  the smallest document length, which bound the block's BM25 for any avgdl (the term part of
  BM25 rises with tf and falls with length), so bounds stay valid when global statistics move.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sparse import TOKENIZER, fold_text, query_terms

__all__ = [
    "KEYWORD_FILES",
    "KeywordSegment",
    "analyse_query",
    "merge_keyword_indexes",
    "query_terms",
    "search",
    "search_exhaustive",
    "write_keyword_index",
]

FORMAT = 1
K1 = 1.2
B = 0.75
BLOCK = 128
"""Postings per block bound: small enough to skip well, large enough to keep bounds cheap."""
ANALYSE_BATCH = 20_000
"""Documents tokenized per in-memory FTS5 table: bounds the memory of one SQLite round."""
DENSE_ROWS = 262_144
"""Segments up to this many rows gather candidates in a dense accumulator, never a sort."""
SEED_CANDIDATES = 4_096
"""Documents fully scored per segment to seed the top-k threshold before pruning."""
SCAN_POSTINGS = 65_536
"""A segment holding at most this many postings of the query's tokens is scanned (every posting
scored in one pass, `_scan_segment`) instead of pruned by MaxScore. Measured one segment at a
time on an Intel Xeon (``benchmarks/results/segment_search.md``): scanning took 0.3-0.6x
MaxScore's time on 15k-20k-row segments (100-75k postings); on 200k-row segments 0.6-0.9x
below ~106k postings, about even to 165k, and MaxScore wins beyond (scan 1.05-1.75x)."""

META_FILE = "keywords.json"
_ARRAYS = (
    "terms",
    "term_offsets",
    "post_offsets",
    "docs",
    "tfs",
    "doclen",
    "block_offsets",
    "block_maxtf",
    "block_mindl",
)
KEYWORD_FILES: tuple[str, ...] = (META_FILE, *(f"kw_{name}.npy" for name in _ARRAYS))


# ------------------------------------------------------------------------------ analysis


def _clean(text: str) -> str:
    """Text SQLite can bind: lone surrogates (not valid UTF-8) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _fts_connection() -> sqlite3.Connection:
    """An in-memory FTS5 table ``t`` with FTS5's own vocabulary views over it.

    Contentless (the text is not needed back) and without automatic merges (the table is read
    once): measured 3x faster to fill than a default table, with the same tokens.
    """
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, content='', tokenize='{TOKENIZER}')")
    conn.execute("INSERT INTO t(t, rank) VALUES ('automerge', 0)")
    conn.execute("INSERT INTO t(t, rank) VALUES ('crisismerge', 2000)")
    conn.execute("CREATE VIRTUAL TABLE v_row USING fts5vocab(t, 'row')")
    conn.execute("CREATE VIRTUAL TABLE v_inst USING fts5vocab(t, 'instance')")
    conn.commit()  # the settings above opened a transaction; a query's rollback must keep them
    return conn


@dataclass
class _Part:
    """Postings of consecutive rows grouped by token: the unit builds and merges combine.

    ``terms`` are sorted (UTF-8 byte order, as FTS5 and Python order them); ``df[i]`` postings
    of ``terms[i]`` follow one another in ``docs``/``tfs``, rows ascending, rows already global
    to the segment being written.
    """

    terms: list[str]
    df: np.ndarray
    docs: np.ndarray
    tfs: np.ndarray


def _analyse_batch(texts: Sequence[str], first_row: int) -> _Part:
    """Tokenize texts with SQLite's FTS5 and read back (token, row, tf) postings.

    The instance view streams every token occurrence in (token, row, offset) order; reading the
    rows as one ``group_concat`` string and counting runs in numpy is ~7x faster than a
    ``GROUP BY`` (which sorts in a temporary B-tree) or fetching Python tuples.
    """
    conn = _fts_connection()
    try:
        with conn:
            conn.executemany(
                "INSERT INTO t(rowid, text) VALUES (?, ?)",
                ((i + 1, _clean(fold_text(text))) for i, text in enumerate(texts)),
            )
        vocab = conn.execute("SELECT term, cnt FROM v_row").fetchall()
        joined = conn.execute("SELECT group_concat(doc) FROM v_inst").fetchone()[0]
    finally:
        conn.close()
    if not vocab:
        empty = np.zeros(0, np.int32)
        return _Part([], np.zeros(0, np.int64), empty, empty)
    terms = [term for term, _ in vocab]
    counts = np.fromiter((cnt for _, cnt in vocab), np.int64, len(vocab))
    rows = np.fromstring(joined, dtype=np.int64, sep=",")  # noqa: NPY201 (text mode is kept)
    if rows.size != int(counts.sum()):
        raise RuntimeError("FTS5 vocabulary views disagree; cannot analyse texts")
    term_of = np.repeat(np.arange(len(terms)), counts)
    starts = np.ones(rows.size, bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (term_of[1:] != term_of[:-1])
    first = np.flatnonzero(starts)
    tfs = np.diff(np.append(first, rows.size)).astype(np.int32)
    docs = (rows[first] - 1 + first_row).astype(np.int32)
    df = np.bincount(term_of[first], minlength=len(terms)).astype(np.int64)
    return _Part(terms, df, docs, tfs)


_query_local = threading.local()
_query_cache: dict[str, tuple[str, ...]] = {}
_QUERY_CACHE_MAX = 100_000


def _tokenize_terms(terms: Sequence[str]) -> list[tuple[str, ...]]:
    """FTS5's tokens for each query term, through a per-thread in-memory table (cached)."""
    known = {term: _query_cache.get(term) for term in terms}
    missing = [term for term, tokens in known.items() if tokens is None]
    if missing:
        conn = getattr(_query_local, "conn", None)
        if conn is None:
            conn = _query_local.conn = _fts_connection()
        found: dict[int, list[str]] = {}
        try:
            conn.executemany(
                "INSERT INTO t(rowid, text) VALUES (?, ?)",
                ((i + 1, _clean(term)) for i, term in enumerate(missing)),
            )
            for term, doc in conn.execute("SELECT term, doc FROM v_inst ORDER BY doc, offset"):
                found.setdefault(int(doc) - 1, []).append(term)
        finally:
            conn.rollback()
        if len(_query_cache) > _QUERY_CACHE_MAX:
            _query_cache.clear()
        for i, term in enumerate(missing):
            known[term] = _query_cache[term] = tuple(found.get(i, ()))
    return [known[term] or () for term in terms]


def analyse_query(text: str) -> Counter[str]:
    """Query tokens and how many query terms produced each (each counts in the score)."""
    tokens: Counter[str] = Counter()
    for produced in _tokenize_terms(query_terms(text)):
        tokens.update(produced)
    return tokens


# ------------------------------------------------------------------------------- building


def _combine(parts: Sequence[_Part], rows: int) -> dict[str, np.ndarray]:
    """Concatenate parts (consecutive row ranges) into one segment's arrays, without sorting.

    Each token's postings are laid out part after part, so rows stay ascending; positions come
    from per-token prefix sums, which keeps the build linear in the postings.
    """
    vocabulary = sorted(set().union(*(part.terms for part in parts)))
    index = {term: i for i, term in enumerate(vocabulary)}
    n_terms = len(vocabulary)
    ids = [np.fromiter((index[t] for t in part.terms), np.int64, len(part.terms)) for part in parts]
    df = np.zeros(n_terms, np.int64)
    for part, part_ids in zip(parts, ids, strict=True):
        df[part_ids] += part.df
    post_offsets = np.zeros(n_terms + 1, np.int64)
    np.cumsum(df, out=post_offsets[1:])
    total = int(post_offsets[-1])
    docs = np.empty(total, np.int32)
    tfs = np.empty(total, np.int32)
    cursor = post_offsets[:-1].copy()
    for part, part_ids in zip(parts, ids, strict=True):
        if not part.docs.size:
            continue
        starts = cursor[part_ids]
        src_starts = np.zeros(len(part_ids), np.int64)
        np.cumsum(part.df[:-1], out=src_starts[1:])
        dest = np.arange(part.docs.size, dtype=np.int64)
        dest += np.repeat(starts - src_starts, part.df)
        docs[dest] = part.docs
        tfs[dest] = part.tfs
        cursor[part_ids] += part.df
    doclen = _row_lengths(docs, tfs, rows)
    encoded = [term.encode("utf-8") for term in vocabulary]
    term_offsets = np.zeros(n_terms + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=term_offsets[1:])
    blob = np.frombuffer(b"".join(encoded), np.uint8)
    arrays = {
        "terms": blob,
        "term_offsets": term_offsets,
        "post_offsets": post_offsets,
        "docs": docs,
        "tfs": tfs,
        "doclen": doclen,
    }
    arrays.update(_blocks(post_offsets, tfs, doclen[docs]))
    return arrays


def _row_lengths(docs: np.ndarray, tfs: np.ndarray, rows: int, chunk: int = 1 << 22) -> np.ndarray:
    """Each row's token count (the sum of its postings' tfs), in chunks of postings: bincount's
    float64 weights would otherwise cost 8 bytes a posting at once."""
    lengths = np.zeros(rows, np.float64)
    for start in range(0, docs.size, chunk):
        lengths += np.bincount(docs[start : start + chunk], weights=tfs[start : start + chunk], minlength=rows)
    return lengths.astype(np.int32)


def _blocks(post_offsets: np.ndarray, tfs: np.ndarray, lengths: np.ndarray) -> dict:
    """Per block of `BLOCK` postings of each token: its largest tf and smallest length."""
    df = np.diff(post_offsets)
    per_term = (df + BLOCK - 1) // BLOCK
    block_offsets = np.zeros(len(df) + 1, np.int64)
    np.cumsum(per_term, out=block_offsets[1:])
    n_blocks = int(block_offsets[-1])
    starts = np.repeat(post_offsets[:-1] - block_offsets[:-1] * BLOCK, per_term) + (
        np.arange(n_blocks) * BLOCK
    )
    if n_blocks:
        maxtf = np.maximum.reduceat(tfs, starts).astype(np.int32)
        mindl = np.minimum.reduceat(lengths, starts).astype(np.int32)
    else:
        maxtf = mindl = np.zeros(0, np.int32)
    return {"block_offsets": block_offsets, "block_maxtf": maxtf, "block_mindl": mindl}


def _analyse(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of a segment holding ``texts`` (row i = texts[i])."""
    parts = [
        _analyse_batch(texts[start : start + ANALYSE_BATCH], start)
        for start in range(0, len(texts), ANALYSE_BATCH)
    ]
    return _combine(parts, len(texts))


def _fsync_write(path: Path, data: bytes | None = None, array: np.ndarray | None = None) -> None:
    """Write a file and fsync it, so a later manifest never names a half-written file."""
    with open(path, "wb") as handle:
        if array is not None:
            np.save(handle, array, allow_pickle=False)
        else:
            handle.write(data or b"")
        handle.flush()
        os.fsync(handle.fileno())


def _write(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays and the JSON header (last) into ``folder``."""
    folder = Path(folder)
    for name in _ARRAYS:
        _fsync_write(folder / f"kw_{name}.npy", array=np.ascontiguousarray(arrays[name]))
    meta = {
        "format": FORMAT,
        "tokenizer": TOKENIZER,
        "block": BLOCK,
        "rows": int(arrays["doclen"].size),
        "total_tokens": int(arrays["doclen"].sum(dtype=np.int64)),
        "terms": int(arrays["term_offsets"].size - 1),
        "postings": int(arrays["docs"].size),
    }
    _fsync_write(folder / META_FILE, data=json.dumps(meta, sort_keys=True).encode())


def write_keyword_index(folder: Path, texts: Sequence[str]) -> None:
    """Analyse texts (segment row i = texts[i]) and write `KEYWORD_FILES` into folder, fsynced."""
    _write(folder, _analyse(list(texts)))


def _kept_postings(segment: KeywordSegment, kept: np.ndarray, base: int) -> _Part:
    """The postings of ``segment``'s ``kept`` rows, renumbered from ``base`` by rank.

    A merge holds every part's postings at once, so bytes per posting decide its peak: rows
    stay int32 (as the files store them), the part's tfs are read in place and no remap table
    is built when nothing was deleted. With the merged arrays and the row lengths summed in
    chunks (:func:`_row_lengths`), merging 9 segments of 180k rows took ~18 bytes of anonymous
    memory a posting instead of ~38.
    """
    offsets = np.asarray(segment.post_offsets)
    terms = np.arange(segment.n_terms)
    if kept.size == segment.rows:  # nothing deleted (the usual merge): every posting stays
        df = np.diff(offsets)
        docs = np.asarray(segment.docs, dtype=np.int32) + np.int32(base)
        tfs = np.asarray(segment.tfs, dtype=np.int32)
    else:
        remap = np.full(segment.rows, -1, np.int32)
        remap[kept] = np.arange(base, base + kept.size, dtype=np.int32)
        docs = remap[np.asarray(segment.docs)]
        keep = docs >= 0
        if keep.size:
            df = np.add.reduceat(keep, np.minimum(offsets[:-1], keep.size - 1), dtype=np.int64)
            df[np.diff(offsets) == 0] = 0  # reduceat reads one element for an empty range
        else:
            df = np.zeros(segment.n_terms, np.int64)
        docs = docs[keep]
        tfs = np.asarray(segment.tfs)[keep].astype(np.int32, copy=False)
        terms = np.flatnonzero(df)
        df = df[terms]
    return _Part([segment.term(int(i)) for i in terms], df.astype(np.int64, copy=False), docs, tfs)


def merge_keyword_indexes(folder: Path, parts: Sequence[tuple[KeywordSegment, np.ndarray]]) -> None:
    """Write the keyword index of the kept rows of ``parts``, concatenated, into ``folder``.

    Postings are remapped, never re-analysed: a kept row's new number is its rank among kept
    rows, tokens whose postings all go disappear, and the layout is the one `_combine` gives a
    fresh build, so the files equal ``write_keyword_index`` on the kept texts.
    """
    pieces: list[_Part] = []
    lengths: list[np.ndarray] = []
    base = 0
    for segment, kept in parts:
        kept = np.asarray(kept, np.int64)
        if kept.size and (np.any(np.diff(kept) <= 0) or kept[0] < 0 or kept[-1] >= segment.rows):
            raise ValueError("kept rows must be sorted, distinct and inside the segment")
        pieces.append(_kept_postings(segment, kept, base))
        lengths.append(np.asarray(segment.doclen)[kept])
        base += kept.size
    arrays = _combine(pieces, base)
    expected = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    if not np.array_equal(arrays["doclen"], expected):
        raise RuntimeError("merged document lengths disagree with the parts' lengths")
    _write(folder, arrays)


# -------------------------------------------------------------------------------- segments


def _load(path: Path) -> np.ndarray:
    """A read-only memory map of an ``.npy`` file (numpy cannot map an empty array)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        return np.load(path, allow_pickle=False)


class KeywordSegment:
    """One segment's keyword index: arrays memory-mapped from its folder, or held in memory."""

    def __init__(self, arrays: dict[str, np.ndarray], total_tokens: int) -> None:
        # Plain ndarray views of the maps: numpy's memmap subclass costs microseconds per slice,
        # which a query takes hundreds of times; the data stays mapped, not copied.
        arrays = {name: np.asarray(array).view(np.ndarray) for name, array in arrays.items()}
        self._arrays = arrays
        self._total_tokens = int(total_tokens)
        self.docs = arrays["docs"]
        self.tfs = arrays["tfs"]
        self.doclen = arrays["doclen"]
        self.post_offsets = arrays["post_offsets"]
        self.term_offsets = arrays["term_offsets"]
        self.block_offsets = arrays["block_offsets"]
        self.block_maxtf = arrays["block_maxtf"]
        self.block_mindl = arrays["block_mindl"]
        self._blob = arrays["terms"]
        self.n_terms = int(self.term_offsets.shape[0]) - 1
        self._lookup: dict[str, int] = {}

    @classmethod
    def open(cls, folder: Path) -> KeywordSegment:
        """Map the files of ``folder``; nothing but the small JSON header is read now."""
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != FORMAT or meta.get("tokenizer") != TOKENIZER:
            raise ValueError(f"{folder}: unsupported keyword index {meta!r}")
        arrays = {name: _load(folder / f"kw_{name}.npy") for name in _ARRAYS}
        segment = cls(arrays, meta["total_tokens"])
        if segment.rows != meta["rows"] or segment.n_terms != meta["terms"]:
            raise ValueError(f"{folder}: keyword files disagree with {META_FILE}")
        return segment

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> KeywordSegment:
        """The same index held in memory (rows not written yet)."""
        arrays = _analyse(list(texts))
        return cls(arrays, int(arrays["doclen"].sum(dtype=np.int64)))

    @property
    def rows(self) -> int:
        """Rows in the segment, masked or not."""
        return int(self.doclen.shape[0])

    @property
    def total_tokens(self) -> int:
        """Tokens over all rows (FTS5's column size total, stop words included)."""
        return self._total_tokens

    def term(self, i: int) -> str:
        """The i-th token in sorted order."""
        start, end = int(self.term_offsets[i]), int(self.term_offsets[i + 1])
        return bytes(self._blob[start:end]).decode("utf-8")

    def term_id(self, token: str) -> int:
        """Binary search of the sorted token blob: O(log terms) probes of the mapped files."""
        cached = self._lookup.get(token)
        if cached is not None:
            return cached
        key = token.encode("utf-8")
        low, high = 0, self.n_terms
        while low < high:
            mid = (low + high) // 2
            start, end = int(self.term_offsets[mid]), int(self.term_offsets[mid + 1])
            if bytes(self._blob[start:end]) < key:
                low = mid + 1
            else:
                high = mid
        found = -1
        if low < self.n_terms:
            start, end = int(self.term_offsets[low]), int(self.term_offsets[low + 1])
            if bytes(self._blob[start:end]) == key:
                found = low
        if len(self._lookup) < 65_536:
            self._lookup[token] = found
        return found

    def df(self, term_id: int) -> int:
        """Rows containing the token."""
        return int(self.post_offsets[term_id + 1] - self.post_offsets[term_id])


class Tombstones:
    """A segment's deleted rows as the statistics see them: how many, their tokens, and per
    token how many of them hold it (counted from the token's postings the first time a query
    asks, then kept: the set of deleted rows is fixed for this object's life)."""

    def __init__(self, segment: KeywordSegment, positions: np.ndarray) -> None:
        self._segment = segment
        self.dead = np.zeros(segment.rows, dtype=bool)
        self.dead[positions] = True
        self.rows = int(np.count_nonzero(self.dead))
        self.tokens = int(segment.doclen[self.dead].sum(dtype=np.int64))
        self._df: dict[int, int] = {}

    def df(self, term_id: int) -> int:
        """Deleted rows containing the token."""
        found = self._df.get(term_id)
        if found is None:
            start, end = int(self._segment.post_offsets[term_id]), int(self._segment.post_offsets[term_id + 1])
            found = int(np.count_nonzero(self.dead[self._segment.docs[start:end]]))
            if len(self._df) < 65_536:
                self._df[term_id] = found
        return found


# --------------------------------------------------------------------------------- search


def _tf_part(tf: np.ndarray, length: np.ndarray, avgdl: float) -> np.ndarray:
    """FTS5's per-token BM25 factor, in float64 and in its operation order."""
    tf = tf.astype(np.float64)
    return (tf * (K1 + 1.0)) / (tf + K1 * (1.0 - B + B * length.astype(np.float64) / avgdl))


@dataclass
class _Stats:
    """Global statistics of a query over all given segments."""

    tokens: list[str]
    weights: np.ndarray  # multiplicity * idf per token
    ids: list[list[int]]  # per segment, per token: term id or -1
    avgdl: float


def _stats(segments: Sequence[KeywordSegment], text: str,
           deleted: Sequence[Tombstones | None] | None = None) -> _Stats | None:
    """Tokens, their global idf-weights and per-segment term ids, over the rows not
    ``deleted``; None if nothing can match."""
    counted = analyse_query(text)
    if not counted or not segments:
        return None
    tokens = list(counted)
    ids = [[segment.term_id(token) for token in tokens] for segment in segments]
    gone = list(deleted) if deleted is not None else [None] * len(segments)
    n = sum(segment.rows - (dead.rows if dead else 0) for segment, dead in zip(segments, gone, strict=True))
    total = sum(segment.total_tokens - (dead.tokens if dead else 0) for segment, dead in zip(segments, gone, strict=True))
    df = np.zeros(len(tokens), np.float64)
    for segment, seg_ids, dead in zip(segments, ids, gone, strict=True):
        for j, tid in enumerate(seg_ids):
            if tid >= 0:
                df[j] += segment.df(tid) - (dead.df(tid) if dead else 0)
    if n == 0 or total == 0 or not df.any():
        return None
    idf = np.log((n - df + 0.5) / (df + 0.5))
    idf[idf <= 0.0] = 1e-6
    weights = np.array([counted[t] for t in tokens], np.float64) * idf
    return _Stats(tokens, weights, ids, total / n)


#: Scores this close (relative) to the k-th best are kept beside the k: a row's BM25 parts are
#: summed in an order the pruning decides, so equal rows may differ in their last bits.
TIE_BAND = 1e-9


class _TopK:
    """The best k (score, segment, row) seen so far, and the score to beat.

    Equal scores are ordered by a key, the caller's stable id of each row when given (the
    store passes faiss ids, which do not change when rows move between segments), else by
    segment then row. Rows within `TIE_BAND` of the k-th score are kept too, and
    :meth:`result` sums the parts of rows that close to another again in one fixed order
    before cutting at k, so a tie is decided by the key alone: top-k is the start of
    top-(k+n), and the pruned search keeps the rows the exhaustive one keeps.
    """

    def __init__(self, k: int, ids: Sequence[np.ndarray] | None = None) -> None:
        self.k = k
        self.ids = ids
        self.seeded_rows = 0
        self.scores = np.zeros(0, np.float64)
        self.segs = np.zeros(0, np.int64)
        self.rows = np.zeros(0, np.int64)
        self.keys = np.zeros(0, np.int64)

    def threshold(self, extra: np.ndarray | None = None) -> float:
        """k-th best of the kept scores and ``extra`` lower bounds (-inf while fewer than k)."""
        pool = self.scores if extra is None else np.concatenate([self.scores, extra])
        if pool.size < self.k:
            return -np.inf
        return float(np.partition(pool, pool.size - self.k)[pool.size - self.k])

    def add(self, seg: int, rows: np.ndarray, scores: np.ndarray) -> None:
        """Merge exact scores of a segment's rows, keeping the best k and their near-ties."""
        rows = rows.astype(np.int64)
        keys = (np.asarray(self.ids[seg], np.int64)[rows] if self.ids is not None
                else rows + (np.int64(seg) << np.int64(40)))
        self.scores = np.concatenate([self.scores, scores])
        self.segs = np.concatenate([self.segs, np.full(rows.size, seg, np.int64)])
        self.rows = np.concatenate([self.rows, rows])
        self.keys = np.concatenate([self.keys, keys])
        if self.scores.size > self.k:
            kth = self.threshold()
            keep = np.flatnonzero(self.scores >= kth - TIE_BAND * max(abs(kth), 1.0))
            if keep.size < self.scores.size:
                self.scores, self.segs = self.scores[keep], self.segs[keep]
                self.rows, self.keys = self.rows[keep], self.keys[keep]

    def result(self, rescore: Callable[[int, np.ndarray], np.ndarray] | None = None) -> list[tuple[int, int, float]]:
        """The best k, best first, equal scores by key; ``rescore(segment, rows)`` gives the
        kept rows' scores summed in the query's order (bit for bit the same in every search)."""
        scores = self.scores
        if rescore is not None and scores.size > 1:
            # Only rows whose score lies within the band of another's can be misordered.
            ordered = np.sort(scores)
            close = np.diff(ordered) <= TIE_BAND * np.maximum(np.abs(ordered[1:]), 1.0)
            if close.any():
                near = ordered[np.concatenate(([False], close)) | np.concatenate((close, [False]))]
                tied = np.isin(scores, near)
                scores = scores.copy()
                for seg in np.unique(self.segs[tied]):
                    mine = tied & (self.segs == seg)
                    scores[mine] = rescore(int(seg), self.rows[mine])
        order = np.lexsort((self.keys, -scores))[: self.k]
        return [(int(self.segs[i]), int(self.rows[i]), float(scores[i])) for i in order]


def _query_order_scores(segment: KeywordSegment, terms: list[_Term], rows: np.ndarray, avgdl: float) -> np.ndarray:
    """BM25 of ``rows``: each query token's part added in the query's order from 0, exactly as
    `search_exhaustive` accumulates it."""
    lengths = np.asarray(segment.doclen[rows])
    scores = np.zeros(rows.size, np.float64)
    for term in terms:
        scores = scores + _lookup_scores(segment, term, rows, lengths, avgdl)
    return scores


@dataclass
class _Term:
    """One query token inside one segment: its weight and its slice of the postings."""

    weight: float
    term_id: int
    start: int
    end: int


@dataclass
class _BoundedTerm(_Term):
    """A token with the BM25 bound of each of its blocks and of its whole list: what MaxScore
    prunes by (a scan needs none of it)."""

    block_bounds: np.ndarray
    bound: float


def _segment_terms(segment: KeywordSegment, stats: _Stats, seg_ids: list[int]) -> list[_Term]:
    """The segment's query tokens, in query order."""
    present = [(float(w), tid) for w, tid in zip(stats.weights, seg_ids, strict=True) if tid >= 0]
    if not present:
        return []
    offsets = segment.post_offsets[np.array([tid for _, tid in present], np.int64)[:, None] + [0, 1]].tolist()
    return [_Term(weight, tid, start, end) for (weight, tid), (start, end) in zip(present, offsets, strict=True)]


def _bounded(segment: KeywordSegment, terms: list[_Term], avgdl: float) -> list[_BoundedTerm]:
    """``terms`` with their block and list score bounds (one numpy pass)."""
    tids = np.array([t.term_id for t in terms], np.int64)
    b0, b1 = segment.block_offsets[tids], segment.block_offsets[tids + 1]
    counts = b1 - b0
    index = np.repeat(b0 - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    index += np.arange(index.size)
    weights = np.repeat([t.weight for t in terms], counts)
    bounds = weights * _tf_part(segment.block_maxtf[index], segment.block_mindl[index], avgdl)
    cuts = np.concatenate([[0], np.cumsum(counts)])
    maxima = np.maximum.reduceat(bounds, cuts[:-1])
    return [
        _BoundedTerm(t.weight, t.term_id, t.start, t.end, bounds[cuts[j] : cuts[j + 1]], float(maxima[j]))
        for j, t in enumerate(terms)
    ]


def _lookup_scores(
    segment: KeywordSegment, term: _Term, rows: np.ndarray, lengths: np.ndarray, avgdl: float
) -> np.ndarray:
    """The token's score contribution for each of ``rows`` (0 where absent), by binary search."""
    docs = segment.docs[term.start : term.end]
    pos = np.searchsorted(docs, rows)
    pos[pos >= docs.shape[0]] = 0
    hit = np.asarray(docs[pos]) == rows
    out = np.zeros(rows.size, np.float64)
    if hit.any():
        tf = np.asarray(segment.tfs[term.start : term.end])[pos[hit]]
        out[hit] = term.weight * _tf_part(tf, lengths[hit], avgdl)
    return out


def _postings(
    segment: KeywordSegment, term: _Term, keep_blocks: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The token's (rows, tfs), all or only those of the kept blocks."""
    if keep_blocks is None:
        return (
            np.asarray(segment.docs[term.start : term.end]),
            np.asarray(segment.tfs[term.start : term.end]),
        )
    starts = term.start + keep_blocks * BLOCK
    lengths = np.minimum(starts + BLOCK, term.end) - starts
    index = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    index += np.arange(index.size)
    return np.asarray(segment.docs[index]), np.asarray(segment.tfs[index])


def _live_rows(rows: np.ndarray, live: np.ndarray | None) -> np.ndarray:
    """Rows a mask allows."""
    return rows if live is None else rows[live[rows]]


def _seed(
    segment: KeywordSegment, terms: list[_BoundedTerm], live: np.ndarray | None, avgdl: float
) -> np.ndarray:
    """Exact scores of a few promising rows (best on the highest-bound token), as lower bounds.

    They raise the threshold before the main pass, so MaxScore can set the common tokens aside
    from the start instead of scoring a whole segment first.
    """
    best = max(terms, key=lambda t: t.bound)
    take = np.arange(best.block_bounds.size)
    if take.size > SEED_CANDIDATES // BLOCK:
        take = np.argpartition(-best.block_bounds, SEED_CANDIDATES // BLOCK - 1)
        take = take[: SEED_CANDIDATES // BLOCK]
    rows, tfs = _postings(segment, best, np.sort(take))
    lengths = np.asarray(segment.doclen[rows])
    partial = best.weight * _tf_part(tfs, lengths, avgdl)
    allowed = np.ones(rows.size, bool) if live is None else live[rows]
    rows, lengths, partial = rows[allowed], lengths[allowed], partial[allowed]
    if rows.size > SEED_CANDIDATES // 4:
        top = np.argpartition(-partial, SEED_CANDIDATES // 4 - 1)[: SEED_CANDIDATES // 4]
        rows, lengths = rows[top], lengths[top]
    scores = np.zeros(rows.size, np.float64)
    for term in terms:
        scores += _lookup_scores(segment, term, rows, lengths, avgdl)
    return scores


def _search_segment(
    position: int,
    segment: KeywordSegment,
    terms: list[_Term],
    live: np.ndarray | None,
    avgdl: float,
    top: _TopK,
) -> None:
    """One segment's rows into ``top``: by a scan where the segment holds few postings of the
    query's tokens (`SCAN_POSTINGS`), else by MaxScore, which skips the segment outright where
    the tokens' bounds cannot reach the threshold."""
    if sum(t.end - t.start for t in terms) <= SCAN_POSTINGS:
        _scan_segment(position, segment, terms, live, avgdl, top)
        return
    bounded = _bounded(segment, terms, avgdl)
    theta = top.threshold()
    if np.isfinite(theta) and sum(t.bound for t in bounded) < theta - TIE_BAND * max(abs(theta), 1.0):
        # even a row holding every token at its best cannot enter the top k (nor tie with
        # its k-th: equal rows may be summed a few ulps apart)
        return
    _maxscore_segment(position, segment, bounded, live, avgdl, top)


def _maxscore_segment(
    position: int,
    segment: KeywordSegment,
    terms: list[_BoundedTerm],
    live: np.ndarray | None,
    avgdl: float,
    top: _TopK,
) -> None:
    """MaxScore with block-max bounds over one segment, sharing the threshold across segments.

    Tokens are ordered by their bound; the cheapest prefix whose bounds sum below the threshold
    is *non-essential*: a row holding only those cannot enter the top k, so candidates come
    from the essential tokens' postings (and only from blocks whose bound plus every other
    token's bound reaches the threshold). Candidates are then completed token by token with
    binary searches, dropping those whose score plus the remaining bounds falls short.
    """
    theta = top.threshold()
    if not np.isfinite(theta) or segment.rows > 4 * top.seeded_rows:
        # No threshold yet (or one learnt on much smaller segments): seed it here.
        theta = top.threshold(_seed(segment, terms, live, avgdl))
        top.seeded_rows = max(top.seeded_rows, segment.rows)
    slack = 1e-9 * max(abs(theta), 1.0) if np.isfinite(theta) else 0.0
    terms = sorted(terms, key=lambda t: t.bound)
    prefix = np.cumsum([t.bound for t in terms])
    n_non = int(np.searchsorted(prefix, theta - slack, side="left")) if np.isfinite(theta) else 0
    non_essential, essential = terms[:n_non], terms[n_non:]
    if not essential:
        return
    total_bound = float(prefix[-1])
    row_parts, score_parts = [], []
    for term in essential:
        keep = None
        if np.isfinite(theta):
            mask = term.block_bounds + (total_bound - term.bound) >= theta - slack
            if not mask.all():
                keep = np.flatnonzero(mask)
        rows, tfs = _postings(segment, term, keep)
        row_parts.append(rows)
        score_parts.append(term.weight * _tf_part(tfs, np.asarray(segment.doclen[rows]), avgdl))
    rows = np.concatenate(row_parts)
    contributions = np.concatenate(score_parts)
    if len(row_parts) == 1:
        cands, scores = rows, contributions  # one token's rows are already distinct, sorted
    elif rows.size * 16 >= segment.rows or segment.rows <= DENSE_ROWS:
        # A dense accumulator costs O(rows of the segment) but no sort: cheaper than np.unique
        # unless the candidates are a tiny fraction of a large segment.
        acc = np.bincount(rows, weights=contributions, minlength=segment.rows)
        cands = np.flatnonzero(acc > 0.0)  # bool nonzero is ~10x faster than float
        scores = acc[cands]
    else:
        cands, inverse = np.unique(rows, return_inverse=True)
        scores = np.bincount(inverse, weights=contributions, minlength=cands.size)
    if live is not None:
        allowed = live[cands]
        cands, scores = cands[allowed], scores[allowed]
    remaining = float(sum(t.bound for t in non_essential))
    for term in reversed(non_essential):
        theta = max(theta, top.threshold(scores))
        keep = scores + remaining >= theta - slack
        cands, scores = cands[keep], scores[keep]
        if not cands.size:
            return
        lengths = np.asarray(segment.doclen[cands])
        scores = scores + _lookup_scores(segment, term, cands, lengths, avgdl)
        remaining -= term.bound
    top.add(position, cands, scores)


def _scan_segment(
    position: int,
    segment: KeywordSegment,
    terms: list[_Term],
    live: np.ndarray | None,
    avgdl: float,
    top: _TopK,
) -> None:
    """Every posting of the query's tokens in one segment scored in one pass, its best k (and
    their near-ties) kept.

    Why beside MaxScore: pruning pays per token and per block (seeding, bounds, a binary search
    per candidate and token), a cost that a segment holding few postings of the query never
    earns back; a hybrid query asks for 100 candidates, which prunes little anyway. The
    postings are concatenated in the query's token order and summed by ``np.bincount``, which
    adds each row's parts in input order from 0: the same sum, bit for bit, as
    :func:`_query_order_scores`. The rule that picks it is `SCAN_POSTINGS`.
    """
    if len(terms) == 1:  # one token's rows are already distinct and sorted
        term = terms[0]
        cands = segment.docs[term.start : term.end].astype(np.int64)
        scores = term.weight * _tf_part(segment.tfs[term.start : term.end], segment.doclen[cands], avgdl)
    else:
        rows = np.concatenate([segment.docs[t.start : t.end] for t in terms])
        tfs = np.concatenate([segment.tfs[t.start : t.end] for t in terms])
        weights = np.repeat([t.weight for t in terms], [t.end - t.start for t in terms])
        parts = weights * _tf_part(tfs, segment.doclen[rows], avgdl)
        if rows.size * 16 >= segment.rows:  # a dense accumulator: no sort
            totals = np.bincount(rows, weights=parts, minlength=segment.rows)
            cands = np.flatnonzero(totals > 0.0)
            scores = totals[cands]
        else:  # few postings in a large segment: sort them rather than touch every row
            cands, inverse = np.unique(rows, return_inverse=True)
            scores = np.bincount(inverse, weights=parts, minlength=cands.size)
    if live is not None:
        allowed = live[cands]
        cands, scores = cands[allowed], scores[allowed]
    if scores.size > top.k:
        kth = float(np.partition(scores, scores.size - top.k)[scores.size - top.k])
        keep = scores >= kth - TIE_BAND * max(abs(kth), 1.0)
        cands, scores = cands[keep], scores[keep]
    top.add(position, cands, scores)
    top.seeded_rows = max(top.seeded_rows, segment.rows)  # an exact top k: better than a seed


def _check(segments: Sequence[KeywordSegment], live: Sequence[np.ndarray | None]) -> None:
    """Masks must match their segments."""
    if len(live) != len(segments):
        raise ValueError("live must have one entry per segment")
    for segment, mask in zip(segments, live, strict=True):
        if mask is not None and (mask.dtype != np.bool_ or mask.shape != (segment.rows,)):
            raise ValueError("a live mask must be a bool array of the segment's rows")


def search(
    segments: Sequence[KeywordSegment], live: Sequence[np.ndarray | None], text: str, k: int,
    ids: Sequence[np.ndarray] | None = None, deleted: Sequence[Tombstones | None] | None = None,
) -> list[tuple[int, int, float]]:
    """Top-k (segment position, local row, BM25 score) best first, exact, over all segments.

    Rows masked False are never returned; they count in N, avgdl and df unless ``deleted``
    (each segment's `Tombstones`) says they are gone (the caller masks those too). Equal
    scores are ordered by ``ids`` (each segment's stable row ids) when given, else by position.
    """
    _check(segments, live)
    stats = _stats(segments, text, deleted) if k > 0 else None
    if stats is None:
        return []
    top = _TopK(k, ids)
    order = sorted(range(len(segments)), key=lambda i: -segments[i].rows)
    terms_of: dict[int, list[_Term]] = {}
    for i in order:
        mask = live[i]
        if mask is not None and not mask.any():
            continue
        terms_of[i] = _segment_terms(segments[i], stats, stats.ids[i])
        if terms_of[i]:
            _search_segment(i, segments[i], terms_of[i], mask, stats.avgdl, top)
    return top.result(lambda i, rows: _query_order_scores(segments[i], terms_of[i], rows, stats.avgdl))


def search_exhaustive(
    segments: Sequence[KeywordSegment], live: Sequence[np.ndarray | None], text: str, k: int,
    ids: Sequence[np.ndarray] | None = None, deleted: Sequence[Tombstones | None] | None = None,
) -> list[tuple[int, int, float]]:
    """The same answer as `search` by scoring every matching row (reference for tests)."""
    _check(segments, live)
    stats = _stats(segments, text, deleted) if k > 0 else None
    if stats is None:
        return []
    top = _TopK(k, ids)
    for i, segment in enumerate(segments):
        acc = np.zeros(segment.rows, np.float64)
        for weight, tid in zip(stats.weights, stats.ids[i], strict=True):
            if tid < 0:
                continue
            start, end = int(segment.post_offsets[tid]), int(segment.post_offsets[tid + 1])
            rows = np.asarray(segment.docs[start:end])
            tfs = np.asarray(segment.tfs[start:end])
            acc[rows] += weight * _tf_part(tfs, np.asarray(segment.doclen[rows]), stats.avgdl)
        matched = np.flatnonzero(acc > 0)
        if live[i] is not None:
            matched = matched[live[i][matched]]
        top.add(i, matched, acc[matched])
    terms_of = {i: _segment_terms(segment, stats, stats.ids[i]) for i, segment in enumerate(segments)}
    return top.result(lambda i, rows: _query_order_scores(segments[i], terms_of[i], rows, stats.avgdl))
