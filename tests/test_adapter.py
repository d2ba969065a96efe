"""The per-index linear adapter (correction kind "adapter"): fitted from pseudo-query -> node
pairs alone, deterministic, stored with the version without pickle, and applied alike to the
documents at ingest and to queries at search through the real pipeline (tiny decoder, FAISS)."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_helpers import DOCS, long_doc, settings_for, write_docs
from typer.testing import CliRunner

import pipelines.adapter
import pipelines.correction
from htp_cli.main import app
from indexes import FaissVectorStore, VectorCorrection
from pipelines.adapter import MIN_PAIRS, fit_linear_adapter
from pipelines.chunking import embed_text
from pipelines.ingest import ingest
from pipelines.query import open_index
from pipelines.rebuild import rebuild

MANY = {**DOCS, **{f"extra{i}.txt": long_doc(3, seed=5 * i) for i in range(12)}}


def _normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def distorted_pairs(seed: int, nodes: int = 300, pairs: int = 1200, dim: int = 24):
    """Pseudo-queries that are their node plus strong noise confined to a few directions: a
    map that shrinks those directions finds each query's node far more often."""
    rng = np.random.default_rng(seed)
    docs = _normalised(rng.normal(size=(nodes, dim)))
    source = rng.integers(0, nodes, size=pairs)
    noise = np.zeros((pairs, dim), dtype=np.float32)
    noise[:, :6] = rng.normal(scale=1.2, size=(pairs, 6))
    return _normalised(docs[source] + noise), docs, source


def mrr(queries: np.ndarray, docs: np.ndarray, source: np.ndarray) -> float:
    scores = queries @ docs.T
    positive = scores[np.arange(len(queries)), source]
    return float(np.mean(1.0 / (1 + (scores > positive[:, None]).sum(1))))


def test_the_adapter_learns_what_separates_queries_from_their_nodes_and_generalises():
    queries, docs, source = distorted_pairs(0)
    fitted = fit_linear_adapter(queries, docs, source)
    assert fitted is not None and fitted.pairs == len(queries) and fitted.epochs >= 1
    before, after = fitted.heldout_mrr
    assert after > before + 0.05
    # on pairs it never saw (same nodes, new noise), through VectorCorrection as the store applies it
    fresh_queries, _, fresh_source = distorted_pairs(0, pairs=600)
    rng = np.random.default_rng(9)
    fresh_queries = _normalised(docs[fresh_source] + np.pad(rng.normal(scale=1.2, size=(600, 6)), ((0, 0), (0, 18))))
    plain = VectorCorrection.fit(docs, fresh_queries)
    adapted = plain.with_adapter(fitted.matrix, docs, pairs=fitted.pairs, epochs=fitted.epochs,
                                 heldout_mrr=fitted.heldout_mrr)
    gain = mrr(adapted.queries(fresh_queries), adapted.documents(docs), fresh_source) - mrr(
        plain.queries(fresh_queries), plain.documents(docs), fresh_source)
    assert gain > 0.05


def test_the_same_pairs_give_the_same_map_and_too_few_pairs_give_none():
    queries, docs, source = distorted_pairs(1)
    first, second = fit_linear_adapter(queries, docs, source), fit_linear_adapter(queries, docs, source)
    assert np.array_equal(first.matrix, second.matrix)
    other = fit_linear_adapter(queries, docs, source, seed=1)
    assert not np.array_equal(first.matrix, other.matrix)
    assert fit_linear_adapter(queries[: MIN_PAIRS - 1], docs, source[: MIN_PAIRS - 1]) is None


def test_an_adapter_correction_round_trips_through_json_and_rejects_a_bad_matrix(tmp_path):
    queries, docs, source = distorted_pairs(2)
    fitted = fit_linear_adapter(queries, docs, source)
    correction = VectorCorrection.fit(docs, queries).with_adapter(
        fitted.matrix, docs, pairs=fitted.pairs, epochs=fitted.epochs, heldout_mrr=fitted.heldout_mrr)
    correction.save(tmp_path / "correction.json")
    loaded = VectorCorrection.load(tmp_path / "correction.json")
    assert loaded == correction and loaded.kind == "adapter"
    assert np.array_equal(loaded.queries(queries[:5]), correction.queries(queries[:5]))
    assert loaded.summary()["adapter_pairs"] == len(queries)
    assert loaded.summary()["adapter_distance_from_identity"] > 0
    with pytest.raises(ValueError, match="24 x 24"):
        correction.with_adapter(np.eye(23), docs, pairs=1, epochs=1, heldout_mrr=(0.0, 0.0))
    with pytest.raises(ValueError, match="finite"):
        correction.with_adapter(np.full((24, 24), np.nan), docs, pairs=1, epochs=1, heldout_mrr=(0.0, 0.0))
    with pytest.raises(ValueError, match="adapter"):
        VectorCorrection(**{**correction.model_dump(), "adapter": None})


