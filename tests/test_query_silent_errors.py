"""Query-side answers that used to be silently wrong while reporting success: short ANN
results, empty id restrictions, zero-weight fusion padding, ties, the retriever's fusion
setting and numeric-looking CLI filter values. Each test failed before its fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from indexes_fixtures import ENCODER, HashingEmbedding, make_nodes
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from indexes import FaissVectorStore, keywords, kinds

_EMB = HashingEmbedding()


def _text_nodes(prefix: str, texts: list[str], metadata: list[dict] | None = None) -> list[TextNode]:
    return [
        TextNode(id_=f"{prefix}{i}", text=t, embedding=_EMB._vector(t), metadata=(metadata or [{}] * len(texts))[i])
        for i, t in enumerate(texts)
    ]


# ---------------------------------------------------------------------------------------------
# 1. An unfiltered dense query on an IVF segment (with or without tombstones) came back short.


def _ivf_store(tmp_path: Path, base: np.ndarray) -> FaissVectorStore:
    store = FaissVectorStore.create(tmp_path / "idx", dim=base.shape[1], encoder=ENCODER,
                                    params={"auto_ivf_rows": 2000})
    store.add(make_nodes(base))
    store.compact(everything=True)  # one segment of 2,500 rows: kind auto makes it IVF
    assert store.segment_summary()[0]["structure"] == "IndexIVFFlat"
    return store


def test_unfiltered_dense_search_on_an_ivf_segment_with_tombstones_returns_k_live_hits(tmp_path, mixture):
    base, queries = mixture
    store = _ivf_store(tmp_path, base[:2500])
    # Delete most rows (a re-ingest that replaced most documents; not compacted yet).
    store.delete_nodes([f"n{i}" for i in range(2500) if i % 10])
    assert store.count == 250
    everything = MetadataFilters(filters=[MetadataFilter(key="i", value=-1, operator=FilterOperator.GT)])
    filtered = store.retrieve("dense", 50, embedding=queries[0], filters=everything)
    plain = store.retrieve("dense", 50, embedding=queries[0])
    assert len(filtered) == 50  # a filter admitting every row: complete (exact redo when short)
    # No filter at all: only the live rows of the nprobe lists probed come back (10 of 50).
    assert len(plain) == 50


def test_unfiltered_dense_search_on_an_ivf_segment_returns_k_when_it_holds_more(tmp_path, mixture, monkeypatch):
    from indexes.vectors import VectorIndex

    base, queries = mixture
    store = _ivf_store(tmp_path, base[:2500])

    def exact(*args, **kwargs):
        raise AssertionError("a short answer was redone exactly instead of with a wider probe")

    monkeypatch.setattr(VectorIndex, "exact_search", exact)  # widening the probe is enough here
    # The stored probe alone, as before probes were sized for k: the widening fallback.
    monkeypatch.setattr(kinds, "PROBED_ROWS_PER_HIT", 0)
    # k=100: the service's largest top_k, and the dense depth every hybrid query fuses.
    counts = [len(store.retrieve("dense", 100, embedding=q)) for q in queries[:20]]
    # [100, 46, 100, 80, 100, 43, ...]: nprobe is calibrated for recall@10 (2 of 64 lists here),
    # and the probed lists hold fewer than k rows; a filter admitting every row returns 100.
    assert counts == [100] * 20, counts


def test_a_deep_dense_search_probes_enough_lists_in_one_search(tmp_path, mixture, monkeypatch):
    """A top-100 search probes lists expected to hold 2 x 100 rows from the start, instead of
    the probe calibrated for top 10 followed by a second, 4x wider search when short."""
    base, queries = mixture
    store = _ivf_store(tmp_path, base[:2500])
    calls = []
    original = kinds.search_parameters
    monkeypatch.setattr(kinds, "search_parameters", lambda *a, **kw: (calls.append(kw["nprobe"]), original(*a, **kw))[1])
    assert [len(store.retrieve("dense", 100, embedding=q)) for q in queries[:20]] == [100] * 20
    ivf = kinds.approximate_parts(store._segments[0].view.index)[0]
    wanted = kinds.probes_for(ivf, 100)
    assert ivf.nprobe < wanted == math.ceil(2 * 100 / (ivf.ntotal / ivf.nlist))
    assert calls.count(wanted) == 20 and len(calls) <= 22, calls  # widened twice at most
    calls.clear()
    store.retrieve("dense", 5, embedding=queries[0])
    assert calls == [ivf.nprobe]  # a shallow search keeps the calibrated probe


def test_a_search_among_tombstones_probes_lists_in_proportion_to_their_live_rows(tmp_path, mixture, monkeypatch):
    """With 90% of an IVF segment's rows deleted (a segment too large for the rewrite waits for
    compact), the calibrated probe's lists held a tenth of the live candidates it was tuned on:
    recall@10 0.973, top-100 0.784 (40k rows, 90% dead); probing 10x the lists gave 1.000 and 0.931."""
    base, queries = mixture
    store = _ivf_store(tmp_path, base[:2500])
    ivf = kinds.approximate_parts(store._segments[0].view.index)[0]
    calls = []
    original = kinds.search_parameters
    monkeypatch.setattr(kinds, "search_parameters", lambda *a, **kw: (calls.append(kw["nprobe"]), original(*a, **kw))[1])
    store.retrieve("dense", 5, embedding=queries[0])
    assert calls == [ivf.nprobe]  # all rows live: the calibrated probe
    store.delete_nodes([f"n{i}" for i in range(2500) if i % 10])  # 90% dead, not compacted
    calls.clear()
    store.retrieve("dense", 5, embedding=queries[0])
    assert calls[0] == min(ivf.nlist, 10 * ivf.nprobe) == kinds.probes_for(ivf, 5, 0.1)


def test_a_filtered_search_probes_lists_in_proportion_to_the_rows_it_allows(tmp_path, mixture, monkeypatch):
    """A filter allowing more rows than are searched exactly kept the probe calibrated for all
    rows, though the probed lists held only the filter's share of candidates: 2,100 allowed of
    a 20,000-row segment gave recall@10 0.935 (min 0.60), unfiltered 0.999 (a trial)."""
    base, queries = mixture
    store = FaissVectorStore.create(tmp_path / "idx", dim=base.shape[1], encoder=ENCODER,
                                    params={"auto_ivf_rows": 2000, "exact_filter_threshold": 200})
    store.add(make_nodes(base[:2500]))
    store.compact(everything=True)
    ivf = kinds.approximate_parts(store._segments[0].view.index)[0]
    calls = []
    original = kinds.search_parameters
    monkeypatch.setattr(kinds, "search_parameters", lambda *a, **kw: (calls.append(kw["nprobe"]), original(*a, **kw))[1])
    some = MetadataFilters(filters=[MetadataFilter(key="i", value=1000, operator=FilterOperator.LT)])
    store.retrieve("dense", 5, embedding=queries[0], filters=some)  # 1,000 of 2,500 rows
    assert calls == [kinds.probes_for(ivf, 5, 0.4)] and calls[0] > ivf.nprobe
    # 250 rows: the probe grown for them (20 of 64 lists) would scan 3x the rows it allows;
    # exact is cheaper, and complete (the stored probe gave recall@10 0.87 here, 20 lists 0.96).
    few = MetadataFilters(filters=[MetadataFilter(key="i", value=250, operator=FilterOperator.LT)])
    allowed = base[:250]
    hits = 0
    for q in queries[:30]:
        truth = set(np.argsort(-(allowed @ q))[:10].tolist())
        got = {int(hit.node_id[1:]) for hit, _ in store.retrieve("dense", 10, embedding=q, filters=few)}
        hits += len(truth & got)
    assert hits / 300 >= 0.97


def test_a_segment_searched_with_unsorted_repeated_allowed_ids_and_tombstones_answers_as_sorted(tmp_path, mixture):
    """The segment search skips ``np.unique`` for allowed ids that come sorted (the store's);
    any other order, repeats and tombstoned ids among them still give the same answer, and the
    kept tombstone selector follows new deletions."""
    base, queries = mixture
    store = _ivf_store(tmp_path, base[:2500])
    view = store._segments[0].view
    rng = np.random.default_rng(4)
    allowed = np.sort(rng.choice(2500, 2300, replace=False)).astype(np.int64)  # > exact_filter_threshold
    shuffled = np.concatenate([rng.permutation(allowed), allowed[:50]])
    for q in queries[:5]:
        assert np.array_equal(view.search(q[None, :], 10, shuffled)[1], view.search(q[None, :], 10, allowed)[1])
    before = [set(view.search(q[None, :], 10)[1][0]) for q in queries[:5]]
    store.delete_nodes([f"n{i}" for i in range(0, 2500, 3)])  # the tombstones change: a new selector
    view = store._segments[0].view
    dead = set(range(0, 2500, 3))  # faiss ids follow the order of adding: n{i} is id i
    assert view.count == 2500 - len(dead)
    assert store.retrieve("dense", 1, embedding=base[7])[0][0].node_id == "n7" and store.retrieve(
        "dense", 1, embedding=base[7])[0][0].faiss_id == 7
    for q, old in zip(queries[:5], before, strict=True):
        ids = view.search(q[None, :], 10)[1][0]
        assert len(ids) == 10 and not dead & set(ids.tolist())
        assert not dead & set(view.search(q[None, :], 10, allowed)[1][0].tolist())
        assert old - dead <= set(ids.tolist())  # the live hits of before are still found


def test_the_probe_grows_with_the_inverse_of_the_searchable_share():
    class Ivf:  # 64 lists of 40 rows, calibrated probe 2
        nprobe, nlist, ntotal = 2, 64, 2560

    assert [kinds.probes_for(Ivf, 10, share) for share in (1.0, 0.5, 0.1, 0.0)] == [2, 4, 20, 64]
    assert kinds.probes_for(Ivf, 100, 1.0) == 5 and kinds.probes_for(Ivf, 100, 0.5) == 10  # 2 rows a hit


# ---------------------------------------------------------------------------------------------
# 2. An empty node_ids / doc_ids restriction in retrieve() allows nothing.


@pytest.fixture()
def small_store(tmp_path: Path) -> FaissVectorStore:
    store = FaissVectorStore.create(tmp_path / "idx", dim=_EMB.dim, encoder=ENCODER)
    store.add(_text_nodes("a", ["apple pie", "banana bread", "cherry tart"]))
    store.persist()
    return store


@pytest.mark.parametrize("field", ["node_ids", "doc_ids"])
def test_an_empty_id_restriction_allows_nothing(small_store, field):
    """``retrieve(node_ids=[])`` allows no node, as ``search`` does (it used to mean 'all')."""
    assert small_store.retrieve("sparse", 3, text="apple", **{field: []}) == []
    assert small_store.retrieve("dense", 3, embedding=_EMB._vector("apple"), **{field: []}) == []


def test_the_llamaindex_adapter_reads_an_empty_node_id_list_as_llamaindex_sends_it(small_store):
    """LlamaIndex's retriever sends ``node_ids=[]`` for every store that keeps the text (its
    own node list is then empty): no restriction there; ``doc_ids=[]`` still allows nothing."""
    vector = _EMB._vector("apple")
    query = VectorStoreQuery(query_embedding=vector, similarity_top_k=3, node_ids=[])
    assert len(small_store.query(query).ids) == 3
    query = VectorStoreQuery(query_embedding=vector, similarity_top_k=3, doc_ids=[])
    assert small_store.query(query).ids == []


def test_batch_search_and_retrieve_agree_on_an_empty_node_id_list(small_store):
    vector = _EMB._vector("apple")
    assert small_store.search([vector], 3, node_ids=[]) == [[]]  # holds today
    assert small_store.retrieve("dense", 3, embedding=vector, node_ids=[]) == []


# ---------------------------------------------------------------------------------------------
# 3. Ties: top-k was not a prefix of top-(k+n); the pruned engine kept other tied rows than it
#    ranked first, and than search_exhaustive (its documented reference) kept.


def test_keyword_top_1_is_the_first_hit_of_top_8_when_scores_tie(tmp_path):
    store = FaissVectorStore.create(tmp_path / "idx", dim=_EMB.dim, encoder=ENCODER)
    store.add(_text_nodes("a", ["apple pie recipe"] * 3 + ["banana"] * 2))
    store.persist()
    store.add(_text_nodes("b", ["apple pie recipe"] * 3 + ["banana"] * 20))
    store.persist()
    store.add(_text_nodes("c", ["apple pie recipe"] * 2))  # pending rows
    top8 = [row.node_id for row, _ in store.retrieve("sparse", 8, text="apple")]
    for k in (1, 2, 3):
        topk = [row.node_id for row, _ in store.retrieve("sparse", k, text="apple")]
        assert topk == top8[:k], (k, topk, top8)  # k=1 gives ['b0'], top8 starts with 'c0'


def test_dense_ties_come_oldest_first_whichever_segments_or_pending_rows_hold_them(tmp_path):
    """Identical vectors (duplicated chunks) in two segments and the pending rows: pending rows
    and earlier segments won ties, FAISS returned a segment's ties newest first, so top-3 was
    not the start of top-12 and changed with a flush or a merge."""
    from indexes import MergePolicy

    vector = np.ones(_EMB.dim, np.float32) / np.sqrt(_EMB.dim)
    store = FaissVectorStore.create(tmp_path / "idx", dim=_EMB.dim, encoder=ENCODER, index_kind="flat",
                                    merge_policy=MergePolicy(segments_per_level=100))

    def add(prefix: str) -> None:
        store.add([TextNode(id_=f"{prefix}{i}", text="same", embedding=vector.tolist()) for i in range(4)])

    def ranked(k: int) -> list[int]:
        return [row.faiss_id for row, _ in store.retrieve("dense", k, embedding=vector)]

    add("a")
    store.persist()
    add("b")
    store.persist()
    add("c")  # pending rows, the newest
    layouts = []
    for change in (lambda: None, store.persist, lambda: store.compact(everything=True)):
        change()
        layouts.append([ranked(k) for k in (3, 12)])
    assert layouts == [[[0, 1, 2], list(range(12))]] * 3


def test_pruned_keyword_search_keeps_the_same_tied_rows_as_the_exhaustive_reference():
    segments = [keywords.KeywordSegment.from_texts(["apple pie", "banana"] * 3 + ["x"] * n) for n in (0, 5, 50)]
    live = [None] * 3
    for k in range(1, 9):
        pruned = keywords.search(segments, live, "apple", k)
        exhaustive = keywords.search_exhaustive(segments, live, "apple", k)
        assert pruned == exhaustive, k


# ---------------------------------------------------------------------------------------------
# 4. Hybrid with alpha=0 ("keywords only") padded with dense-only candidates at score 0, in faiss
#    id order rather than by any ranking.


def test_hybrid_with_alpha_0_returns_only_keyword_matches(tmp_path):
    store = FaissVectorStore.create(tmp_path / "idx", dim=_EMB.dim, encoder=ENCODER)
    texts = ["zebra crossing", "zebra stripes"] + [f"filler number {i} about apples" for i in range(10)]
    store.add(_text_nodes("n", texts))
    embedding = _EMB._vector("filler number 9 about apples")  # densely closest: n11
    hybrid = store.retrieve("hybrid", 5, embedding=embedding, text="zebra", alpha=0.0)
    sparse = store.retrieve("sparse", 5, text="zebra")
    # Got n0, n1 (1.0) then n2, n3, n4 at 0.0: padding in faiss-id order, not even dense order.
    assert [r.node_id for r, _ in hybrid] == [r.node_id for r, _ in sparse], [(r.node_id, s) for r, s in hybrid]


# ---------------------------------------------------------------------------------------------
# 5. as_retriever(vector_store_kwargs=...) dropped the index's configured fusion method.


def test_as_retriever_with_vector_store_kwargs_keeps_the_index_fusion(index_dir, embedding):
    from pipeline_helpers import settings_for

    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding, fusion="rrf"), embedding=embedding)
    query = "the cat in the sea"
    searched = [(h["node_id"], round(h["score"], 6)) for h in index.search(query, 3, mode="hybrid")]
    retriever = index.as_retriever(similarity_top_k=3, vector_store_query_mode="hybrid",
                                   vector_store_kwargs={"nprobe": 4})
    got = [(h.node.node_id, round(h.score, 6)) for h in retriever.retrieve(query)]
    assert got == searched  # convex scores come back: the rrf setting was silently replaced


@pytest.mark.parametrize("blank", ["", "   "])
def test_the_retriever_refuses_an_empty_dense_query_as_every_other_path_does(index_dir, embedding, blank):
    """An empty query reached the store unembedded and was answered [] with a log line; the
    API, the CLI and HTTP refuse it."""
    from pipeline_helpers import settings_for

    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    with pytest.raises(ValueError, match="empty"):
        index.as_retriever(vector_store_query_mode="default").retrieve(blank)
    store = index.store
    with pytest.raises(ValueError, match="needs query_embedding"):
        store.query(VectorStoreQuery(query_embedding=None, similarity_top_k=2))


# ---------------------------------------------------------------------------------------------
# 6. The CLI's filter parser turned a numeric-looking value into a number, so string metadata
#    such as a title "1984" could never be matched with --filter title=1984 (0 results, exit 0).


def test_cli_filter_on_a_numeric_looking_string_value_finds_the_node(tmp_path):
    from htp_cli.main import _parse_filters

    store = FaissVectorStore.create(tmp_path / "idx", dim=_EMB.dim, encoder=ENCODER)
    store.add(_text_nodes("b", ["a novel by orwell", "another novel"], [{"title": "1984"}, {"title": "Emma"}]))
    filters = _parse_filters(["title=1984"])
    hits = store.retrieve("sparse", 5, text="novel", filters=filters)
    assert [row.node_id for row, _ in hits] == ["b0"]


def test_cli_filter_on_a_number_still_matches_numbers_and_not_equal_excludes_both(tmp_path):
    from htp_cli.main import _parse_filters

    store = FaissVectorStore.create(tmp_path / "idx", dim=_EMB.dim, encoder=ENCODER)
    store.add(_text_nodes("b", ["novel one", "novel two", "novel three"],
                          [{"year": 1984}, {"year": "1984"}, {"year": 2001}]))
    ids = lambda f: sorted(r.node_id for r, _ in store.retrieve("sparse", 5, text="novel", filters=_parse_filters(f)))  # noqa: E731
    assert ids(["year=1984"]) == ["b0", "b1"]
    assert ids(["year!=1984"]) == ["b2"]
    assert ids(["year>2000"]) == ["b2"]
    assert ids(['year="1984"']) == ["b1"]


def test_cli_filter_on_a_long_digit_id_or_with_spaces_finds_what_it_names(tmp_path):
    # A 24-digit id stored as text was refused as "outside the 64-bit integers" (its numeric
    # half); "s = a" looked for " a" and found nothing, exit 0
    from htp_cli.main import _parse_filters

    store = FaissVectorStore.create(tmp_path / "idx", dim=_EMB.dim, encoder=ENCODER)
    big = 123456789012345678901234
    store.add(_text_nodes("b", ["novel one", "novel two", "novel three"],
                          [{"oid": str(big), "s": "a"}, {"oid": big, "s": " a"}, {"oid": 7, "s": "b"}]))
    ids = lambda f: sorted(r.node_id for r, _ in store.retrieve("sparse", 5, text="novel", filters=_parse_filters(f)))  # noqa: E731
    assert ids([f"oid={big}"]) == ["b0", "b1"]
    assert ids([f"oid!={big}"]) == ["b2"]
    assert ids(["s = a"]) == ["b0"]
    assert ids(['s=" a"']) == ["b1"]
    store.add(_text_nodes("c", ["novel four"], [{"obj": json.dumps({"a": 1, "b": "x"}, sort_keys=True)}]))
    assert ids(['obj={"b": "x", "a": 1}']) == ["c0"]  # an object is kept as its JSON text


# ---------------------------------------------------------------------------------------------
# Trial of the Python API (stop 45): inputs the CLI and the service refuse, the LlamaIndex
# paths took without a word.
def test_a_sparse_retriever_refuses_an_invisible_query_as_the_other_modes_do(index_dir, embedding):
    from pipeline_helpers import settings_for

    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    with pytest.raises(ValueError, match="needs query_str .* with a visible character"):
        index.as_retriever(vector_store_query_mode="sparse").retrieve("\u200b")


def test_a_retriever_given_rerank_refuses_it_instead_of_returning_unreranked_hits(index_dir, embedding):
    from pipeline_helpers import settings_for

    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    with pytest.raises(TypeError, match="does not rerank: pass rerank= to as_query_engine"):
        index.as_retriever(similarity_top_k=3, rerank=True)


@pytest.mark.parametrize("filters", [{"file_type": "md"}, []])
def test_filters_that_are_not_metadata_filters_are_refused_by_name(index_dir, embedding, filters):
    """A dict failed deep inside with "'dict' object has no attribute 'filters'"."""
    from pipeline_helpers import settings_for

    from indexes import UnsupportedFilterError
    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    with pytest.raises(UnsupportedFilterError, match="filters must be LlamaIndex MetadataFilters"):
        index.search("the cat", 3, filters=filters)


@pytest.mark.parametrize("text", ["\u200b\u200b", "   \n "])
def test_inserting_a_document_without_visible_text_is_refused_as_ingest_refuses_it(index_dir, embedding, text):
    """Inserted, a zero-width document became a node every query could rank; whitespace
    returned without storing anything and without a word."""
    from llama_index.core import Document as LlamaDocument
    from pipeline_helpers import settings_for

    from pipelines.errors import DocumentRejected
    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    before = index.store.count
    with pytest.raises(DocumentRejected, match="document 'zw' is empty"):
        index.as_index().insert(LlamaDocument(text=text, id_="zw"))
    assert index.store.count == before


# ---------------------------------------------------------------------------------------------
# Trial of query semantics at the edges (stop 49).
def test_fused_ranking_above_the_window_does_not_move_when_more_results_are_asked():
    """Each side is normalised by its top `CANDIDATES` window: a list deepened for a larger k
    (160 instead of 100) lowered the sparse side's bottom score and reordered the first ten."""
    from indexes import fusion

    rng = np.random.default_rng(7)
    dense = sorted(((i, float(s)) for i, s in enumerate(rng.uniform(0.2, 0.9, 400))), key=lambda h: -h[1])
    sparse = sorted(((int(i), float(s)) for i, s in zip(rng.permutation(400), rng.exponential(3.0, 400), strict=True)),
                    key=lambda h: -h[1])
    for method in ("convex", "rrf"):
        window = fusion.fuse(dense[:100], sparse[:100], method=method)
        for depth in (101, 160, 400):
            deeper = fusion.fuse(dense[:depth], sparse[:depth], method=method)
            assert deeper[: len(window)] == window, (method, depth)  # scores included
            assert len(deeper) > len(window) or depth == 101
            assert all(a[1] >= b[1] for a, b in zip(deeper, deeper[1:], strict=False))  # scores never rise
    # without windows (a caller's choice) the whole lists count, as before
    assert fusion.fuse(dense, sparse, dense_window=None, sparse_window=None)[:10] != fusion.fuse(dense, sparse)[:10]


