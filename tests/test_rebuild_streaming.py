"""Ingest and rebuild write a version as batches arrive: vectors pass through a batch at a time,
rows go to disk as segments every ``flush_rows`` rows, so memory does not grow with the corpus.
Checked structurally (how many rows the writer ever holds), not by timing or RSS."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_helpers import DOCS, long_doc, settings_for, write_docs

import indexes.segment_store
from indexes import FaissVectorStore
from pipelines.ingest import ingest
from pipelines.rebuild import rebuild

MANY = {**DOCS, **{f"extra{i}.txt": long_doc(3, seed=7 * i) for i in range(30)}}
FLUSH = 6


@pytest.fixture
def held_rows(monkeypatch):
    """The most rows any store held in memory at once during the test, and every add's size."""
    seen = {"max_pending": 0, "adds": []}
    monkeypatch.setattr(indexes.segment_store, "FLUSH_ROWS", FLUSH)
    real_add = FaissVectorStore.add

    def add(self, nodes, **kwargs):
        out = real_add(self, nodes, **kwargs)
        seen["adds"].append(len(nodes))
        seen["max_pending"] = max(seen["max_pending"], self._pending.count)
        return out

    monkeypatch.setattr(FaissVectorStore, "add", add)
    return seen


def snapshot(index_dir) -> dict[str, np.ndarray]:
    return dict(FaissVectorStore.open(index_dir).iter_embeddings())


@pytest.mark.parametrize("keep_vectors", [False, True])
def test_a_rebuild_holds_one_flush_of_rows_and_gives_the_same_index(tmp_path, embedding, held_rows, keep_vectors):
    settings = settings_for(embedding, nodes_per_batch=4)
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings, embedding=embedding)
    before = snapshot(tmp_path / "idx")
    assert len(before) > 4 * FLUSH  # enough rows for several flushes
    held_rows["max_pending"], held_rows["adds"] = 0, []
    stats = rebuild(tmp_path / "idx", settings, keep_vectors=keep_vectors, embedding=embedding)
    after = FaissVectorStore.open(tmp_path / "idx")
    assert held_rows["max_pending"] < FLUSH + max(held_rows["adds"])  # flushed as it went
    assert max(held_rows["adds"]) < len(before) / 2  # documents arrive in batches, not at once
    assert after.count == len(before) == stats.count and after.version == stats.version
    rebuilt = dict(after.iter_embeddings())
    assert rebuilt.keys() == before.keys()
    ids = sorted(before)
    assert np.allclose(np.stack([rebuilt[i] for i in ids]), np.stack([before[i] for i in ids]), atol=1e-5)
    assert after.doc_hashes() == FaissVectorStore.open(tmp_path / "idx", version=stats.version - 1).doc_hashes()


def test_a_first_ingest_fits_the_correction_then_streams(tmp_path, embedding, held_rows):
    settings = settings_for(embedding, nodes_per_batch=4)
    stats = ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings, embedding=embedding)
    store = FaissVectorStore.open(tmp_path / "idx")
    assert store.correction is not None and store.correction.fitted_on == store.count == stats.count
    assert held_rows["max_pending"] < FLUSH + max(held_rows["adds"])


def test_keep_vectors_fits_a_missing_correction_on_stored_vectors_spanning_many_batches(tmp_path, embedding):
    """The correction's sample holds several stored batches before any is written; each must
    still know its nodes (a 5k-document index once failed here with a KeyError)."""
    settings = settings_for(embedding, nodes_per_batch=4, correction="center")  # the index chose "none"
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings_for(embedding, nodes_per_batch=4,
           correction="none"), embedding=embedding)
    raw = snapshot(tmp_path / "idx")
    assert len(raw) > 3 * 4  # several stored batches go into the sample
    stats = rebuild(tmp_path / "idx", settings, keep_vectors=True, embedding=embedding)
    store = FaissVectorStore.open(tmp_path / "idx")
    assert store.correction is not None and store.correction.fitted_on == len(raw) == stats.count
    upgraded = dict(store.iter_embeddings())
    ids = sorted(raw)
    expected = store.correction.documents(np.stack([raw[i] for i in ids]))
    assert np.allclose(np.stack([upgraded[i] for i in ids]), expected, atol=1e-5)


def test_a_rebuild_counts_what_it_did_to_each_document(tmp_path, embedding):
    # it printed "added N" for an index of N documents, as if it had been empty
    settings = settings_for(embedding)
    source = write_docs(tmp_path / "src", DOCS)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    stats = rebuild(tmp_path / "idx", settings, embedding=embedding)
    assert (stats.added, stats.updated, stats.deleted, stats.unchanged) == (0, len(DOCS), 0, 0)
    kept = rebuild(tmp_path / "idx", settings, keep_vectors=True, embedding=embedding)
    assert (kept.added, kept.updated, kept.unchanged, kept.nodes_embedded) == (0, 0, len(DOCS), 0)
    gone, *_ = sorted(DOCS)
    (source / gone).unlink()
    (source / "new.txt").write_text("A new document arrives. It has two sentences.")
    from_source = rebuild(tmp_path / "idx", settings, source=source, embedding=embedding)
    assert (from_source.added, from_source.updated, from_source.deleted) == (1, len(DOCS) - 1, 1)
