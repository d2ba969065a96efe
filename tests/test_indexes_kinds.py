"""Index kinds: recall against exact search, training and its fallback, deletes without removal."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from indexes_fixtures import (
    MIN_RECALL,
    exact_top_k,
    make_nodes,
    new_store,
    recall_at_k,
    unit_rows,
)
from llama_index.core.vector_stores.types import VectorStoreQuery

from indexes import FaissVectorStore, IndexTrainingError, kinds

ANN_KINDS = ["hnsw", "ivf_flat", "ivf_pq"]


def recall_of(tmp_path, kind: str, base: np.ndarray, queries: np.ndarray) -> float:
    store = new_store(tmp_path, base.shape[1], index_kind=kind)
    store.add(make_nodes(base))
    assert store.count == len(base)
    found = [[node_id for node_id, _ in hits] for hits in store.search(queries, 10)]
    return recall_at_k(
        found, exact_top_k(base, queries, 10), [f"n{i}" for i in range(len(base))], 10
    )


@pytest.mark.parametrize("kind", ANN_KINDS)
def test_recall_at_10_on_minilm_scifact_titles(tmp_path, kind, minilm_titles):
    base, queries = minilm_titles
    assert recall_of(tmp_path, kind, base, queries) >= MIN_RECALL


@pytest.mark.parametrize("kind", [*ANN_KINDS, "IVF64,SQ8"])
def test_recall_at_10_on_a_gaussian_mixture(tmp_path, kind, mixture):
    base, queries = mixture
    assert recall_of(tmp_path, kind, base, queries) >= MIN_RECALL


def test_flat_is_exact(tmp_path, mixture):
    base, queries = mixture
    assert recall_of(tmp_path, "flat", base[:2000], queries) == 1.0


def test_training_parameters_follow_the_count():
    assert kinds.choose_nlist(624) == 16
    assert kinds.choose_nlist(3000) == 64
    assert kinds.choose_nlist(100_000) == 1024
    assert kinds.choose_nprobe(64) == 32 and kinds.choose_nprobe(1024) == 128
    assert kinds.choose_pq_m(384) == 48 and kinds.choose_pq_m(640) == 80
    assert kinds.choose_pq_nbits(3000) == 6 and kinds.choose_pq_nbits(20_000) == 8


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_too_few_vectors_to_train_raise_when_fallback_is_off(tmp_path, kind):
    store = new_store(tmp_path, 16, index_kind=kind, params={"train_fallback": "raise"})
    with pytest.raises(IndexTrainingError, match=r"needs at least 624 vectors.*only 100") as info:
        store.add(make_nodes(unit_rows(np.random.default_rng(0), 100, 16)))
    assert (info.value.needed, info.value.available) == (624, 100)
    assert "train_fallback" in str(info.value)
    assert store.count == 0
    store.add(make_nodes(unit_rows(np.random.default_rng(0), 700, 16)))
    assert store.manifest is not None and store.count == 700


def test_explicit_train_with_too_few_vectors_raises(tmp_path):
    store = new_store(tmp_path, 16, index_kind="ivf_flat")
    store.add(make_nodes(unit_rows(np.random.default_rng(0), 10, 16)))
    with pytest.raises(IndexTrainingError, match="624"):
        store.train()


def test_untrained_kind_serves_exact_search_then_trains_at_the_floor(tmp_path):
    rng = np.random.default_rng(1)
    x = unit_rows(rng, 1000, 16)
    store = new_store(tmp_path, 16, index_kind="ivf_flat")
    store.add(make_nodes(x[:300]))
    q = unit_rows(rng, 5, 16)
    exact = exact_top_k(x[:300], q, 5)
    got = store.search(q, 5)
    assert [[h[0] for h in hits] for hits in got] == [[f"n{i}" for i in row] for row in exact]
    store.persist()
    reopened = FaissVectorStore.open(store.path)
    assert reopened.manifest.trained is False  # a segment too small to train stays exact
    assert "IndexIVF" not in reopened.manifest.index_structure
    reopened.add(make_nodes(x[300:], prefix="m"))
    reopened.persist()
    assert reopened.compact(everything=True) == 1  # one segment of 1000: trains the kind
    reopened.persist()
    manifest = FaissVectorStore.read_manifest(reopened.path)
    assert manifest.trained and manifest.count == 1000 and len(manifest.segments) == 1
    assert "IndexIVFFlat" in manifest.index_structure


def test_ivf_segments_choose_nlist_from_their_own_size(tmp_path):
    rng = np.random.default_rng(2)
    store = new_store(tmp_path, 16, index_kind="ivf_flat")
    store.add(make_nodes(unit_rows(rng, 700, 16)))
    store.persist()
    small = faiss.extract_index_ivf(store._segments[0].reader.index)
    assert small.nlist == 16
    store.add(make_nodes(unit_rows(rng, 2200, 16), prefix="m"))
    assert store.optimize(force=True) == "merged 1 group(s) of segments"
    assert faiss.extract_index_ivf(store._segments[0].reader.index).nlist == 64
    assert store.count == 2900 and store.segment_count == 1


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_pq"])
def test_deletes_are_never_returned_and_merged_away_past_the_threshold(tmp_path, kind):
    rng = np.random.default_rng(3)
    x = unit_rows(rng, 1000, 16)
    store = new_store(tmp_path, 16, index_kind=kind)
    store.add(make_nodes(x, docs=10))
    store.persist()
    for doc in ["doc0", "doc1", "doc2"]:
        store.delete(doc)
    deleted = {f"n{i}" for i in range(1000) if i % 10 < 3}
    for vec in x[:50]:  # query right on top of deleted vectors
        res = store.query(VectorStoreQuery(query_embedding=vec.tolist(), similarity_top_k=20))
        assert not deleted & set(res.ids) and len(res.ids) == 20
    assert store.segment_summary()[0]["deleted"] == 300  # tombstones, the segment unchanged
    store.persist()  # 30% deleted > 20%: the segment is rewritten without them
    assert store.manifest.tombstones == 0
    assert [s.rows for s in store.manifest.segments] == [700]
    assert FaissVectorStore.open(store.path).count == 700


def test_few_tombstones_survive_a_reload_and_stay_hidden(tmp_path):
    x = unit_rows(np.random.default_rng(4), 500, 16)
    store = new_store(tmp_path, 16, index_kind="hnsw")
    store.add(make_nodes(x, docs=10))
    store.persist()
    store.delete("doc0")
    store.persist()
    assert store.manifest.tombstones == 50
    reopened = FaissVectorStore.open(store.path)
    assert reopened.count == 450 and reopened.manifest.segments[0].rows == 500
    hits = reopened.search(x[:20], 10)
    assert all(int(node_id[1:]) % 10 != 0 for row in hits for node_id, _ in row)


def test_unknown_factory_string_is_refused_early(tmp_path):
    with pytest.raises(ValueError, match="neither a kind name"):
        new_store(tmp_path, 16, index_kind="NotAnIndex123")


@pytest.mark.parametrize("kind", ["PQ8", "IVF16,PQ8", "OPQ8,IVF16,PQ8", "SQ4", "HNSW16_PQ8", "PCA8,Flat"])
def test_a_factory_string_that_keeps_only_codes_is_refused(tmp_path, kind):
    """PQ8 stored vectors at cosine 0.93 to the originals; a compaction below its training
    floor rebuilt the segment as Flat over those decoded vectors (recall@10 0.54), and
    `rebuild --keep-vectors` carried them into any new kind: the originals were gone."""
    with pytest.raises(ValueError, match="keeps only compressed codes.*ivf_pq"):
        new_store(tmp_path, 16, index_kind=kind)


@pytest.mark.parametrize("kind", ["PQ8,RFlat", "IVF16,PQ8,RFlat", "IVF16,SQ8", "SQfp16", "HNSW16", "HNSW16_SQ8"])
def test_a_factory_string_that_keeps_the_vectors_is_accepted(tmp_path, kind):
    assert new_store(tmp_path, 16, index_kind=kind).count == 0
