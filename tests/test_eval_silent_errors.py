"""Evaluation, the reranker's surroundings and the LlamaIndex index that used to be silently
wrong: documents ranked from top-k nodes, a reused index keeping other samples, ties scored in
another order, empty splits scored 0, a header-less qrels file, the reported split, BM25
"fused" with itself, and as_index() engines searching dense-only (each failed before its fix)."""

from __future__ import annotations

import pytest
from pipeline_helpers import settings_for

from pipelines.beir import Document, write_beir
from pipelines.eval_pipeline import evaluate_pipeline, pipeline_run
from pipelines.evaluation import evaluate, prepare_dataset
from pipelines.query import open_index


# --------------------------------------------------------------------------- eval --pipeline
def test_pipeline_eval_scores_ties_in_the_order_the_product_returns_them(tmp_path, embedding):
    """Two documents with the same text tie in BM25; the product returns 'a' first (ties by
    faiss id), so a query judging 'a' relevant has its answer at rank 1. The eval hands
    pytrec_eval raw scores, which re-breaks ties by document id descending: 'b' first, MRR 0.5."""
    corpus = {"a": Document("", "zebra sat on the mat ."), "b": Document("", "zebra sat on the mat ."),
              "c": Document("", "fish swam in the sea ."), "d": Document("", "rain fell on city at night .")}
    data = write_beir(tmp_path / "beir", corpus, {"q": "zebra mat"}, {"q": {"a": 1}}, split="train")
    settings = settings_for(embedding)
    result = evaluate_pipeline(data, "train", mode="sparse", settings=settings, index_dir=tmp_path / "idx",
                               embedding=embedding)
    hits = open_index(tmp_path / "idx", settings, embedding=embedding).search("zebra mat", 10, mode="sparse")
    assert hits[0]["doc_id"] == "a"  # what a user sees first
    assert result["mrr@10"] == 1.0, "eval scored another order than the product returned"


def test_pipeline_eval_ranks_top_k_documents_not_top_k_nodes(tmp_path, embedding):
    """pipeline_run asked for top_k *nodes* and folded them to documents, so a document split
    into several nodes crowded the others out (recall@100 over fewer than 100 documents). Here
    3 nodes of 'a' filled a top-3 that should hold the three matching documents a, b, c."""
    many = " ".join(["the zebra and the yak sat on the mat ."] * 12)  # several nodes
    corpus = {"a": Document("", many), "b": Document("", "the zebra ran in the park ."),
              "c": Document("", "the yak swam in the sea ."), "d": Document("", "rain fell on city at night .")}
    data = write_beir(tmp_path / "beir", corpus, {"q": "zebra yak"}, {"q": {"b": 1}}, split="train")
    settings = settings_for(embedding)
    run, info = pipeline_run(prepare_dataset(data, "train"), tmp_path / "idx", settings, mode="sparse", top_k=3,
                             embedding=embedding)
    assert info["ingest"]["nodes_embedded"] > len(corpus)  # 'a' really is several nodes
    assert set(run["q"]) == {"a", "b", "c"}, f"top-3 documents expected, got {run['q']}"


def test_pipeline_eval_on_a_kept_index_scores_only_this_sample(tmp_path, embedding):
    """With delete_missing=false in the user's settings (htp-index.toml), a kept --index-dir keeps
    the previous sample's documents: the second eval ranks documents that are not in its corpus
    while reporting docs=len(this corpus)."""
    first = {f"old{i}": Document("", f"the zebra sat on the mat number w{i} .") for i in range(4)}
    second = {"a": Document("", "the zebra ran in the park ."), "c": Document("", "fish swam in the sea .")}
    settings = settings_for(embedding, delete_missing=False)
    for name, corpus in (("one", first), ("two", second)):
        data = write_beir(tmp_path / name, corpus, {"q": "zebra"}, {"q": {next(iter(corpus)): 1}}, split="train")
        result = evaluate_pipeline(data, "train", mode="sparse", settings=settings, index_dir=tmp_path / "idx",
                                   embedding=embedding)
    assert result["docs"] == 2
    run, _ = pipeline_run(prepare_dataset(tmp_path / "two", "train"), tmp_path / "idx", settings, mode="sparse",
                          embedding=embedding)
    assert set(run["q"]) <= set(second), f"ranked documents outside the evaluated corpus: {sorted(run['q'])}"