def test_hybrid_top_hits_are_the_same_for_any_k_past_the_fusion_window(tmp_path):
    store = FaissVectorStore.create(tmp_path / "idx", dim=_EMB.dim, encoder=ENCODER)
    rng = np.random.default_rng(3)
    words = "red train quick station bridge river engine track signal yard".split()
    store.add(_text_nodes("r", [" ".join(rng.choice(words, 6)) for _ in range(260)]))
    store.persist()
    text = "quick red train"

    def top(k: int) -> list[tuple[str, float]]:
        return [(row.node_id, score) for row, score in
                store.retrieve("hybrid", k, embedding=_EMB._vector(text), text=text)]

    first = top(10)
    for k in (100, 101, 160, 260):
        assert top(k)[:10] == first, k


def test_numpy_integers_are_counts_in_every_mode(small_store):
    """``np.int64(3)`` passed the k check and reached FAISS, whose wrapper refused it (dense,
    and hybrid past the fusion window)."""
    vector = _EMB._vector("apple")
    for mode, k in (("dense", 3), ("hybrid", 3), ("hybrid", 150), ("sparse", 3)):
        hits = small_store.retrieve(mode, np.int64(k), embedding=vector, text="apple pie")
        assert hits and len(hits) <= 3
    query = VectorStoreQuery(query_embedding=vector, similarity_top_k=np.int64(2))
    assert len(small_store.query(query).ids) == 2


