"""Benchmark scripts' own arithmetic: the figures they publish (recall, counts, tables) must
mean what their headings say. Timings are never asserted; each test runs a tiny case."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module", autouse=True)
def _benchmarks_importable():
    # The scripts import their helpers (machine.py) as top-level modules, as when run.
    sys.path.insert(0, str(BENCHMARKS))
    yield
    sys.path.remove(str(BENCHMARKS))


def test_store_scale_recall_is_exact_for_flat_segments_and_counts_the_index_as_built(tmp_path, monkeypatch):
    import store_scale

    monkeypatch.setattr(store_scale, "sentences", lambda: [f"word{i} other words here" for i in range(200)])
    monkeypatch.setattr(store_scale, "SCIFACT", tmp_path / "absent")
    path = tmp_path / "idx"
    store_scale.build(path, 1200, 300)
    from indexes import FaissVectorStore

    built = FaissVectorStore.open(path, use_gpu=False)
    segments, count = built.segment_count, built.count
    del built
    row = store_scale.measure(path, 10)
    # flat segments are exact: the measurement's own 30 extra nodes must not enter the truth
    assert row["recall_at_10"] == 1.0
    assert (row["segments"], row["count"]) == (segments, count)


def test_recall_at_k_scores_a_small_truth_on_what_it_holds():
    import store_scale

    assert store_scale.recall_at_k([["a", "b"]], [["a", "b"]], 10) == 1.0
