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


def test_rewriting_a_results_file_keeps_its_hand_written_notes(tmp_path):
    from results_file import write_markdown

    path = tmp_path / "x.md"
    path.write_text("# Old table\n\n| a |\n\n## Notes (a run)\n\n- kept\n\n## Notes (another)\n\n- kept too\n")
    write_markdown(path, "# New table\n\n| b |\n")
    assert path.read_text() == "# New table\n\n| b |\n\n## Notes (a run)\n\n- kept\n\n## Notes (another)\n\n- kept too\n"
    write_markdown(tmp_path / "new" / "y.md", "# Fresh\n")
    assert (tmp_path / "new" / "y.md").read_text() == "# Fresh\n"


@pytest.fixture(scope="module")
def tombstone_run(tmp_path_factory):
    """tombstone_recall.py on 1,000 rows into a folder whose results file has notes."""
    import json
    import subprocess

    out = tmp_path_factory.mktemp("tombstone") / "nested" / "out"
    out.mkdir(parents=True)
    (out / "tombstone_recall.md").write_text("# old\n\n## Notes (by hand)\n\n- keep me\n")
    subprocess.run([sys.executable, str(BENCHMARKS / "tombstone_recall.py"), "--rows", "1000", "--queries", "3",
                    "--out", str(out)], check=True, capture_output=True)
    return out, json.loads((out / "tombstone_recall.json").read_text())


def test_tombstone_recall_writes_to_out_and_keeps_notes(tombstone_run):
    out, result = tombstone_run
    text = (out / "tombstone_recall.md").read_text()
    assert text.startswith("# Dense recall on an IVF segment with tombstones")
    assert text.endswith("## Notes (by hand)\n\n- keep me\n")


@pytest.mark.timeout(60)  # the fallback took minutes when it drew from a Python list
def test_store_scale_without_scifact_falls_back_quickly_and_says_so(tmp_path, monkeypatch):
    import store_scale

    monkeypatch.setattr(store_scale, "SCIFACT", tmp_path / "absent")
    pool = store_scale.sentences()
    assert len(pool) == 50_000 and all(8 <= len(s.split()) < 30 for s in pool[:100])
    assert store_scale.texts_used().startswith("synthetic words")


def test_tombstone_recall_scores_against_the_live_rows_when_fewer_than_k(tombstone_run):
    _, result = tombstone_run
    # 2% of 1,000 rows left at 98% deleted: 20 live rows, all found by the exact flat segment
    row = next(r for r in result["results"] if (r["deleted"], r["k"], r["rule"]) == (0.98, 100, "this code"))
    assert row["recall_mean"] == 1.0


def test_change_costs_totals_each_deletion_chunk_by_its_own_size():
    from change_costs import deletion_seconds

    deletes = [{"variant": v, "deleted_docs": done, "chunk_docs": size, "ms_per_delete": ms}
               for v, ms in (("this code", 2.0), ("before", 10.0)) for done, size in ((1000, 1000), (1500, 500))]
    assert deletion_seconds(deletes) == {"this code": 3.0, "before": 15.0}


def test_faiss_bench_measures_each_kinds_persisted_segment(tmp_path):
    import faiss_bench
    import numpy as np

    x = faiss_bench.unit(np.random.default_rng(0).standard_normal((3000, 64)))
    queries = faiss_bench.perturbed_queries(x, 20, 1)
    truth, nodes = faiss_bench.exact_truth(x, queries), faiss_bench.make_nodes(len(x), None)
    rows = {kind: faiss_bench.bench_kind(kind, x, queries, truth, nodes, tmp_path, 2) for kind in ("flat", "ivf_flat", "hnsw")}
    # the rows not yet persisted sit in a flat buffer whatever the kind: measured there, all looked alike
    assert rows["flat"]["recall_at_10"] == 1.0 and rows["ivf_flat"]["recall_at_10"] < 1.0
    assert rows["hnsw"]["index_mb"] > rows["flat"]["index_mb"]  # the graph's links, on disk
