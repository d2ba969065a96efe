"""The segment keyword engine (`indexes.keywords`): FTS5-equal scores, exact pruned top-k."""

from __future__ import annotations

import json
import random
import sqlite3
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from data_paths import SCIFACT

from indexes import keywords, sparse

WORDS = (
    "cell cells protein proteins gene genes expression cancer tumour tumor patients patient "
    "treatment therapy mice mouse receptor receptors signalling signaling pathway pathways "
    "insulin glucose diabetes obesity risk mortality infection virus viral immune response "
    "increased decreased reduced activity binding kinase mutation mutations dna rna café naïve "
    "running runs ran runner stem stemming analysis analyses clinical trial trials"
).split()
STOP = sorted(sparse.STOP_WORDS)


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Texts with a skewed vocabulary, stop words, diacritics and a few empty rows."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 97 == 13:
            texts.append("")
            continue
        length = rng.randint(3, 60)
        words = [
            rng.choice(STOP)
            if rng.random() < 0.3
            else WORDS[min(int(rng.expovariate(0.08)), len(WORDS) - 1)]
            for _ in range(length)
        ]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def synthetic_queries(n: int, seed: int = 1) -> list[str]:
    """Random OR queries of 1-12 words, stop words and duplicates included."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS + STOP[:5]) for _ in range(rng.randint(1, 12))) for _ in range(n)
    ]


def scifact_texts(limit: int) -> tuple[list[str], list[str]]:
    """SciFact texts and claims (skips when the shared data is absent)."""
    corpus = SCIFACT / "corpus.jsonl"
    if not corpus.exists():
        pytest.skip(f"SciFact not found at {corpus} (shared data not present)")
    texts = []
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            texts.append(f"{doc['title']} {doc['text']}")
            if len(texts) == limit:
                break
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as handle:
        queries = [json.loads(line)["text"] for line in handle][:200]
    return texts, queries


def fts5(texts: list[str]) -> sqlite3.Connection:
    """FTS5's own keyword table over texts folded as the engine folds them, rowid = row."""
    conn = sqlite3.connect(":memory:")
    conn.execute(
        f"CREATE VIRTUAL TABLE {sparse.FTS_TABLE} USING fts5(text, tokenize='{sparse.TOKENIZER}')"
    )
    conn.executemany(f"INSERT INTO {sparse.FTS_TABLE}(rowid, text) VALUES (?, ?)",
                     ((row, sparse.fold_text(text)) for row, text in enumerate(texts)))
    return conn


