"""Hybrid search and the vector correction through the real pipelines (tiny decoder, real FAISS,
SQLite FTS5): one query path, the correction applied alike at ingest and query, frozen until
rebuild, older indexes upgraded without re-embedding, and eval --pipeline equal to the retriever."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pipeline_helpers import DOCS, long_doc, settings_for, write_docs
from typer.testing import CliRunner

from htp_cli.main import app
from indexes import FaissVectorStore
from pipelines.beir import Document, write_beir
from pipelines.chunking import embed_text
from pipelines.encoder_check import CHECK_DOCUMENTS, CHECK_QUERIES
from pipelines.eval_pipeline import evaluate_pipeline, pipeline_run, ranked_documents
from pipelines.evaluation import prepare_dataset
from pipelines.ingest import ingest
from pipelines.query import SearchRequest, open_index
from pipelines.rebuild import rebuild
from pipelines.service import IndexHolder, create_app

MANY = {**DOCS, **{f"extra{i}.txt": long_doc(2, seed=3 * i) for i in range(9)}}


def test_the_correction_is_fitted_at_first_ingest_and_applied_alike_to_documents_and_queries(tmp_path, embedding):
    settings = settings_for(embedding)
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings, embedding=embedding)
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    correction = index.store.correction
    assert correction is not None and correction.fitted_on == index.store.count >= 8
    assert correction.pseudo_queries > 0
    nodes = index.store.all_nodes()
    raw_docs = embedding.encoder.encode_documents([embed_text(n) for n in nodes])
    stored = dict(index.store.iter_embeddings())
    expected_docs = correction.documents(raw_docs)
    assert np.allclose(np.stack([stored[n.node_id] for n in nodes]), expected_docs, atol=1e-4)
    query = "the moon over the sea"
    expected_query = correction.queries(embedding.encoder.encode_queries([query]))[0]
    scores = expected_docs @ expected_query
    want = [nodes[i].node_id for i in np.argsort(-scores)[:4]]
    hits = index.search(query, 4, mode="dense")
    assert [h["node_id"] for h in hits] == want
    assert np.allclose([h["score"] for h in hits], np.sort(scores)[::-1][:4], atol=1e-4)


def test_a_correction_is_fitted_on_the_live_nodes_only(tmp_path, embedding):
    # A changed document's old vector and a deleted document's were counted with the new ones:
    # seven live nodes got a correction "fitted_on 8", the stale vector in its means
    settings = settings_for(embedding)
    seven = {f"f{i}.txt": f"document number {i} mentions the river garden ." for i in range(7)}
    source = write_docs(tmp_path / "src", seven)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    (source / "f0.txt").write_text("document one was rewritten about copper .")
    (source / "f1.txt").unlink()
    (source / "new.txt").write_text("a new document about the harbour .")
    stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert (stats.added, stats.updated, stats.deleted, stats.count) == (1, 1, 1, 7)
    assert FaissVectorStore.open(tmp_path / "idx").correction is None  # 7 live nodes: too few
    (source / "eighth.txt").write_text("the eighth document arrives at last .")
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    store = FaissVectorStore.open(tmp_path / "idx")
    assert store.correction is not None and store.correction.fitted_on == store.count == 8


def test_an_index_too_small_for_a_correction_gets_one_from_the_ingest_that_grows_it(tmp_path, embedding, caplog):
    """A first ingest of a few documents fits no correction (too few vectors for a mean); the
    next ingest that brings enough fits it and writes the earlier nodes again corrected. Before,
    only a rebuild ever fitted one, so an index grown by ingests searched without it."""
    settings = settings_for(embedding)
    source = write_docs(tmp_path / "src", DOCS)
    first = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    small = open_index(tmp_path / "idx", settings, embedding=embedding).store
    assert small.correction is None and small.count < 8
    before = {node.node_id: embed_text(node) for node in small.all_nodes()}
    hashes = small.doc_hashes()
    write_docs(source, {k: v for k, v in MANY.items() if k not in DOCS})
    grown = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert (grown.added, grown.updated, grown.unchanged) == (len(MANY) - len(DOCS), 0, len(DOCS))
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    correction = index.store.correction
    assert correction is not None and correction.fitted_on == index.store.count
    nodes = index.store.all_nodes()
    assert {n.node_id: embed_text(n) for n in nodes if n.node_id in before} == before  # the same nodes
    assert {k: v for k, v in index.store.doc_hashes().items() if k in hashes} == hashes
    stored = dict(index.store.iter_embeddings())  # every node corrected, the earlier ones too
    expected = correction.documents(embedding.encoder.encode_documents([embed_text(n) for n in nodes]))
    assert np.allclose(np.stack([stored[n.node_id] for n in nodes]), expected, atol=1e-4)
    assert ingest(source, tmp_path / "idx", settings, embedding=embedding).nodes_embedded == 0
    assert first.version < grown.version


def test_the_correction_is_frozen_across_ingests_and_refitted_by_rebuild(tmp_path, embedding):
    settings = settings_for(embedding)
    source = write_docs(tmp_path / "src", MANY)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    first = FaissVectorStore.open(tmp_path / "idx").correction
    write_docs(source, {"more.txt": long_doc(3, seed=40), "other.md": long_doc(2, seed=50)})
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert FaissVectorStore.open(tmp_path / "idx").correction == first
    rebuild(tmp_path / "idx", settings, embedding=embedding)
    refitted = FaissVectorStore.open(tmp_path / "idx").correction
    assert refitted is not None and refitted.fitted_on == first.fitted_on + 2


def test_too_few_documents_or_correction_none_fit_nothing(tmp_path, embedding):
    ingest(write_docs(tmp_path / "a", DOCS), tmp_path / "small", settings_for(embedding), embedding=embedding)
    assert FaissVectorStore.open(tmp_path / "small").correction is None
    none = settings_for(embedding, correction="none")
    ingest(write_docs(tmp_path / "b", MANY), tmp_path / "plain", none, embedding=embedding)
    assert FaissVectorStore.open(tmp_path / "plain").correction is None


def test_an_index_built_with_correction_none_keeps_it_until_a_setting_changes_it(tmp_path, embedding):
    """``correction = "none"`` left nothing on disk to say so: the next ingest under default
    settings that brought the index to 8 nodes fitted ``center`` (and then refused "none" as
    unlike the index's), and so did a rebuild, with or without --keep-vectors."""
    source = write_docs(tmp_path / "src", DOCS)
    ingest(source, tmp_path / "idx", settings_for(embedding, correction="none"), embedding=embedding)
    write_docs(source, {k: v for k, v in MANY.items() if k not in DOCS})
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)  # no correction set
    grown = FaissVectorStore.open(tmp_path / "idx")
    assert grown.count >= 8 and grown.correction is None
    assert grown.correction_kind == "none"
    (source / "more.txt").write_text("a later text about the harbour .")
    ingest(source, tmp_path / "idx", settings_for(embedding, correction="none"), embedding=embedding)
    rebuild(tmp_path / "idx", settings_for(embedding, index_kind="flat"), keep_vectors=True, embedding=embedding)
    rebuild(tmp_path / "idx", settings_for(embedding), embedding=embedding)
    kept = FaissVectorStore.open(tmp_path / "idx")
    assert kept.correction is None and kept.correction_kind == "none" and kept.index_kind == "flat"
    rebuild(tmp_path / "idx", settings_for(embedding, correction="center"), embedding=embedding)
    changed = FaissVectorStore.open(tmp_path / "idx")
    assert changed.correction is not None and changed.correction_kind == "center"


