"""Metadata filters: every operator and AND/OR/NOT nesting against a brute-force evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from indexes_fixtures import ENCODER, make_nodes, new_store, reference_match, unit_rows
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from indexes import FaissVectorStore, UnsupportedFilterError
from indexes.docstore import NodeStore

DIM = 16
N = 600
LANGS = ["en", "de", "fr", "es"]


def metadata_rows() -> list[dict]:
    """Varied metadata: ints, floats, strings, missing keys, nulls, lists, booleans."""
    rng = np.random.default_rng(42)
    rows = []
    for i in range(N):
        row = {
            "year": int(rng.integers(1990, 2025)),
            "score": round(float(rng.random()), 3),
            "lang": LANGS[i % 4],
        }
        if i % 7 == 0:
            del row["lang"]  # missing key
        if i % 11 == 0:
            row["score"] = None  # explicit null
        if i % 13 == 0:
            row["year"] = str(row["year"])  # a string where others hold numbers
        if i % 17 == 0:
            row["tags"] = ["a", "b"]
        elif i % 19 == 0:
            row["tags"] = ["b", 3, True]
        elif i % 23 == 0:
            row["tags"] = "a"  # a scalar where others hold lists
        if i % 5 == 0:
            row["flag"] = bool(i % 2)
        rows.append(row)
    return rows


def F(key, value, op=FilterOperator.EQ) -> MetadataFilter:  # noqa: N802 - reads like a table
    return MetadataFilter(key=key, value=value, operator=op)


def group(*filters, condition=FilterCondition.AND) -> MetadataFilters:
    return MetadataFilters(filters=list(filters), condition=condition)


Op = FilterOperator
SOME_SCORE = metadata_rows()[1]["score"]
CASES = {
    "eq_str": group(F("lang", "de")),
    "eq_int": group(F("year", 2000)),
    "eq_float_vs_int": group(F("year", 2000.0)),
    "eq_str_vs_number": group(F("year", "2000")),
    "eq_bool_as_int": group(F("flag", 1)),
    "ne_str": group(F("lang", "de", Op.NE)),
    "ne_with_nulls": group(F("score", SOME_SCORE, Op.NE)),
    "in_str": group(F("lang", ["en", "fr"], Op.IN)),
    "in_int": group(F("year", [1995, 2001, 2020], Op.IN)),
    "in_mixed_types": group(F("year", ["1990", "1991"], Op.IN)),
    "nin_str": group(F("lang", ["en", "fr"], Op.NIN)),
    "nin_int": group(F("year", [1995, 2001], Op.NIN)),
    "lt": group(F("year", 2000, Op.LT)),
    "lte": group(F("year", 2000, Op.LTE)),
    "gt_float": group(F("score", 0.75, Op.GT)),
    "gte_float": group(F("score", 0.75, Op.GTE)),
    "lt_str": group(F("lang", "en", Op.LT)),
    "gt_on_list_key": group(F("tags", "a", Op.GT)),
    "contains_str": group(F("tags", "a", Op.CONTAINS)),
    "contains_number": group(F("tags", 3, Op.CONTAINS)),
    "contains_number_as_text": group(F("tags", "3", Op.CONTAINS)),
    "any": group(F("tags", ["a", "zz"], Op.ANY)),
    "any_numbers": group(F("tags", [3, 7], Op.ANY)),
    "all": group(F("tags", ["a", "b"], Op.ALL)),
    "not_contains": group(F("tags", "b", Op.CONTAINS), condition=FilterCondition.NOT),
    "missing_key": group(F("nope", 1)),
    "missing_key_ne": group(F("nope", 1, Op.NE)),
    "and": group(F("year", 2000, Op.GTE), F("lang", "en")),
    "or": group(F("year", 1992, Op.LT), F("lang", "fr"), condition=FilterCondition.OR),
    "not": group(F("lang", "en"), F("lang", "de"), condition=FilterCondition.NOT),
    "nested_and_of_or": group(
        group(F("lang", "en"), F("lang", "de"), condition=FilterCondition.OR),
        group(F("score", 0.2, Op.GT), F("score", 0.8, Op.LT)),
    ),
    "nested_or_of_and": group(
        group(F("year", 2010, Op.GT), F("lang", "es")),
        group(F("year", 1995, Op.LTE), F("score", 0.5, Op.GTE)),
        condition=FilterCondition.OR,
    ),
    "deep": group(
        F("year", 1990, Op.GT),
        group(
            F("lang", ["en", "de", "fr"], Op.NIN),
            group(F("score", 0.1, Op.LT), F("year", 2020, Op.GTE), condition=FilterCondition.OR),
            condition=FilterCondition.OR,
        ),
    ),
}


@pytest.fixture(scope="module")
def filtered_store(tmp_path_factory) -> tuple[FaissVectorStore, np.ndarray, list[dict]]:
    meta = metadata_rows()
    x = unit_rows(np.random.default_rng(0), N, DIM)
    store = new_store(tmp_path_factory.mktemp("filters"), DIM)
    store.add(make_nodes(x, metadata=meta))
    return store, x, meta


def expected_ids(meta: list[dict], filters: MetadataFilters) -> set[str]:
    return {f"n{i}" for i, row in enumerate(meta) if reference_match(row, filters)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_filter_selects_exactly_what_brute_force_selects(filtered_store, name):
    store, _, meta = filtered_store
    filters = CASES[name]
    want = expected_ids(meta, filters)
    got = {n.node_id for n in store.get_nodes(filters=filters)}
    assert got == want
    res = store.query(
        VectorStoreQuery(query_embedding=[1.0] * DIM, similarity_top_k=N, filters=filters)
    )
    assert set(res.ids) == want


@pytest.fixture(scope="module")
def segmented_store(tmp_path_factory) -> tuple[FaissVectorStore, list[dict], set[str]]:
    """The same rows committed as three segments, every ninth deleted (tombstones kept)."""
    meta = metadata_rows()
    root = tmp_path_factory.mktemp("segmented") / "index"
    store = FaissVectorStore.create(root, dim=DIM, encoder=ENCODER)
    nodes = make_nodes(unit_rows(np.random.default_rng(0), N, DIM), metadata=meta)
    for part in range(3):
        store.add(nodes[part * N // 3:(part + 1) * N // 3])
        store.persist()
    doomed = {f"n{i}" for i in range(0, N, 9)}
    store.delete_nodes(sorted(doomed))
    store.persist()
    reopened = FaissVectorStore.open(root)
    assert reopened.segment_count == 3 and all(s.deleted.size for s in reopened._segments)
    return reopened, meta, doomed


@pytest.mark.parametrize("name", sorted(CASES))
def test_filters_over_committed_segments_select_what_brute_force_selects(segmented_store, name):
    # the segments' rows are read through their metadata index, each segment's answer is
    # kept by its reader, and the keyword side masks rows by range: all three must agree
    store, meta, doomed = segmented_store
    want = expected_ids(meta, CASES[name]) - doomed
    for _ in range(2):  # the second time from the readers' kept answers
        assert {n.node_id for n in store.get_nodes(filters=CASES[name])} == want
        dense = store.query(VectorStoreQuery(query_embedding=[1.0] * DIM, similarity_top_k=N, filters=CASES[name]))
        sparse = store.query(VectorStoreQuery(query_str="text", similarity_top_k=N, filters=CASES[name],
                                              mode=VectorStoreQueryMode.SPARSE))
        assert set(dense.ids) == set(sparse.ids) == want
        store._filter_cache.clear()


def test_a_filter_reads_the_metadata_index_not_the_texts(segmented_store):
    store, _, _ = segmented_store
    rows = store._segments[0].reader.rows
    plan = rows._conn.execute("EXPLAIN QUERY PLAN SELECT faiss_id FROM nodes WHERE "
                              "json_extract(metadata, '$.lang') = 'en'").fetchall()
    assert "COVERING INDEX nodes_metadata" in str(plan)


def test_a_filters_answer_outlives_a_write_and_a_new_version(tmp_path, monkeypatch):
    # a store's filter cache is emptied by every write and a new version starts with none:
    # at 500k nodes the first filtered query after a write re-read every segment (0.9-2.2 s)
    meta = metadata_rows()
    root = tmp_path / "index"
    store = FaissVectorStore.create(root, dim=DIM, encoder=ENCODER)
    store.add(make_nodes(unit_rows(np.random.default_rng(4), N, DIM), metadata=meta))
    store.persist()
    scans = []
    real = NodeStore.select_faiss_ids

    def counted(self, *args, **kwargs):
        scans.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(NodeStore, "select_faiss_ids", counted)
    query = VectorStoreQuery(query_embedding=[1.0] * DIM, similarity_top_k=N, filters=CASES["eq_str"])
    first = set(store.query(query).ids)
    segment_rows = store._segments[0].reader.rows
    assert scans.count(segment_rows) == 1
    extra = make_nodes(unit_rows(np.random.default_rng(5), 1, DIM), prefix="new", metadata=[{"lang": "de"}])
    store.add(extra)
    assert set(store.query(query).ids) == first | {"new0"}  # the pending row is read, the segment is not
    store.persist()
    newer = FaissVectorStore.open(root)
    assert set(newer.query(query).ids) == first | {"new0"}
    assert scans.count(segment_rows) == 1


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq"])
@pytest.mark.parametrize("threshold", [0, 100_000], ids=["selector", "exact-subset"])
def test_filtered_top_k_equals_exact_top_k_over_the_allowed_set(tmp_path, kind, threshold):
    meta = metadata_rows()
    x = unit_rows(np.random.default_rng(1), N, DIM)
    store = new_store(tmp_path, DIM, index_kind=kind, params={"exact_filter_threshold": threshold})
    store.add(make_nodes(x, metadata=meta))
    queries = unit_rows(np.random.default_rng(2), 10, DIM)
    for name in ["eq_str", "or", "nested_or_of_and", "lt"]:
        allowed = sorted(int(n[1:]) for n in expected_ids(meta, CASES[name]))
        recalls = []
        for q in queries:
            res = store.query(
                VectorStoreQuery(
                    query_embedding=q.tolist(), similarity_top_k=10, filters=CASES[name]
                )
            )
            assert set(res.ids) <= {f"n{i}" for i in allowed}
            assert len(res.ids) == min(10, len(allowed))
            truth = np.array(allowed)[np.argsort(-(x[allowed] @ q))[:10]]
            recalls.append(len({f"n{i}" for i in truth} & set(res.ids)) / len(truth))
        assert np.mean(recalls) >= 0.9 if kind != "flat" else np.mean(recalls) == 1.0


def test_filters_combine_with_node_ids_and_doc_ids(filtered_store):
    store, _, meta = filtered_store
    res = store.query(
        VectorStoreQuery(
            query_embedding=[1.0] * DIM,
            similarity_top_k=N,
            node_ids=[f"n{i}" for i in range(100)],
            filters=CASES["eq_str"],
        )
    )
    want = {n for n in expected_ids(meta, CASES["eq_str"]) if int(n[1:]) < 100}
    assert set(res.ids) == want


def test_deleted_nodes_never_match_a_filter(tmp_path):
    meta = metadata_rows()
    store = new_store(tmp_path, DIM, index_kind="hnsw", params={"exact_filter_threshold": 0})
    store.add(make_nodes(unit_rows(np.random.default_rng(3), N, DIM), metadata=meta))
    doomed = sorted(expected_ids(meta, CASES["eq_str"]))[:20]
    store.delete_nodes(doomed)
    res = store.query(
        VectorStoreQuery(query_embedding=[1.0] * DIM, similarity_top_k=N, filters=CASES["eq_str"])
    )
    assert set(res.ids) == expected_ids(meta, CASES["eq_str"]) - set(doomed)


@pytest.mark.parametrize(
    "bad",
    [
        group(F("tags", "a", Op.ANY)),
        group(F("tags", ["a"], Op.CONTAINS)),
        group(F("lang", "e", Op.TEXT_MATCH)),
        group(F("lang", ["en"], Op.EQ)),
        group(F("lang", "en", Op.IN)),
        group(F('we"ird', 1)),
    ],
    ids=["any_scalar", "contains_list", "text_match", "eq_list", "in_scalar", "quote_in_key"],
)
def test_unsupported_filters_raise_a_clear_error(filtered_store, bad):
    store, _, _ = filtered_store
    with pytest.raises(UnsupportedFilterError):
        store.query(VectorStoreQuery(query_embedding=[1.0] * DIM, similarity_top_k=3, filters=bad))


@pytest.mark.parametrize("key", ["dir\\path", "a\tb", "line\nbreak", "bell\x07", "a/b", "é.ü"])
def test_a_key_json_escapes_is_found_by_its_filters(tmp_path, key):
    # A backslash, tab, newline or control character in a key is escaped in the stored JSON;
    # the path named it raw, so == found nothing and != every row, without an error
    store = FaissVectorStore.create(tmp_path / "index", dim=DIM, encoder=ENCODER)
    store.add(make_nodes(unit_rows(np.random.default_rng(8), 3, DIM),
                         metadata=[{key: "x"}, {key: "y"}, {"other": "x"}]))
    store.persist()
    equal = FaissVectorStore.open(tmp_path / "index").get_nodes(filters=group(F(key, "x")))
    assert [node.metadata for node in equal] == [{key: "x"}]
    unequal = store.get_nodes(filters=group(F(key, "x", Op.NE)))
    assert sorted(node.metadata.get(key, "-") for node in unequal) == ["-", "y"]


@pytest.mark.parametrize("asked_first", [float("inf"), float("nan"), None])
def test_filters_with_values_json_writes_alike_are_answered_apart(tmp_path, asked_first):
    # inf, -inf, NaN and None were one cache key (their JSON is null): with answers kept per
    # segment across stores, x < -inf returned x < inf's rows and deleting by it deleted all
    root = tmp_path / "index"
    store = FaissVectorStore.create(root, dim=DIM, encoder=ENCODER)
    store.add(make_nodes(unit_rows(np.random.default_rng(6), 5, DIM), metadata=[{"x": i} for i in range(5)]))
    store.persist()
    first = F("x", asked_first, Op.LT) if asked_first is not None else F("x", 0, Op.GTE)
    store.get_nodes(filters=group(first))
    reopened = FaissVectorStore.open(root)
    below_everything = group(F("x", float("-inf"), Op.LT))
    assert reopened.get_nodes(filters=below_everything) == []
    reopened.delete_nodes(filters=below_everything)
    assert reopened.count == 5


@pytest.mark.parametrize("condition", [FilterCondition.OR, FilterCondition.AND, FilterCondition.NOT])
def test_a_group_of_two_thousand_conditions_is_answered_like_a_small_one(filtered_store, condition):
    """An app filtering by a long list of allowed values: a flat chain of 999 ORs was over
    SQLite's expression depth ("Expression tree is too large"), which the service took for a
    damaged index (503, "put the file back from a backup")."""
    store, _, meta = filtered_store
    years = [1990 + i % 40 for i in range(2000)] if condition != FilterCondition.AND else [2000] * 2000
    filters = group(*[F("year", y) for y in years], condition=condition)
    want = expected_ids(meta, filters)
    assert want  # the filter selects something, and not everything
    assert want != {f"n{i}" for i in range(N)}
    assert {n.node_id for n in store.get_nodes(filters=filters)} == want
    tags = group(F("tags", [f"t{i}" for i in range(1500)] + ["a"], FilterOperator.ANY))
    assert {n.node_id for n in store.get_nodes(filters=tags)} == expected_ids(meta, tags)


def test_groups_nested_past_the_limit_are_a_usage_error_and_within_it_answered(filtered_store):
    from indexes.filters import MAX_DEPTH

    store, _, meta = filtered_store
    nested = group(F("lang", "en"))
    for _ in range(MAX_DEPTH - 1):  # MAX_DEPTH groups in all
        nested = group(nested, F("lang", "fr"), condition=FilterCondition.OR)
    assert {n.node_id for n in store.get_nodes(filters=nested)} == expected_ids(meta, nested)
    with pytest.raises(UnsupportedFilterError, match="nest more than"):
        store.get_nodes(filters=group(nested))


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**40])
@pytest.mark.parametrize("op", [FilterOperator.LT, FilterOperator.EQ, FilterOperator.CONTAINS, FilterOperator.ANY])
def test_an_integer_past_64_bits_is_a_usage_error_not_a_crash(filtered_store, value, op):
    store, _, _ = filtered_store
    bad = group(F("year", [value] if op == FilterOperator.ANY else value, op))
    with pytest.raises(UnsupportedFilterError, match="64-bit"):
        store.query(VectorStoreQuery(query_embedding=[1.0] * DIM, similarity_top_k=3, filters=bad))
    # the float of that size is the way to say it
    if op == FilterOperator.LT:
        ok = group(F("year", float(value), op))
        store.query(VectorStoreQuery(query_embedding=[1.0] * DIM, similarity_top_k=3, filters=ok))


def test_a_filter_binding_more_values_than_sqlite_takes_is_a_usage_error(filtered_store):
    store, _, _ = filtered_store
    with pytest.raises(UnsupportedFilterError, match="single IN condition"):
        store.get_nodes(filters=group(*[F("year", 1990 + i) for i in range(10_001)], condition=FilterCondition.OR))