@pytest.mark.parametrize("sparse_k", [-1, 0, 2.5, True])
def test_a_sparse_k_that_is_not_a_positive_count_is_refused(small_store, sparse_k):
    """-1 searched no keywords (hybrid answered the dense side alone), 0 meant the default, 2.5
    failed deep in numpy."""
    vector = _EMB._vector("apple")
    with pytest.raises(ValueError, match="sparse_k must be a whole number >= 1"):
        small_store.retrieve("hybrid", 3, embedding=vector, text="apple", sparse_k=sparse_k)
    query = VectorStoreQuery(query_embedding=vector, query_str="apple", similarity_top_k=3,
                             mode=VectorStoreQueryMode.HYBRID, sparse_top_k=sparse_k)
    with pytest.raises(ValueError, match="sparse_k must be"):
        small_store.query(query)


def test_a_keyword_query_holding_a_lone_surrogate_is_refused_as_every_other_path_refuses_it(small_store):
    query = VectorStoreQuery(query_str="apple \ud800", similarity_top_k=3, mode=VectorStoreQueryMode.SPARSE)
    with pytest.raises(ValueError, match="lone surrogate"):
        small_store.query(query)


def test_a_query_is_searched_as_documents_are_read_without_controls_and_soft_hyphens(index_dir, embedding):
    """Ingest drops controls and soft hyphens from every document; a query kept them, so
    "light\\u00adhouse" was embedded unlike "lighthouse" (the keyword side folds them)."""
    from pipeline_helpers import settings_for

    from pipelines.query import check_query_text, open_index

    assert check_query_text("light\u00adhouse \x00keeper\x07\t") == "lighthouse keeper\t"
    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    for mode in ("dense", "hybrid", "sparse"):
        plain = index.search("the cat sat", 3, mode=mode)
        marked = index.search("the c\u00adat\x00 sat", 3, mode=mode)
        assert [(r["node_id"], r["score"]) for r in marked] == [(r["node_id"], r["score"]) for r in plain], mode
    retriever = index.as_retriever(similarity_top_k=3)
    assert ([(n.node.node_id, n.score) for n in retriever.retrieve("the c\u00adat sat")]
            == [(n.node.node_id, n.score) for n in retriever.retrieve("the cat sat")])


