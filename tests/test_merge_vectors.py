"""A merge indexes its vectors part by part: the same IVF segment as from one array.

Compaction reads the live rows of several segments; `indexes.ann.build_ivf` adds them run by
run (`indexes.segment_store.LiveVectors`) instead of gathering one array of all of them beside
the index they go into. These tests hold the result to the one-array build, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np
import pytest
from indexes_fixtures import ENCODER, make_nodes, unit_rows

from indexes import FaissVectorStore, ann, segment_store
from indexes.spec import IndexSpec


class Runs:
    """The rows of one array as uneven runs (one empty), as a merge's segments come."""

    def __init__(self, ids: np.ndarray, x: np.ndarray, cuts: list[int]):
        self.ids, self.x, self.cuts = ids, x, [0, *cuts, len(x)]

    def __len__(self) -> int:
        return len(self.x)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, end in zip(self.cuts, self.cuts[1:], strict=False):
            yield self.ids[start:end], self.x[start:end]

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self.x[positions].copy()


@pytest.fixture
def rows() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    centres = unit_rows(rng, 16, 32)
    x = centres[rng.integers(0, 16, 3000)] + 0.3 * rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.sort(rng.choice(10**6, 3000, replace=False)).astype(np.int64), x.astype(np.float32)


@pytest.mark.parametrize("shared", [False, True])
def test_an_ivf_built_run_by_run_equals_one_built_from_one_array(rows, shared):
    ids, x = rows
    spec = IndexSpec(dim=32)
    centroids = ann.centroids_of(ann.build_ivf(spec, ann.ArrayVectors(ids, x), None)[0]) if shared else None
    whole, whole_build = ann.build_ivf(spec, ann.ArrayVectors(ids, x), centroids)
    runs, runs_build = ann.build_ivf(spec, Runs(ids, x, [700, 700, 2100]), centroids)
    assert runs_build == whole_build
    assert np.array_equal(faiss.serialize_index(runs), faiss.serialize_index(whole))


def test_exact_neighbours_merged_over_runs_equal_one_search(rows):
    ids, x = rows
    queries = x[:50] + 0.01
    _, positions = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    got = ann.exact_neighbours(queries, Runs(ids, x, [5, 1000, 1000, 2999]), 10, "ip")
    assert [set(row) for row in got] == [set(row) for row in ids[positions]]


def test_a_merges_live_vectors_come_from_each_part_in_id_order(tmp_path, monkeypatch):
    monkeypatch.setattr(segment_store, "MERGE_READ_ROWS", 64)  # several runs per segment
    x = unit_rows(np.random.default_rng(4), 600, ENCODER["dim"])
    store = FaissVectorStore.create(tmp_path / "idx", dim=x.shape[1], encoder=ENCODER)
    for start in range(0, 600, 200):
        store.add(make_nodes(x[start : start + 200], prefix=f"p{start}_"))
        store.persist()
    store.delete_nodes([f"p200_{i}" for i in range(0, 200, 3)] + [f"p0_{i}" for i in range(50)])
    parts = store._segments
    live = segment_store.LiveVectors(parts)
    ids = np.concatenate([p.live_ids() for p in parts])
    expected = np.concatenate([p.reader.reconstruct(p.live_ids()) for p in parts])
    chunks = list(live.chunks())
    assert len(live) == len(ids) and max(len(run) for run, _ in chunks) <= 64
    assert np.array_equal(np.concatenate([run for run, _ in chunks]), ids)
    assert np.array_equal(np.concatenate([vectors for _, vectors in chunks]), expected)
    positions = np.random.default_rng(5).permutation(len(ids))[:120]
    assert np.array_equal(live.take(positions), expected[positions])


@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
def test_presized_lists_hold_what_one_faiss_add_makes(rows, metric):
    """Lists allocated at their final size first, then filled run by run: FAISS's own
    ``add_with_ids`` of the whole array gives the same index byte for byte."""
    ids, x = rows

    def empty() -> faiss.IndexIVFFlat:
        quantizer = faiss.IndexFlatIP(32) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(32)
        quantizer.add(x[::100])
        index = faiss.IndexIVFFlat(quantizer, 32, quantizer.ntotal, metric)
        index.own_fields = True
        quantizer.this.disown()
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index

    plain = empty()
    plain.add_with_ids(x, ids)
    presized = empty()
    ann.add_presized(presized, Runs(ids, x, [700, 700, 2100]))
    assert presized.ntotal == len(x)
    assert np.array_equal(faiss.serialize_index(presized), faiss.serialize_index(plain))
    assert np.array_equal(presized.reconstruct(int(ids[1234])), x[1234])
    with pytest.raises(TypeError, match="empty IVF index"):
        ann.add_presized(presized, Runs(ids, x, []))


def test_a_merge_that_builds_an_ivf_segment_gives_its_freed_lists_back(tmp_path, monkeypatch):
    """The IVF build's lists are freed once the file is written; the heap is then trimmed
    (glibc keeps freed pages otherwise). Small flat segments skip the walk of the heap."""
    from indexes import heap, segments

    calls: list[bool] = []
    monkeypatch.setattr(segments.heap, "release_free_memory", lambda: calls.append(True) or True)
    x = unit_rows(np.random.default_rng(6), 1200, ENCODER["dim"])
    store = FaissVectorStore.create(tmp_path / "idx", dim=x.shape[1], encoder=ENCODER, params={"auto_ivf_rows": 1000})
    for start in range(0, 1200, 400):
        store.add(make_nodes(x[start : start + 400], prefix=f"p{start}_"))
        store.persist()
    assert calls == []
    store.optimize(force=True)
    store.persist()
    assert calls == [True]
    assert "IVF" in store.segment_summary()[0]["structure"]
    hits = store.search(x[:5], 1)
    assert [h[0][0] for h in hits] == [f"p0_{i}" for i in range(5)]
    monkeypatch.undo()
    import platform

    assert heap.release_free_memory() is (heap._malloc_trim() is not None)
    if platform.libc_ver()[0] == "glibc":
        assert heap.release_free_memory() is True