def split(texts: list[str], parts: int) -> list[keywords.KeywordSegment]:
    """The same rows cut into consecutive segments."""
    bounds = np.linspace(0, len(texts), parts + 1).astype(int)
    return [
        keywords.KeywordSegment.from_texts(texts[a:b])
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def global_hits(segments, hits) -> dict[int, float]:
    """(segment, row, score) -> {global row: score}."""
    bases = np.concatenate([[0], np.cumsum([s.rows for s in segments])])
    return {int(bases[s]) + r: score for s, r, score in hits}


def assert_same_scores(expected: dict[int, float], got: dict[int, float]) -> None:
    """Equal score multisets; rows equal except among ties at the cut."""
    a, b = sorted(expected.values()), sorted(got.values())
    assert np.allclose(a, b, rtol=1e-5, atol=0), (expected, got)
    for row in set(expected) & set(got):
        assert got[row] == pytest.approx(expected[row], rel=1e-5)
    cut = min(a) if a else 0.0
    for row in set(expected) ^ set(got):
        assert (expected.get(row) or got[row]) == pytest.approx(cut, rel=1e-5)


def check_against_fts5(texts: list[str], queries: list[str], k: int) -> int:
    """Scores of the new engine equal FTS5's bm25(); returns the queries compared."""
    conn = fts5(texts)
    segment = keywords.KeywordSegment.from_texts(texts)
    compared = 0
    for query in queries:
        if any("_" in term for term in keywords.query_terms(query)):
            continue  # FTS5 makes a phrase of foo_bar; documented difference
        expected = dict(sparse.search(conn, query, k))
        got = global_hits([segment], keywords.search([segment], [None], query, k))
        assert_same_scores(expected, got)
        compared += 1
    return compared


def test_scores_equal_fts5_on_synthetic_texts() -> None:
    texts = synthetic_texts(400)
    assert check_against_fts5(texts, synthetic_queries(60), k=20) == 60


def test_scores_equal_fts5_on_scifact() -> None:
    texts, queries = scifact_texts(400)
    assert check_against_fts5(texts, queries, k=10) > 150


def test_segment_split_does_not_change_scores() -> None:
    texts = synthetic_texts(500, seed=3)
    one, five = split(texts, 1), split(texts, 5)
    for query in synthetic_queries(40, seed=4):
        a = global_hits(one, keywords.search(one, [None], query, 15))
        b = global_hits(five, keywords.search(five, [None] * 5, query, 15))
        assert_same_scores(a, b)


# Never scan (MaxScore on every segment), always scan, and the default rule.
SCAN_RULES = (0.0, float("inf"), keywords.SCAN_POSTINGS)


@pytest.mark.parametrize("scan_postings", SCAN_RULES)
def test_pruned_top_k_equals_brute_force(monkeypatch: pytest.MonkeyPatch, scan_postings: float) -> None:
    monkeypatch.setattr(keywords, "SCAN_POSTINGS", scan_postings)
    texts = synthetic_texts(3000, seed=5)
    segments = split(texts, 3)
    rng = np.random.default_rng(6)
    live = [rng.random(s.rows) > 0.2 for s in segments]
    for query in synthetic_queries(80, seed=7):
        for k in (1, 10, 100):
            pruned = keywords.search(segments, live, query, k)
            brute = keywords.search_exhaustive(segments, live, query, k)
            assert_same_scores(global_hits(segments, brute), global_hits(segments, pruned))


def test_a_scanned_segment_gives_the_exhaustive_answer_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scanning sums each row's parts in the query's order, as the reference does: the same
    scores to the last bit and the same order, ties included, with or without a mask."""
    monkeypatch.setattr(keywords, "SCAN_POSTINGS", float("inf"))
    texts = synthetic_texts(2000, seed=11)
    segments = split(texts, 4)
    rng = np.random.default_rng(12)
    masks = [[None] * 4, [rng.random(s.rows) > 0.3 for s in segments]]
    for query in synthetic_queries(60, seed=13):
        for live in masks:
            for k in (1, 10, 100):
                assert (keywords.search(segments, live, query, k)
                        == keywords.search_exhaustive(segments, live, query, k))
    # Tokens with few postings in a large segment are summed after a sort, not in a dense
    # accumulator: the same bits.
    sparse_rows = [keywords.KeywordSegment.from_texts(
        ["mice"] * 3000 + ["café naïve runner", "naïve runner runner", "café café", "runner"])]
    for query in ("café naïve runner", "runner café", "naïve"):
        for k in (1, 3, 10):
            assert (keywords.search(sparse_rows, [None], query, k)
                    == keywords.search_exhaustive(sparse_rows, [None], query, k))


def test_which_segments_are_scanned_follows_their_postings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment is scanned where the query's tokens have few postings and pruned where they
    have many, in the same search."""
    scanned: list[int] = []
    original = keywords._scan_segment
    monkeypatch.setattr(keywords, "_scan_segment", lambda position, *rest: (scanned.append(position), original(position, *rest)))
    monkeypatch.setattr(keywords, "SCAN_POSTINGS", 100)
    common = ["cell protein gene"] * 400  # 1,200 postings of the query's tokens
    rare = ["cell"] + ["mice"] * 399  # 1 posting
    segments = [keywords.KeywordSegment.from_texts(common), keywords.KeywordSegment.from_texts(rare)]
    k = 450  # more than the first segment holds: the second is searched, not skipped by bounds
    hits = keywords.search(segments, [None, None], "cell protein gene", k)
    assert scanned == [1]
    assert hits == keywords.search_exhaustive(segments, [None, None], "cell protein gene", k)


def test_live_masks_exclude_rows_without_changing_scores() -> None:
    texts = synthetic_texts(600, seed=8)
    segments = split(texts, 3)
    query = "protein cancer expression kinase"
    full = keywords.search(segments, [None] * 3, query, 50)
    banned = {(s, r) for s, r, _ in full[::2]}
    live = [np.ones(s.rows, bool) for s in segments]
    for s, r in banned:
        live[s][r] = False
    masked = keywords.search(segments, live, query, 50)
    assert not banned & {(s, r) for s, r, _ in masked}
    scores = {(s, r): score for s, r, score in full}
    for s, r, score in masked:
        if (s, r) in scores:
            assert score == scores[(s, r)]
    # A filter that leaves fewer than k rows returns just those rows.
    only = [np.zeros(s.rows, bool) for s in segments]
    s0, r0, _ = full[1]
    only[s0][r0] = True
    assert [(s, r) for s, r, _ in keywords.search(segments, only, query, 10)] == [(s0, r0)]
    nothing = [np.zeros(s.rows, bool) for s in segments]
    assert keywords.search(segments, nothing, query, 10) == []


@pytest.mark.parametrize("deleted", ["some", "none", "mixed"])
def test_merge_equals_fresh_write(tmp_path: Path, deleted: str) -> None:
    # "none" is the usual merge (every posting kept, renumbered without a remap table)
    texts = synthetic_texts(900, seed=9)
    folders = []
    for i, (a, b) in enumerate([(0, 300), (300, 700), (700, 900)]):
        folder = tmp_path / f"s{i}"
        folder.mkdir()
        keywords.write_keyword_index(folder, texts[a:b])
        folders.append((folder, a))
    segments = [keywords.KeywordSegment.open(f) for f, _ in folders]
    rng = np.random.default_rng(10)
    kept = [np.sort(rng.choice(s.rows, size=s.rows // 2, replace=False)) for s in segments]
    if deleted == "none":
        kept = [np.arange(s.rows) for s in segments]
    else:
        kept[2] = np.zeros(0, np.int64)  # a part losing every row
    if deleted == "mixed":
        kept[1] = np.arange(segments[1].rows)
    merged_dir, fresh_dir = tmp_path / "merged", tmp_path / "fresh"
    merged_dir.mkdir()
    fresh_dir.mkdir()
    keywords.merge_keyword_indexes(merged_dir, list(zip(segments, kept, strict=True)))
    kept_texts = [
        texts[base + int(r)] for (_, base), rows in zip(folders, kept, strict=True) for r in rows
    ]
    keywords.write_keyword_index(fresh_dir, kept_texts)
    for name in keywords.KEYWORD_FILES:
        assert (merged_dir / name).read_bytes() == (fresh_dir / name).read_bytes(), name
    merged = keywords.KeywordSegment.open(merged_dir)
    fresh = keywords.KeywordSegment.open(fresh_dir)
    for query in synthetic_queries(20, seed=11):
        assert keywords.search([merged], [None], query, 10) == keywords.search(
            [fresh], [None], query, 10
        )


HOSTILE = [
    '"unbalanced quote',
    "prote* AND cancer OR NOT",
    "NEAR(cell gene, 2)",
    "-cancer +gene text:cell ^ {col}:x",
    "nul\x00byte\x00protein",
    "emoji 🧬🔬 cell 👩‍🔬",
    "lone surrogate \ud800 cell",
    "x" * 5000,
    "protein " * 1000,
    "the and of a to in",
    "",
    "   \t\n ",
    "foo_bar ver1.1 café naïve",
]


def test_hostile_queries_do_not_raise() -> None:
    segments = split(synthetic_texts(300, seed=12), 2)
    for query in HOSTILE:
        keywords.search(segments, [None, None], query, 10)
    assert keywords.search(segments, [None, None], "the and of a to in", 10) == []
    assert keywords.search(segments, [None, None], "protein", 0) == []
    assert keywords.search(segments, [None, None], "protein", 10)


def test_edge_texts_write_and_open(tmp_path: Path) -> None:
    for i, texts in enumerate(
        [[], [""], ["", "", ""], ["protein " * 20_000, "🧬 \x00 cell", "naïve CAFÉ \ud800"]]
    ):
        folder = tmp_path / str(i)
        folder.mkdir()
        keywords.write_keyword_index(folder, texts)
        assert sorted(p.name for p in folder.iterdir()) == sorted(keywords.KEYWORD_FILES)
        segment = keywords.KeywordSegment.open(folder)
        assert segment.rows == len(texts)
        hits = keywords.search([segment], [None], "protein cafe naive cell", 5)
        if i == 3:
            assert {r for _, r, _ in hits} == {0, 1, 2}
            assert segment.total_tokens == 20_000 + 2 + 2
        else:
            assert hits == []


def test_open_maps_postings_instead_of_reading_them(tmp_path: Path) -> None:
    keywords.write_keyword_index(tmp_path, synthetic_texts(2000, seed=13))
    segment = keywords.KeywordSegment.open(tmp_path)
    for array in (segment.docs, segment.tfs, segment.doclen, segment.post_offsets):
        base = array
        while base.base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap), "postings were read, not mapped"
        assert not array.flags.writeable


def test_query_tokens_count_once_per_term() -> None:
    # "running" and "runs" both stem to "run": FTS5 sums the two phrases, so must we.
    assert keywords.analyse_query("running runs the Running")["run"] == 2
    assert keywords.query_terms("The cells AND cells") == sparse.query_terms("The cells AND cells")


@pytest.mark.parametrize(
    ("query", "expected_row"),
    [("İstanbul", 0), ("nai\u0308ve", 1), ("naïve", 1), ("istanbul", 0), ("q\u0307uery", 3), ("query", 3)],
)
def test_a_query_with_the_documents_own_word_finds_it_whatever_its_combining_marks(query, expected_row):
    """Words are cut as FTS5 cuts the documents: 'İstanbul' lower-cased (an i and a combining
    dot) and an NFD 'nai\\u0308ve' were split into two terms by ``\\w`` and found nothing; so was a
    letter with a mark that has no composed form ('q\\u0307', which NFC leaves as two)."""
    docs = ["İstanbul is a city on the Bosporus", "nai\u0308ve bayes is a classifier", "Ankara is the capital",
            "the q\u0307uery word"]
    segment = keywords.KeywordSegment.from_texts(docs)
    assert [row for _, row, _ in keywords.search([segment], [None], query, 5)] == [expected_row]


def test_deleted_rows_leave_the_statistics_scores_as_a_fresh_index_of_the_live_rows() -> None:
    # they counted until merged (Lucene's rule): an updated document's old text made its own
    # words look commoner, and it ranked below where a fresh build ranks it
    texts = synthetic_texts(900, seed=21)
    segments = split(texts, 3)
    rng = np.random.default_rng(22)
    live = [rng.random(s.rows) > 0.3 for s in segments]
    deleted = [keywords.Tombstones(s, np.flatnonzero(~mask)) for s, mask in zip(segments, live, strict=True)]
    kept = [text for s_texts, mask in zip(np.array_split(np.array(texts, dtype=object), 3), live, strict=True)
            for text, alive in zip(s_texts, mask, strict=True) if alive]
    assert [s.rows for s in segments] == [len(part) for part in np.array_split(np.array(texts, dtype=object), 3)]
    fresh = [keywords.KeywordSegment.from_texts(kept)]
    conn = fts5(kept)
    for query in synthetic_queries(50, seed=23):
        got = keywords.search(segments, live, query, 20, deleted=deleted)
        assert got == keywords.search_exhaustive(segments, live, query, 20, deleted=deleted)
        assert sorted(score for *_, score in got) == pytest.approx(
            sorted(score for *_, score in keywords.search(fresh, [None], query, 20)), rel=1e-9)
        if not any("_" in term for term in keywords.query_terms(query)):
            assert sorted(score for *_, score in got) == pytest.approx(
                sorted(score for _, score in sparse.search(conn, query, 20)), rel=1e-5)


FOLDED_DOCS = [
    unicodedata.normalize("NFD", "한국어 문서 검색 시스템"),  # Hangul as macOS writes it: jamo
    "The quarterly \ufb01nancial report of the o\ufb03ce",  # a PDF's ligatures
    "Part number ＡＢＣ１２３ in full-width letters",
    "The docu\u00admentation of the tele\u00adscope",  # HTML's &shy;
    "A super\u200dconductor and a word\u2060joiner",
    "ภาษา\u200bไทย",  # a zero-width space ends a word
    "Bread recipes for beginners",
    "Add ½ teaspoon of salt to the CO₂ flask",
    "Use 1 teaspoon of vanilla and 2 eggs",
]


@pytest.mark.parametrize(
    ("query", "expected_row"),
    [("한국어 검색", 0), (unicodedata.normalize("NFD", "한국어"), 0), ("financial office", 1), ("\ufb01nancial", 1),
     ("ABC123", 2), ("ＡＢＣ１２３", 2), ("documentation telescope", 3), ("tele\u00adscope", 3),
     ("superconductor", 4), ("wordjoiner", 4), ("ไทย", 5), ("½", 7), ("CO₂", 7)],
)
def test_a_word_is_found_whatever_its_compatibility_form_or_the_format_characters_inside_it(query, expected_row):
    """Documents were tokenized as written and queries NFC-composed only: an NFD Korean document
    was not found even by its own bytes, and a PDF's "ﬁ" ligature, a full-width word, a soft
    hyphen or a joiner inside a word hid it from keyword search. Fractions, circled numbers and
    super/subscripts keep their form: NFKC made "½" the digits 1 and 2, found in any text with them."""
    segment = keywords.KeywordSegment.from_texts(FOLDED_DOCS)
    assert [row for _, row, _ in keywords.search([segment], [None], query, 5)] == [expected_row]


def test_the_characters_dropped_and_kept_are_found_in_every_block_that_holds_them() -> None:
    every = {cp for cp in range(0x110000) if unicodedata.category(chr(cp)) == "Cf"}
    assert set(sparse._ignorable()) == every - {0x200B}  # all format characters but the ZW space
    kept = {cp for cp in range(0x110000) if unicodedata.decomposition(chr(cp)).startswith(sparse._KEPT_FORMS)}
    assert set(sparse._kept_forms()) == kept
    assert sparse.fold_text("plain ascii, kept as is") == "plain ascii, kept as is"