def as_written_before_correction_kinds(index_dir) -> None:
    """Drop the live manifest's ``correction_kind``, as a release before it wrote the manifest."""
    from indexes import persist

    manifest = FaissVectorStore.read_manifest(index_dir)
    path = persist.version_dir(index_dir, manifest.version) / "manifest.json"
    path.write_text(json.dumps(manifest.model_copy(update={"correction_kind": None}).sealed().to_dict()))
    assert "correction_kind" not in json.loads(path.read_text())


def test_an_index_without_correction_gets_one_from_rebuild_keep_vectors(tmp_path, embedding):
    settings = settings_for(embedding)
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings_for(embedding, correction="none"),
           embedding=embedding)  # as indexes written before the correction existed
    as_written_before_correction_kinds(tmp_path / "idx")  # which recorded no choice either
    old = open_index(tmp_path / "idx", settings, embedding=embedding)
    assert old.modes == ["dense", "sparse", "hybrid"] and old.store.correction is None
    assert old.search("the cat", 2, mode="hybrid")
    raw = dict(old.store.iter_embeddings())
    texts_before = embedding.encoder.stats.texts
    stats = rebuild(tmp_path / "idx", settings, keep_vectors=True, embedding=embedding)
    embedded = embedding.encoder.stats.texts - texts_before
    new = open_index(tmp_path / "idx", settings, embedding=embedding)
    assert new.modes == ["dense", "sparse", "hybrid"] and new.store.correction is not None
    # nothing re-embedded but the correction's pseudo-queries, and the four texts that check the
    # encoder still embeds as the stored vectors' did
    assert stats.nodes_embedded == 0
    assert embedded == new.store.correction.pseudo_queries + len(CHECK_DOCUMENTS) + len(CHECK_QUERIES)
    assert new.store.count == len(raw)
    upgraded = dict(new.store.iter_embeddings())
    ids = sorted(raw)
    expected = new.store.correction.documents(np.stack([raw[i] for i in ids]))
    assert np.allclose(np.stack([upgraded[i] for i in ids]), expected, atol=1e-5)  # the same vectors, corrected
    assert new.search("moon night", 1, mode="sparse")[0]["doc_id"] == "night.txt"
    with pytest.raises(ValueError, match="keep-vectors"):
        rebuild(tmp_path / "idx", settings, keep_vectors=True, encoder_overrides={"method": "vanilla"})