def test_an_index_with_an_adapter_applies_it_to_documents_and_queries(tmp_path, embedding, monkeypatch):
    # The tiny corpus has a few dozen sentences: let it fit (the mechanics, not the gain).
    monkeypatch.setattr(pipelines.adapter, "MIN_PAIRS", 8)
    settings = settings_for(embedding, correction="adapter")
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings, embedding=embedding)
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    correction = index.store.correction
    assert correction is not None and correction.kind == "adapter" and correction.adapter_pairs >= 8
    nodes = index.store.all_nodes()
    raw = embedding.encoder.encode_documents([embed_text(n) for n in nodes])
    stored = dict(index.store.iter_embeddings())
    expected = correction.documents(raw)
    assert np.allclose(np.stack([stored[n.node_id] for n in nodes]), expected, atol=1e-4)
    assert not np.allclose(expected, correction.centred_documents(raw), atol=1e-3)  # the map did something
    query = "the moon over the sea"
    scores = expected @ correction.queries(embedding.encoder.encode_queries([query]))[0]
    hits = index.search(query, 4, mode="dense")
    assert [h["node_id"] for h in hits] == [nodes[i].node_id for i in np.argsort(-scores)[:4]]
    info = CliRunner().invoke(app, ["info", "--index", str(tmp_path / "idx"), "--json"])
    assert info.exit_code == 0 and '"adapter_pairs"' in info.output


def test_a_corpus_too_small_for_an_adapter_gets_the_centring_alone(tmp_path, embedding):
    settings = settings_for(embedding, correction="adapter")
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings, embedding=embedding)
    correction = FaissVectorStore.open(tmp_path / "idx").correction
    assert correction is not None and correction.kind == "center" and correction.adapter is None


def test_the_adapter_draws_two_pseudo_queries_per_node(embedding, monkeypatch):
    # 40 texts of three 7-word sentences: 120 candidate sentences, 2 per node = 80 pairs (one
    # per node measured 1 NDCG@10 lower on the development split: quality/adapter_pairs.md).
    monkeypatch.setattr(pipelines.adapter, "MIN_PAIRS", 8)
    monkeypatch.setattr(pipelines.correction, "PSEUDO_QUERIES", 4)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(f"{words[(i + j) % 12]} {words[(i * j + s) % 12]} stone river {words[s]} light falls."
                      for j, s in enumerate((1, 5, 9))) for i in range(40)]
    docs = embedding.encoder.encode_documents(texts)
    correction = pipelines.correction.fit_correction(docs, texts, embedding.encoder, kind="adapter")
    assert correction is not None and correction.kind == "adapter"
    assert correction.adapter_pairs == 2 * len(texts)


def test_a_rebuild_keeps_the_index_s_correction_kind_unless_one_is_set(tmp_path, embedding, monkeypatch):
    # A rebuild run under other settings (a cron job without the opt-in) used to fit the
    # settings' default and turn an adapter index into a centring one without a word.
    monkeypatch.setattr(pipelines.adapter, "MIN_PAIRS", 8)
    ingest(write_docs(tmp_path / "src", MANY), tmp_path / "idx", settings_for(embedding, correction="adapter"),
           embedding=embedding)
    assert FaissVectorStore.open(tmp_path / "idx").correction.kind == "adapter"
    rebuild(tmp_path / "idx", settings_for(embedding), embedding=embedding)
    kept = FaissVectorStore.open(tmp_path / "idx").correction
    assert kept is not None and kept.kind == "adapter" and kept.adapter is not None
    rebuild(tmp_path / "idx", settings_for(embedding, correction="center"), embedding=embedding)
    assert FaissVectorStore.open(tmp_path / "idx").correction.kind == "center"
    rebuild(tmp_path / "idx", settings_for(embedding, correction="none"), embedding=embedding)
    assert FaissVectorStore.open(tmp_path / "idx").correction is None