# ---------------------------------------------------------------------------------------------
# Trial of the library in a long-running app (stop 49): LlamaIndex's store was reopened by
# path and version number on first use, not made from the version the OpenIndex serves.
def _ids(nodes) -> list[str]:
    return sorted(n.node.ref_doc_id for n in nodes)


def test_as_retriever_serves_the_held_version_after_retention_removed_it(tmp_path, index_dir, embedding):
    import shutil

    from pipeline_helpers import settings_for

    from pipelines.ingest import ingest
    from pipelines.query import open_index

    settings = settings_for(embedding).model_copy(update={"keep_versions": 2})
    index = open_index(index_dir, settings, embedding=embedding)
    held = index.version
    for i in range(3):  # three commits elsewhere: the held version is no longer kept
        (tmp_path / "src" / f"new{i}.txt").write_text(f"a parrot number {i} sang .", encoding="utf-8")
        ingest(tmp_path / "src", index_dir, settings, embedding=embedding)
    assert not (index_dir / "versions" / f"v{held:06d}").exists()
    found = index.as_retriever(similarity_top_k=5, vector_store_query_mode="sparse").retrieve("parrot cat")
    assert _ids(found) == ["cats.txt"]  # the held version's answer, not "corrupted"
    assert index.version == held and [r["doc_id"] for r in index.search("parrot cat", 5, mode="sparse")] == ["cats.txt"]
    # the folder replaced by another index: still one version answering, the held one
    shutil.rmtree(index_dir)
    ingest(write_docs_other(tmp_path / "other"), index_dir, settings, embedding=embedding)
    assert _ids(index.as_retriever(similarity_top_k=5, vector_store_query_mode="sparse").retrieve("cat")) == ["cats.txt"]
    # a write through the held version cannot land in the index now in its folder
    from indexes import IndexConflictError

    index.as_index().delete_ref_doc("sea.md")
    with pytest.raises(IndexConflictError, match="names files that are gone"):
        index.store.persist()
    other = open_index(index_dir, settings, embedding=embedding)
    assert sorted(r["doc_id"] for r in other.search("cat", 5, mode="sparse")) == ["cats.txt", "x.txt"]


def write_docs_other(folder):
    from pipeline_helpers import write_docs

    return write_docs(folder, {"cats.txt": "a cat of another index .", "x.txt": "cat cat cat ."})


def test_a_fresh_open_index_hands_its_own_store_to_llamaindex(index_dir, embedding):
    from pipeline_helpers import settings_for

    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    store = index.store
    adapter = index.vector_store
    assert adapter is index.store and adapter._segments is store._segments  # taken over, not reopened
    assert index.search("cat", 1, mode="sparse")[0]["doc_id"] == "cats.txt"  # search answers through it