# --------------------------------------------------------------------------- research harness
def test_evaluate_refuses_a_split_with_no_scorable_query(tmp_path):
    """qrels whose query ids match no query (e.g. '1' vs 'q1'): every query is dropped and a
    dense run reports NDCG@10 0.0 over 0 queries as a result instead of an error (bm25 raises
    an unrelated 'not enough values to unpack' from bm25s)."""
    from tiny_decoder import tiny_encoder

    corpus = {f"d{i}": Document("", f"the cat number {i}") for i in range(3)}
    data = write_beir(tmp_path / "beir", corpus, {"q1": "the cat"}, {"1": {"d1": 1}}, split="test")
    try:
        result = evaluate(data, "test", tiny_encoder(), cache_dir=tmp_path / "cache")
    except (ValueError, LookupError):
        return  # refused: fine
    pytest.fail(f"scored nothing and reported ndcg@10={result['ndcg@10']} over {result['queries']} queries")


def test_evaluate_reports_the_split_it_scored(tmp_path):
    """A prepared dataset (the benchmarks pass one) is scored on its own qrels, but the result
    names the ``split`` argument (default 'test' / 'train' in evaluate_pipeline), not that split."""
    corpus = {f"d{i}": Document("", f"the cat number {i}") for i in range(3)}
    data = write_beir(tmp_path / "beir", corpus, {"q1": "the cat"}, {"q1": {"d1": 1}}, split="dev")
    dataset = prepare_dataset(data, "dev")
    assert evaluate(dataset, encoder_or_settings="bm25")["split"] == "dev"


def test_evaluate_bm25_with_fuse_bm25_is_refused(tmp_path):
    """method bm25 with fuse_bm25=True fused nothing (method 'bm25') yet reported rrf_k=60."""
    corpus = {f"d{i}": Document("", f"the cat number {i}") for i in range(3)}
    data = write_beir(tmp_path / "beir", corpus, {"q1": "the cat"}, {"q1": {"d1": 1}}, split="test")
    with pytest.raises(ValueError, match="BM25 itself"):
        evaluate(data, "test", "bm25", fuse_bm25=True)


# --------------------------------------------------------------------------- LlamaIndex
def test_as_index_query_engine_searches_in_the_index_default_mode(index_dir, embedding):
    """README: 'Hybrid is the default' and `index.as_index()` 'gives a VectorStoreIndex for query
    or chat engines'. A query engine built from it retrieves with LlamaIndex's default mode
    (dense) instead of the index's hybrid/alpha/fusion, silently: other hits and scores than
    index.search and index.as_retriever give."""
    from llama_index.core.llms import MockLLM
    from llama_index.core.schema import QueryBundle

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    assert index.resolve_mode(None) == "hybrid"
    query = "the cat sat in the park"
    want = [(h["node_id"], pytest.approx(h["score"])) for h in index.search(query, 3)]
    retriever = [(h.node.node_id, pytest.approx(h.score)) for h in index.as_retriever(similarity_top_k=3).retrieve(query)]
    assert retriever == want  # as_retriever does apply the default
    engine = index.as_index().as_query_engine(llm=MockLLM(), similarity_top_k=3)
    got = [(h.node.node_id, h.score) for h in engine.retrieve(QueryBundle(query))]
    assert got == want


def test_qrels_without_a_header_keep_their_first_judgement(tmp_path):
    """read_qrels drops the first line 'whatever it says': a header-less qrels file (TREC-style
    exports, hand-written splits) silently loses its first judgement, and with it a query."""
    from pipelines.beir import read_qrels

    path = tmp_path / "test.tsv"
    path.write_text("q1\td1\t1\nq2\td2\t1\n", encoding="utf-8")
    assert read_qrels(path) == {"q1": {"d1": 1}, "q2": {"d2": 1}}
