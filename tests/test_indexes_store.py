"""FaissVectorStore behaviour: stable ids, upsert, deletes, bookkeeping, edge cases, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from indexes_fixtures import make_nodes, new_store, unit_rows
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery

from indexes import FaissVectorStore

DIM = 32


def query(store: FaissVectorStore, vec: np.ndarray, k: int = 5, **kwargs):
    return store.query(VectorStoreQuery(query_embedding=vec.tolist(), similarity_top_k=k), **kwargs)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat"])
def test_ids_are_never_reused_after_deletes_or_reopen(tmp_path, kind):
    rng = np.random.default_rng(0)
    store = new_store(tmp_path, DIM, index_kind=kind)
    store.add(make_nodes(unit_rows(rng, 700, DIM), docs=7))
    first = store.faiss_ids([f"n{i}" for i in range(700)])
    assert sorted(first.values()) == list(range(700))
    store.delete("doc6")  # holds the highest ids, 699 among them
    store.add(make_nodes(unit_rows(rng, 3, DIM), prefix="b"))
    assert min(store.faiss_ids(["b0", "b1", "b2"]).values()) == 700
    store.persist()
    store.delete_nodes(["b2"])  # delete the highest id, then reload from disk
    store.persist()
    reopened = FaissVectorStore.open(store.path)
    assert reopened.next_id == 703
    reopened.add(make_nodes(unit_rows(rng, 2, DIM), prefix="c"))
    assert sorted(reopened.faiss_ids(["c0", "c1"]).values()) == [703, 704]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_pq"])
def test_adding_an_existing_node_id_replaces_it(tmp_path, kind):
    rng = np.random.default_rng(1)
    store = new_store(tmp_path, DIM, index_kind=kind)
    base = unit_rows(rng, 800, DIM)
    store.add(make_nodes(base))
    old_id = store.faiss_ids(["n3"])["n3"]
    new_vec = unit_rows(rng, 1, DIM)[0]
    store.add([TextNode(id_="n3", text="rewritten", metadata={"v": 2}, embedding=new_vec.tolist())])
    assert store.count == 800
    assert store.faiss_ids(["n3"])["n3"] > old_id
    top = query(store, new_vec, k=1)
    assert top.ids == ["n3"] and top.nodes[0].get_content() == "rewritten"
    assert top.nodes[0].metadata == {"v": 2}
    old_hits = query(store, base[3], k=800)
    assert old_hits.ids.count("n3") == 1  # the old vector is gone, not duplicated
    assert old_hits.similarities[old_hits.ids.index("n3")] < 0.999


def test_duplicates_within_one_batch_keep_the_last(tmp_path):
    store = new_store(tmp_path, DIM)
    vecs = unit_rows(np.random.default_rng(2), 2, DIM)
    nodes = [
        TextNode(id_="x", text="first", embedding=vecs[0].tolist()),
        TextNode(id_="x", text="second", embedding=vecs[1].tolist()),
    ]
    assert store.add(nodes) == ["x", "x"]
    assert store.count == 1
    assert store.get_nodes(["x"])[0].get_content() == "second"


def test_nodes_round_trip_with_relationships_and_metadata(tmp_path):
    store = new_store(tmp_path, DIM)
    node = TextNode(
        id_="a",
        text="alpha",
        metadata={"title": "Ünïcode", "n": 3, "tags": ["x", "y"]},
        excluded_embed_metadata_keys=["n"],
        relationships={
            NodeRelationship.SOURCE: RelatedNodeInfo(node_id="docA"),
            NodeRelationship.NEXT: RelatedNodeInfo(node_id="b"),
        },
        embedding=unit_rows(np.random.default_rng(3), 1, DIM)[0].tolist(),
    )
    store.add([node])
    store.persist()
    got = FaissVectorStore.open(store.path).get_nodes(["a"])[0]
    assert got.get_content() == "alpha" and got.metadata == node.metadata
    assert got.ref_doc_id == "docA" and got.next_node.node_id == "b"
    assert got.excluded_embed_metadata_keys == ["n"]
    assert got.hash == node.hash


def test_doc_hash_bookkeeping_for_ingestion_diffs(tmp_path):
    store = new_store(tmp_path, DIM)
    store.add(make_nodes(unit_rows(np.random.default_rng(4), 6, DIM), docs=2))
    store.set_doc_hash("doc0", "h0")
    store.set_doc_hash("doc1", "h1")
    store.set_doc_hash("doc1", "h1b")
    assert store.doc_hashes() == {"doc0": "h0", "doc1": "h1b"}
    assert store.ref_doc_node_ids("doc0") == ["n0", "n2", "n4"]
    store.delete("doc0")
    assert store.doc_hashes() == {"doc1": "h1b"}
    assert store.ref_doc_node_ids("doc0") == []
    store.persist()
    assert FaissVectorStore.open(store.path).doc_hashes() == {"doc1": "h1b"}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_pq"])
def test_iter_embeddings_yields_every_live_vector(tmp_path, kind):
    x = unit_rows(np.random.default_rng(5), 700, DIM)
    store = new_store(tmp_path, DIM, index_kind=kind)
    store.add(make_nodes(x))
    store.delete_nodes(["n0", "n10"])
    pairs = list(store.iter_embeddings(batch_size=64))
    assert len(pairs) == 698
    for node_id, vec in pairs:
        assert np.allclose(vec, x[int(node_id[1:])], atol=1e-6)


def test_wrong_dimension_and_missing_embedding_are_refused(tmp_path):
    store = new_store(tmp_path, DIM)
    with pytest.raises(ValueError, match=r"5-dimensional embedding.*32-dimensional"):
        store.add([TextNode(id_="a", text="a", embedding=[0.1] * 5)])
    with pytest.raises(ValueError, match="no embedding"):
        store.add([TextNode(id_="a", text="a")])
    with pytest.raises(ValueError, match="NaN"):
        store.add([TextNode(id_="a", text="a", embedding=[float("nan")] * DIM)])
    with pytest.raises(ValueError, match="32-dimensional"):
        query(store, np.ones(7, dtype=np.float32))
    assert store.count == 0


def test_a_query_on_an_empty_store_returns_nothing_and_one_without_embedding_is_refused(tmp_path):
    store = new_store(tmp_path, DIM, index_kind="hnsw")
    empty = query(store, np.ones(DIM, dtype=np.float32))
    assert (empty.ids, empty.nodes, empty.similarities) == ([], [], [])
    # it answered [] with a log line, so an empty query through as_retriever() found nothing
    # where every other query path refuses it
    with pytest.raises(ValueError, match="needs query_embedding"):
        store.query(VectorStoreQuery(query_embedding=None, similarity_top_k=3))
    store.add(make_nodes(unit_rows(np.random.default_rng(6), 3, DIM)))
    assert len(query(store, np.ones(DIM, dtype=np.float32), k=10).ids) == 3


def test_l2_metric_returns_closest_first_with_similarity_in_unit_interval(tmp_path):
    x = unit_rows(np.random.default_rng(7), 50, DIM)
    store = new_store(tmp_path, DIM, metric="l2")
    store.add(make_nodes(x))
    res = query(store, x[9], k=5)
    assert res.ids[0] == "n9" and res.similarities[0] == pytest.approx(1.0)
    assert all(0 < s <= 1 for s in res.similarities)
    assert res.similarities == sorted(res.similarities, reverse=True)


def test_clear_empties_the_store_but_keeps_the_id_counter(tmp_path):
    store = new_store(tmp_path, DIM)
    store.add(make_nodes(unit_rows(np.random.default_rng(8), 5, DIM)))
    store.clear()
    assert store.count == 0 and store.all_nodes() == []
    store.add(make_nodes(unit_rows(np.random.default_rng(9), 1, DIM), prefix="z"))
    assert store.faiss_ids(["z0"]) == {"z0": 5}


def test_repr_names_path_version_count_and_kind(tmp_path):
    store = new_store(tmp_path, DIM, index_kind="hnsw")
    text = repr(store)
    for part in [str(store.path), "version=1", "count=0", "dim=32", "kind='hnsw'", "device='cpu'"]:
        assert part in text


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_queries_from_threads_while_another_thread_adds(tmp_path, kind):
    rng = np.random.default_rng(10)
    store = new_store(tmp_path, DIM, index_kind=kind)
    batches = [unit_rows(rng, 50, DIM) for _ in range(20)]  # ivf_flat trains mid-way
    queries = unit_rows(rng, 20, DIM)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for b, x in enumerate(batches):
                store.add(make_nodes(x, prefix=f"b{b}_"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        try:
            while not done.is_set():
                for q in queries:
                    res = query(store, q, k=5)
                    assert len(res.ids) == len(set(res.ids)) <= 5
                    assert res.similarities == sorted(res.similarities, reverse=True)
                    assert [n.node_id for n in res.nodes] == res.ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert store.count == 1000
    final = query(store, queries[0], k=5)
    assert len(final.ids) == 5
