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
