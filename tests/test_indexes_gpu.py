"""GPU placement: the decision logic with a patched probe, and the replica path with a fake GPU.

No GPU is needed: `gpu.gpu_count` is patched to pretend devices exist, and `gpu.clone_to_gpu`
to return a CPU clone standing in for the GPU replica, so every branch runs here.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
from indexes_fixtures import make_nodes, new_store, unit_rows
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)

from indexes import gpu

DIM = 16


@pytest.fixture
def pretend_gpus(monkeypatch):
    def install(count: int) -> None:
        monkeypatch.setattr(gpu, "gpu_count", lambda: count)

    return install


@pytest.fixture
def fake_replicas(monkeypatch):
    """Replace the GPU copy by a CPU clone and count the searches it serves."""
    calls = {"clones": 0, "searches": 0}

    class CountingIndex:
        def __init__(self, index):
            self.index = index

        def search(self, x, k):
            calls["searches"] += 1
            return self.index.search(x, k)

        def add_with_ids(self, x, ids):
            self.index.add_with_ids(x, ids)

    def clone(cpu_index, placement):
        calls["clones"] += 1
        return gpu.Replica(index=CountingIndex(faiss.clone_index(cpu_index)))

    monkeypatch.setattr(gpu, "clone_to_gpu", clone)
    return calls


def test_auto_on_a_cpu_only_machine_is_silently_cpu(pretend_gpus, caplog):
    pretend_gpus(0)
    with caplog.at_level(logging.WARNING):
        placement = gpu.choose_placement("auto")
    assert not placement.on_gpu and placement.describe() == "cpu"
    assert caplog.records == []


def test_asking_for_a_gpu_without_one_warns_and_uses_the_cpu(pretend_gpus, caplog):
    pretend_gpus(0)
    with caplog.at_level(logging.WARNING):
        placement = gpu.choose_placement(True)
    assert not placement.on_gpu
    assert "use_gpu=True" in caplog.text and "CPU" in caplog.text


def test_real_store_with_use_gpu_true_falls_back_to_cpu_here(tmp_path, caplog):
    if gpu.gpu_count():
        pytest.skip("this machine has a GPU")
    with caplog.at_level(logging.WARNING):
        store = new_store(tmp_path, DIM, use_gpu=True)
    assert store.device == "cpu" and "use_gpu=True" in caplog.text
    store.add(make_nodes(unit_rows(np.random.default_rng(0), 10, DIM)))
    assert len(store.search(unit_rows(np.random.default_rng(1), 1, DIM), 3)[0]) == 3


def test_multi_gpu_wish_on_this_cpu_machine_is_one_line_and_cpu_results(tmp_path, caplog):
    if gpu.gpu_count():
        pytest.skip("this machine has a GPU")
    x = unit_rows(np.random.default_rng(10), 200, DIM)
    cpu_store = new_store(tmp_path / "cpu", DIM, use_gpu=False)
    cpu_store.add(make_nodes(x))
    with caplog.at_level(logging.INFO, logger=gpu.logger.name):
        wished = new_store(tmp_path / "all", DIM, use_gpu="auto", gpus="all", gpu_shard=True)
        wished.add(make_nodes(x))
        queries = unit_rows(np.random.default_rng(11), 4, DIM)
        assert wished.search(queries, 5) == cpu_store.search(queries, 5)
    assert wished.device == "cpu"
    [record] = [r for r in caplog.records if r.name == gpu.logger.name]
    assert record.levelno == logging.INFO
    assert "FAISS sees no GPU, searching on the CPU" in record.getMessage()
    assert "gpus='all'" in record.getMessage() and "shard=True" in record.getMessage()


def test_insisting_on_several_gpus_without_any_is_one_warning(pretend_gpus, caplog):
    pretend_gpus(0)
    with caplog.at_level(logging.INFO):
        placement = gpu.choose_placement(True, [0, 1], shard=True)
    assert placement.describe() == "cpu"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "use_gpu=True, gpus=[0, 1], shard=True: FAISS sees no GPU" in caplog.text


def test_settings_carry_the_gpu_selection_to_the_store():
    from pipelines.settings import Settings

    placement = Settings(use_gpu="true", gpus="0,2", gpu_shard=True).faiss_placement()
    assert placement == {"use_gpu": True, "gpus": [0, 2], "gpu_shard": True}
    assert Settings(gpus="all").faiss_placement()["gpus"] == "all"
    assert Settings().faiss_placement() == {"use_gpu": "auto", "gpus": None, "gpu_shard": False}
    with pytest.raises(ValueError, match="gpus"):
        Settings(gpus="first")


@pytest.mark.parametrize(
    ("use_gpu", "gpus", "shard", "expected"),
    [
        ("auto", None, False, "gpu:0"),
        (True, 1, False, "gpu:1"),
        (True, "all", False, "gpu:0,1,2 (replicated)"),
        ("auto", "all", True, "gpu:0,1,2 (sharded)"),
        (True, [2, 0], False, "gpu:2,0 (replicated)"),
        (False, "all", False, "cpu"),
    ],
)
def test_placement_decisions_with_gpus_present(pretend_gpus, use_gpu, gpus, shard, expected):
    pretend_gpus(3)
    assert gpu.choose_placement(use_gpu, gpus, shard).describe() == expected


def test_bad_gpu_requests_are_refused(pretend_gpus):
    pretend_gpus(2)
    with pytest.raises(ValueError, match="devices this machine lacks"):
        gpu.choose_placement(True, [5])
    with pytest.raises(ValueError, match="use_gpu must be"):
        gpu.choose_placement("yes")  # type: ignore[arg-type]


def test_unfiltered_searches_use_the_replica_and_match_the_cpu(
    tmp_path, pretend_gpus, fake_replicas
):
    x = unit_rows(np.random.default_rng(2), 300, DIM)
    cpu_store = new_store(tmp_path / "cpu", DIM, use_gpu=False)
    cpu_store.add(make_nodes(x))
    pretend_gpus(1)
    gpu_store = new_store(tmp_path / "gpu", DIM, use_gpu=True)
    assert gpu_store.device == "gpu:0"
    gpu_store.add(make_nodes(x))
    queries = unit_rows(np.random.default_rng(3), 5, DIM)
    assert gpu_store.search(queries, 5) == cpu_store.search(queries, 5)
    assert fake_replicas["searches"] == 1
    for store in (cpu_store, gpu_store):
        store.add(make_nodes(x[:3] * -1.0, prefix="extra"))  # added to the replica in place
    assert gpu_store.search(-x[:2], 5) == cpu_store.search(-x[:2], 5)
    assert fake_replicas["clones"] == 1 and fake_replicas["searches"] == 2


def test_filtered_searches_on_gpu_fall_back_to_exact_subset_search(
    tmp_path, pretend_gpus, fake_replicas
):
    x = unit_rows(np.random.default_rng(4), 400, DIM)
    meta = [{"half": i % 2} for i in range(400)]
    cpu_store = new_store(tmp_path / "cpu", DIM, use_gpu=False)
    cpu_store.add(make_nodes(x, metadata=meta))
    pretend_gpus(1)
    gpu_store = new_store(tmp_path / "gpu", DIM, use_gpu="auto")
    gpu_store.add(make_nodes(x, metadata=meta))
    filters = MetadataFilters(
        filters=[MetadataFilter(key="half", value=1, operator=FilterOperator.EQ)]
    )
    q = VectorStoreQuery(query_embedding=x[1].tolist(), similarity_top_k=8, filters=filters)
    got, want = gpu_store.query(q), cpu_store.query(q)
    assert got.ids == want.ids and got.ids[0] == "n1"
    assert np.allclose(got.similarities, want.similarities, atol=1e-5)
    assert fake_replicas["searches"] == 0  # the replica never saw the filtered query


def test_gpu_replica_is_rebuilt_without_tombstones(tmp_path, pretend_gpus, fake_replicas):
    pretend_gpus(1)
    x = unit_rows(np.random.default_rng(5), 300, DIM)
    store = new_store(tmp_path, DIM, index_kind="hnsw", use_gpu=True)
    store.add(make_nodes(x, docs=3))
    store.search(x[:1], 5)
    store.delete("doc0")
    hits = store.search(x[:30], 10)
    assert all(int(node_id[1:]) % 3 != 0 for row in hits for node_id, _ in row)
    assert store.client.ntotal == 200  # compacted before cloning to the "GPU"
    assert fake_replicas["clones"] == 2


def test_a_kind_that_cannot_go_to_gpu_stays_on_cpu_with_a_warning(
    tmp_path, pretend_gpus, monkeypatch, caplog
):
    pretend_gpus(1)

    def refuse(cpu_index, placement):
        raise RuntimeError("this index type is not implemented on GPU")

    monkeypatch.setattr(gpu, "clone_to_gpu", refuse)
    store = new_store(tmp_path, DIM, index_kind="hnsw", use_gpu=True)
    store.add(make_nodes(unit_rows(np.random.default_rng(6), 50, DIM)))
    store.persist()  # an hnsw segment (rows not yet written are searched flat)
    with caplog.at_level(logging.WARNING):
        assert len(store.search(unit_rows(np.random.default_rng(7), 1, DIM), 3)[0]) == 3
    assert "cannot be searched on gpu:0" in caplog.text
    assert store.device == "cpu"


def test_persist_writes_the_cpu_master_even_with_a_replica(tmp_path, pretend_gpus, fake_replicas):
    pretend_gpus(1)
    store = new_store(tmp_path, DIM, use_gpu=True)
    store.add(make_nodes(unit_rows(np.random.default_rng(8), 40, DIM)))
    store.search(unit_rows(np.random.default_rng(9), 1, DIM), 3)
    store.persist()
    segment = store.manifest.segments[0].name
    index = faiss.read_index(str(store.path / "segments" / segment / "vectors.faiss"))
    assert index.ntotal == 40
