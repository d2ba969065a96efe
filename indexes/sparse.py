"""The sparse (keyword) side of an index: BM25 over node texts with SQLite FTS5.

The FTS5 table lives in the docstore's SQLite database and is kept in step with the ``nodes``
table by triggers, so every add, upsert, delete and clear updates it in the same transaction,
and a version's ``docstore.sqlite`` carries it under the same checksum and atomic switch as the
vectors. Nothing else has to remember to update it.

Why FTS5 rather than a separate in-memory BM25 (bm25s): it is incremental and transactional,
needs no extra file or dependency, and measured within noise of bm25s on SciFact
(``benchmarks/results/quality/sparse.md``).

FTS5's query language is a trap for user text: ``"``, ``*``, ``AND``, ``NEAR``, ``-`` and ``:``
are syntax, and ``ver1.1`` becomes a prefix query. So user text never reaches ``MATCH`` as is:
it is cut into word tokens, English stop words are dropped, and each token is quoted and the
tokens OR-joined (FTS5's default is AND, which finds nothing for most natural-language queries).
"""

from __future__ import annotations

import functools
import re
import sqlite3
import unicodedata

import numpy as np

FTS_TABLE = "nodes_fts"
TOKENIZER = "porter unicode61 remove_diacritics 2"
"""English (Porter) stemming over Unicode word splitting; measured against plain unicode61."""

MAX_QUERY_TERMS = 64
"""Distinct terms used from one query, the first ones: bounds the work of a 4,000-character
query (the query path warns when a query has more, `terms_left_out`)."""

# Lucene's English stop words (what bm25s and Elasticsearch use): terms this common carry no
# ranking signal, but an OR query over them would have to score almost every row.
STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with".split()
)

# Format characters that sit inside words without ending them, which FTS5's unicode61 takes for
# separators: the soft hyphen (HTML's &shy;), joiners (ZWJ, ZWNJ, the word joiner), bidi marks
# and the BOM. Every Unicode Cf character but U+200B, the zero-width *space*, which does end a
# word (Thai and Khmer text marks word breaks with it). They all lie in these blocks (Unicode
# 14-16; tests/test_keywords.py checks against every code point, which takes 0.2 s to read).
_FORMAT_BLOCKS = ((0x0000, 0x3000), (0xFE00, 0x10000), (0x11000, 0x14000), (0x1BC00, 0x1BD00),
                  (0x1D100, 0x1D200), (0xE0000, 0xE0100))


@functools.cache
def _ignorable() -> frozenset[int]:
    """The code points of the characters above."""
    return frozenset(cp for start, stop in _FORMAT_BLOCKS for cp in range(start, stop)
                     if unicodedata.category(chr(cp)) == "Cf" and cp != 0x200B)


# Compatibility forms that keep their own form: NFKC makes "½" the digits 1 and 2, "①" and "²"
# the digit, so a query for "½ teaspoon" ranked "1 teaspoon and 2 eggs" first. Ligatures,
# full-width and other presentation forms are folded. These lie in the blocks below (tests check
# them against every code point).
_KEPT_FORMS = ("<fraction>", "<circle>", "<super>", "<sub>")
_KEPT_BLOCKS = ((0x0000, 0x4000), (0xA000, 0xB000), (0x10000, 0x11000), (0x1F000, 0x20000))
_DROP, _KEEP = 1, 2


@functools.cache
def _kept_forms() -> frozenset[int]:
    """The code points of the compatibility forms above."""
    return frozenset(cp for start, stop in _KEPT_BLOCKS for cp in range(start, stop)
                     if unicodedata.decomposition(chr(cp)).startswith(_KEPT_FORMS))


@functools.cache
def _special() -> np.ndarray:
    """Per code point (1.1 MB): `_DROP` for the format characters above, `_KEEP` for the kept
    compatibility forms, else 0."""
    lookup = np.zeros(0x110000, np.uint8)
    lookup[sorted(_ignorable())] = _DROP
    lookup[sorted(_kept_forms())] = _KEEP
    return lookup


def fold_text(text: str) -> str:
    """``text`` as keyword search reads it, documents and queries alike: compatibility forms
    composed (NFKC: a PDF's "\\ufb01nancial" ligature is "financial", full-width "\\uff21\\uff22" is
    "AB", and NFD Hangul or accents are composed as FTS5 needs them) but for fractions, circled
    numbers and super/subscripts, and the format characters inside words dropped
    ("docu\\u00admentation" is one word). Case and diacritics are FTS5's to fold.

    Documents are folded at every segment write, so the text is looked at as an array of code
    points (~25 ns a character; ``str.translate`` took ~250).
    """
    if text.isascii():
        return text
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)  # lone ones too
    special = _special()[points]
    if (special == _DROP).any():
        points = points[special != _DROP]
        special = special[special != _DROP]
        text = points.tobytes().decode("utf-32-le", "surrogatepass")
    if unicodedata.is_normalized("NFKC", text):
        return text
    if not (special == _KEEP).any():
        return unicodedata.normalize("NFKC", text)
    kept = _special()
    return unicodedata.normalize("NFC", "".join(
        ch if kept[ord(ch)] == _KEEP else unicodedata.normalize("NFKC", ch) for ch in text))