def test_eval_pipeline_scores_exactly_what_the_retriever_returns(tmp_path, embedding):
    corpus = {f"d{i}": Document(f"title {i}", long_doc(2, seed=5 * i)) for i in range(12)}
    queries = {"q1": "the cat sat on the mat", "q2": "fish in the sea", "q3": "rain on the city"}
    qrels = {"q1": {"d1": 1}, "q2": {"d4": 1, "d5": 1}, "q3": {"d9": 1}}
    data = write_beir(tmp_path / "beir", corpus, queries, qrels, split="train")
    settings = settings_for(embedding)
    result = evaluate_pipeline(data, "train", mode="hybrid", settings=settings, index_dir=tmp_path / "idx",
                               per_query=True, embedding=embedding)
    assert result["queries"] == 3 and result["docs"] == 12 and 0.0 <= result["ndcg@10"] <= 1.0
    assert result["pipeline"]["ingest"]["added"] == 12 and result["pipeline"]["correction"] is not None
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    retriever = index.as_retriever(similarity_top_k=100)  # the index's default mode: hybrid
    for text in queries.values():
        hits = [{"doc_id": h.node.ref_doc_id, "score": h.score} for h in retriever.retrieve(text)]
        expected = ranked_documents(hits, 100)
        found = ranked_documents(index.search(text, 100), 100)
        assert list(found) == list(expected)
    again = evaluate_pipeline(data, "train", mode="sparse", settings=settings, index_dir=tmp_path / "idx",
                              embedding=embedding)
    assert again["pipeline"]["ingest"]["nodes_embedded"] == 0  # the kept index is reused
    reranked = evaluate_pipeline(data, "train", mode="hybrid", settings=settings, index_dir=tmp_path / "idx",
                                 embedding=embedding, rerank=True)
    assert reranked["method"] == "pipeline:hybrid+rerank" and reranked["pipeline"]["rerank"]["depth"] == 10
    # Each query's ranking starts with the documents a reranked search returns, in its order,
    # and goes on with the rest of the plain list.
    run, _ = pipeline_run(prepare_dataset(data, "train"), tmp_path / "idx", settings, mode="hybrid",
                          embedding=embedding, rerank=True)
    for query_id, text in queries.items():
        head = list(ranked_documents(index.search(text, 10, rerank=True), 10))
        assert list(run[query_id])[: len(head)] == head
        assert set(run[query_id]) == set(ranked_documents(index.search(text, 100), 100))