#: A word: ``\w`` characters and the combining diacritical marks inside one (U+0300-036F and the
#: supplement and extended blocks), as FTS5's unicode61 keeps them (see :func:`query_terms`).
_TOKEN = re.compile(r"\w[\w\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]*", re.UNICODE)

SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(
    text, content='nodes', content_rowid='faiss_id', tokenize='{TOKENIZER}'
);
CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_insert AFTER INSERT ON nodes BEGIN
    INSERT INTO {FTS_TABLE}(rowid, text) VALUES (new.faiss_id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_delete AFTER DELETE ON nodes BEGIN
    INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, text) VALUES ('delete', old.faiss_id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_update AFTER UPDATE OF text, faiss_id ON nodes BEGIN
    INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, text) VALUES ('delete', old.faiss_id, old.text);
    INSERT INTO {FTS_TABLE}(rowid, text) VALUES (new.faiss_id, new.text);
END;
"""


def query_terms(text: str) -> list[str]:
    """The distinct, lower-cased word tokens of ``text`` that are not stop words, in order.

    Cut where FTS5 cuts a document's words: the text is folded first (:func:`fold_text`, which
    composes it as NFC would, and as documents are folded) and split before
    lower-casing, since ``\\w`` stops at a combining mark that FTS5's tokenizer keeps inside a
    word: an NFD "nai\\u0308ve" or "İstanbul" (lower-cased, an ``i`` and a combining dot)
    became two terms that match nothing. A word also runs on through the combining marks of
    the diacritical blocks (``_TOKEN``), for letters that NFC cannot compose with their mark
    ("q\\u0307uery"). Scripts whose words FTS5 itself splits at their marks (Devanagari) are
    cut the same on both sides.
    """
    return _distinct_terms(text, MAX_QUERY_TERMS)


def terms_left_out(text: str) -> int:
    """How many distinct terms of ``text`` keyword search leaves out: those past the first
    `MAX_QUERY_TERMS` (a pasted paragraph as a query), which a caller should be told of."""
    return max(len(_distinct_terms(text, None)) - MAX_QUERY_TERMS, 0)


def _distinct_terms(text: str, limit: int | None) -> list[str]:
    seen: dict[str, None] = {}
    for word in _TOKEN.findall(fold_text(text)):
        token = word.lower()
        if token not in STOP_WORDS and token not in seen:
            seen[token] = None
            if len(seen) == limit:
                break
    return list(seen)


def match_expression(text: str) -> str | None:
    """A safe FTS5 MATCH expression for user text: quoted terms OR-joined; None if no term."""
    terms = query_terms(text)
    if not terms:
        return None
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


def has_table(conn: sqlite3.Connection) -> bool:
    """Whether the database has the keyword table (indexes written before it existed do not)."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (FTS_TABLE,)
    ).fetchone()
    return row is not None


def create(conn: sqlite3.Connection, *, populate: bool) -> None:
    """Create the table and its triggers; ``populate`` indexes the nodes already stored."""
    with conn:
        conn.executescript(SCHEMA)
        if populate:
            conn.execute(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('rebuild')")


def search(
    conn: sqlite3.Connection, text: str, k: int, allowed: np.ndarray | None = None
) -> list[tuple[int, float]]:
    """Top-``k`` (faiss id, BM25 score) for ``text``, higher is better, restricted to ``allowed``.

    ``ORDER BY bm25 LIMIT`` stays an inner query on the FTS table alone, where FTS5 can rank
    without touching other tables; a restriction is applied to its result, and the limit grows
    until ``k`` allowed rows are found or the matches run out.
    """
    expression = match_expression(text)
    if expression is None or k <= 0:
        return []
    keep = None if allowed is None else set(allowed.tolist())
    if keep is not None and not keep:
        return []
    limit = k if keep is None else max(4 * k, 64)
    while True:
        rows = conn.execute(
            f"SELECT rowid, bm25({FTS_TABLE}) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? "
            f"ORDER BY bm25({FTS_TABLE}) LIMIT ?",
            (expression, limit),
        ).fetchall()
        hits = [(int(rowid), -float(score)) for rowid, score in rows]
        if keep is not None:
            hits = [hit for hit in hits if hit[0] in keep]
        if len(hits) >= k or len(rows) < limit:
            return hits[:k]
        limit *= 4


def row_count(conn: sqlite3.Connection) -> int:
    """Rows indexed for keyword search (equals the node count when in step)."""
    return int(conn.execute(f"SELECT count(*) FROM {FTS_TABLE}_docsize").fetchone()[0])


def integrity_check(conn: sqlite3.Connection) -> None:
    """Raise ``sqlite3.DatabaseError`` if the keyword table disagrees with the nodes table."""
    conn.execute(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}, rank) VALUES ('integrity-check', 1)")