def test_cli_query_modes_and_info(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", str(tiny_model_dir))
    monkeypatch.setenv("HTP_INDEX_ENCODER__SEGMENTER", "sentencizer")
    monkeypatch.setenv("HTP_INDEX_CHUNK_SIZE", "48")
    runner = CliRunner()
    write_docs(tmp_path / "src", MANY)
    assert runner.invoke(app, ["ingest", "src", "--index", "idx", "--json"]).exit_code == 0
    for mode in ("dense", "sparse", "hybrid"):
        result = runner.invoke(app, ["query", "moon night", "--index", "idx", "--mode", mode, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["results"][0]["doc_id"] == "night.txt" or mode == "dense"
    bad = runner.invoke(app, ["query", "x", "--index", "idx", "--mode", "fuzzy"])
    assert bad.exit_code == 2
    info = json.loads(runner.invoke(app, ["info", "--index", "idx", "--json", "--drift"]).stdout)
    assert info["query_modes"] == ["dense", "sparse", "hybrid"]
    assert info["correction"]["fitted_on"] == info["count"]
    assert abs(info["correction_drift"]["drift"]) < 1e-3


def test_service_modes_hostile_text_and_health(tmp_path, embedding):
    settings = settings_for(embedding)
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings, embedding=embedding)
    holder = IndexHolder(tmp_path / "idx", settings, open_index(tmp_path / "idx", settings, embedding=embedding))
    with TestClient(create_app(tmp_path / "idx", settings, holder=holder, reload_interval=0)) as client:
        health = client.get("/health").json()
        assert health["modes"] == ["dense", "sparse", "hybrid"] and health["default_mode"] == "hybrid"
        for mode in ("dense", "sparse", "hybrid"):
            alpha = {"alpha": 0.4} if mode == "hybrid" else {}  # other modes refuse it (test_service)
            response = client.post("/query", json={"query": "moon at night", "top_k": 3, "mode": mode, **alpha})
            assert response.status_code == 200 and response.json()["results"]
        for text in ['"NEAR(a b)" AND *', "ver1.1 -x", "🐝", "w " * 2000, "the of and"]:
            response = client.post("/query", json={"query": text, "mode": "sparse"})
            assert response.status_code == 200, response.text
        assert client.post("/query", json={"query": "x", "mode": "fuzzy"}).status_code == 422
        assert client.post("/query", json={"query": "x", "alpha": 2}).status_code == 422


def test_one_request_path_batches_mixed_modes(tmp_path, embedding):
    settings = settings_for(embedding)
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings, embedding=embedding)
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    requests = [SearchRequest("moon night", 3, mode=m) for m in ("dense", "sparse", "hybrid")]
    batched = index.search_many(requests)
    one_by_one = [index.search("moon night", 3, mode=r.mode) for r in requests]
    # A batch of two queries goes through other matmul kernels than a batch of one, so the
    # scores agree to float32 rounding (~1e-7 here), not bit for bit; everything else is equal.
    for got, want in zip(batched, one_by_one, strict=True):
        assert [{k: v for k, v in hit.items() if k != "score"} for hit in got] == \
            [{k: v for k, v in hit.items() if k != "score"} for hit in want]
        assert [hit["score"] for hit in got] == pytest.approx([hit["score"] for hit in want], abs=1e-5)


def test_as_retriever_in_hybrid_mode_fuses_with_the_index_alpha_like_search(index_dir, embedding):
    """The configured alpha applies to a hybrid retriever that names its mode too."""
    index = open_index(index_dir, settings_for(embedding, alpha=0.9), embedding=embedding)
    query = "the cat in the sea"
    searched = [(h["node_id"], round(h["score"], 6)) for h in index.search(query, 3, mode="hybrid")]
    retriever = index.as_retriever(similarity_top_k=3, vector_store_query_mode="hybrid")
    assert [(h.node.node_id, round(h.score, 6)) for h in retriever.retrieve(query)] == searched
    default = open_index(index_dir, settings_for(embedding), embedding=embedding)
    assert [(h["node_id"], round(h["score"], 6)) for h in default.search(query, 3, mode="hybrid")] != searched


def test_query_settings_asking_for_another_encoder_are_named_in_a_warning(index_dir, embedding, caplog):
    """Queries use the index's recorded encoder; settings asking for another one do nothing
    here, which is said rather than passed over."""
    settings = settings_for(embedding)
    settings = settings.model_copy(update={"encoder": settings.encoder.model_copy(update={"method": "vanilla"})})
    settings.encoder.model_fields_set.add("method")
    with caplog.at_level("WARNING", logger="pipelines.query"):
        index = open_index(index_dir, settings, embedding=embedding)
    assert "method='vanilla'" in caplog.text and "rebuild" in caplog.text
    assert index.encoder.config.method == "htp"
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipelines.query"):
        open_index(index_dir, settings_for(embedding), embedding=embedding)
    assert "rebuild" not in caplog.text


def _apply_failing_once(index_dir, source, settings, embedding, monkeypatch, fails_when):
    """An ingest run step by step as the flows run it, whose first store write for which
    ``fails_when(store)`` holds raises, and whose apply step is then run again (the task's
    retry); returns the retry's stats."""
    from pipelines.engine import IndexSession, embed_batch

    real_add, failures = FaissVectorStore.add, iter([OSError("a passing write error")])

    def flaky_add(self, *args, **kwargs):
        failure = next(failures, None) if fails_when(self) else None
        if failure is not None:
            raise failure
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(FaissVectorStore, "add", flaky_add)
    with IndexSession.open(index_dir, settings, encoder=embedding.encoder) as session:
        plan = session.plan(source)
        split = session.split(plan.to_embed)
        embedded = [embed_batch(batch, session.encoder) for batch in split.batches(8)]
        with pytest.raises(OSError, match="passing write error"):
            session.apply(plan, split, embedded)
        return session.apply(plan, split, embedded)


def test_a_retried_apply_starts_from_the_index_as_committed(tmp_path, embedding, monkeypatch):
    """The flows retry a failed apply step. The retry reused the store the failed attempt had
    changed: an attempt that fitted the correction (taking the earlier nodes out to write them
    back corrected) failed on its first write, and the retry, seeing a correction set, never
    wrote them back; the run ended Completed with the first ingest's documents gone."""
    settings, index_dir = settings_for(embedding), tmp_path / "idx"
    source = write_docs(tmp_path / "src", DOCS)
    ingest(source, index_dir, settings, embedding=embedding)  # too few nodes for a correction
    write_docs(source, {k: v for k, v in MANY.items() if k not in DOCS})
    stats = _apply_failing_once(index_dir, source, settings, embedding, monkeypatch,
                                fails_when=lambda store: store.correction is not None)
    index = open_index(index_dir, settings, embedding=embedding)
    assert (stats.added, stats.unchanged) == (len(MANY) - len(DOCS), len(DOCS))
    assert set(index.store.doc_hashes()) == set(MANY) and index.store.correction is not None
    assert stats.count == index.store.count == len(index.store.all_nodes()) >= len(MANY)


def test_a_retried_apply_of_a_new_index_writes_it_once(tmp_path, embedding, monkeypatch):
    settings, index_dir = settings_for(embedding), tmp_path / "idx"
    stats = _apply_failing_once(index_dir, write_docs(tmp_path / "src", MANY), settings, embedding, monkeypatch,
                                fails_when=lambda store: True)
    index = open_index(index_dir, settings, embedding=embedding)
    assert stats.added == len(MANY) and stats.version == index.version == 1
    assert set(index.store.doc_hashes()) == set(MANY) and index.store.count == len(index.store.all_nodes())
