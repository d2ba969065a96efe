"""The evaluation harness: metrics against hand-computed values, the embedding cache, subsampling,
BEIR loading, fusion and the ``eval`` command. Fast: BM25 and a tiny random decoder only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer
from data_paths import SHARED_DATA
from tiny_decoder import tiny_encoder
from typer.testing import CliRunner

from htp_cli.eval_command import JSON_KEYS, eval_command
from pipelines.beir import Document, load_beir, subsample, write_beir
from pipelines.errors import DatasetError
from pipelines.evaluation import (
    EmbeddingCache,
    evaluate,
    exact_search,
    reciprocal_rank_fusion,
    score_run,
    without_identical_ids,
)


def ranked(*doc_ids: str) -> dict[str, float]:
    """A run for one query in the given order (first = best)."""
    return {d: float(len(doc_ids) - i) for i, d in enumerate(doc_ids)}


FILLER = [f"x{i}" for i in range(20)]


# --------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computed_values_over_all_judgements():
    qrels = {
        "q1": {"d1": 1, "d2": 1},  # two relevant: rank 2 and rank 12
        "q2": {"d3": 1},  # rank 1
        "q3": {"d4": 1},  # judged but absent from the run: counts as 0, not skipped
        "q4": {"d7": 1},  # first relevant at rank 11: MRR@10 is 0, not 1/11
    }
    run = {
        "q1": ranked("x0", "d1", *FILLER[1:10], "d2"),
        "q2": ranked("d3", "x1"),
        "q4": ranked(*FILLER[:10], "d7"),
    }
    means, per_query = score_run(qrels, run)
    idcg_two = 1 + 1 / math.log2(3)
    assert per_query["q1"]["ndcg@10"] == pytest.approx((1 / math.log2(3)) / idcg_two)
    assert per_query["q1"]["recall@10"] == pytest.approx(0.5)
    assert per_query["q1"]["recall@100"] == pytest.approx(1.0)
    assert per_query["q1"]["mrr@10"] == pytest.approx(0.5)
    assert per_query["q3"] == {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    assert per_query["q4"]["mrr@10"] == 0.0 and per_query["q4"]["recall@100"] == 1.0
    assert means["ndcg@10"] == pytest.approx(((1 / math.log2(3)) / idcg_two + 1) / 4)
    assert means["recall@10"] == pytest.approx(1.5 / 4)
    assert means["recall@100"] == pytest.approx(3 / 4)
    assert means["mrr@10"] == pytest.approx(1.5 / 4)

    # Keeping only the first relevant document (the reference evaluator's bug) changes q1.
    first_only, _ = score_run({"q1": {"d1": 1}}, {"q1": run["q1"]})
    assert first_only["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert first_only["recall@10"] == 1.0


def test_graded_relevance_uses_linear_gains():
    _, per_query = score_run({"q": {"a": 2, "b": 1}}, {"q": ranked("b", "a")})
    dcg = 1 + 2 / math.log2(3)
    idcg = 2 + 1 / math.log2(3)
    assert per_query["q"]["ndcg@10"] == pytest.approx(dcg / idcg)


def test_exact_search_returns_the_true_top_k():
    rng = np.random.default_rng(0)
    queries, docs = rng.normal(size=(5, 8)), rng.normal(size=(40, 8))
    doc_ids = [f"d{i}" for i in range(40)]
    run = exact_search(queries, docs, [f"q{i}" for i in range(5)], doc_ids, top_k=7)
    for i in range(5):
        expected = {doc_ids[j] for j in np.argsort(-(docs @ queries[i]))[:7]}
        assert set(run[f"q{i}"]) == expected


def test_reciprocal_rank_fusion_order_and_scores():
    lexical = {"q": ranked("a", "b", "c")}
    dense = {"q": ranked("c", "a", "d")}
    fused = reciprocal_rank_fusion([lexical, dense], k=60)["q"]
    assert list(sorted(fused, key=fused.get, reverse=True)) == ["a", "c", "b", "d"]
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["d"] == pytest.approx(1 / 63)


# --------------------------------------------------------------------------- data
WORDS = ["cat", "dog", "bird", "fish", "sun", "moon", "rain", "river", "wind", "tree"]


@pytest.fixture
def mini_beir(tmp_path):
    """Ten documents, each about one word; query i asks for word i (documents i and i+5)."""
    corpus = {
        f"d{i}": Document(f"the {WORDS[i]}", f"the {WORDS[i]} sat on the mat . the {WORDS[i]} ran")
        for i in range(10)
    }
    corpus["empty-title"] = Document("", "protein binds receptor")
    queries = {f"q{i}": f"the {WORDS[i]}" for i in range(5)} | {"unjudged": "the cat"}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(5)}
    qrels["q0"]["d5"] = 1
    return write_beir(tmp_path / "mini", corpus, queries, qrels, split="train")


def test_load_beir_formats_titles_and_drops_unjudged_queries(mini_beir):
    dataset = load_beir(mini_beir, "train")
    assert set(dataset.queries) == {f"q{i}" for i in range(5)}
    assert dataset.qrels["q0"] == {"d0": 1, "d5": 1}
    assert dataset.corpus["d0"].embedding_text() == "the cat. the cat sat on the mat . the cat ran"
    assert dataset.corpus["empty-title"].embedding_text() == "protein binds receptor"
    assert Document("Done.", "Text").embedding_text() == "Done. Text"
    with pytest.raises(DatasetError, match="no qrels for split 'test'.*available: train"):
        load_beir(mini_beir, "test")


def test_max_docs_keeps_every_judged_document_and_is_reproducible(mini_beir):
    dataset = load_beir(mini_beir, "train")
    small = subsample(dataset, max_docs=2, max_queries=3, seed=1)
    judged = {d for docs in small.qrels.values() for d in docs}
    assert len(small.queries) == 3
    assert judged <= set(small.corpus)
    assert len(small.corpus) == len(judged) + 2
    again = subsample(dataset, max_docs=2, max_queries=3, seed=1)
    assert again.corpus_hash() == small.corpus_hash()
    assert subsample(dataset, max_docs=3, max_queries=3, seed=1).corpus_hash() != small.corpus_hash()


def test_bm25_on_the_mini_dataset(mini_beir):
    result = evaluate(mini_beir, "train", "bm25", per_query=True)
    assert result["queries"] == 5 and result["docs"] == 11
    assert result["per_query"]["q1"]["mrr@10"] == 1.0
    assert set(result) >= set(JSON_KEYS)


def test_a_query_hit_on_its_own_id_is_left_out_as_in_beir(tmp_path):
    """ArguAna-like: each query is also a document (same id), unjudged for itself. BEIR's
    evaluator leaves that hit out by default; scoring it ranks the judged document second."""
    corpus = {"a1": Document("", "cats purr loudly when fed fish"),
              "a2": Document("", "dogs bark loudly at the postman"),
              "r1": Document("", "a cat purrs when it is fed"),
              "r2": Document("", "a dog barks at a postman")}
    queries = {"a1": "cats purr loudly when fed fish", "a2": "dogs bark loudly at the postman"}
    root = write_beir(tmp_path / "argu", corpus, queries, {"a1": {"r1": 1}, "a2": {"r2": 1}}, split="test")

    run, dropped = without_identical_ids({"a1": ranked("a1", "r1"), "a2": ranked("r2", "x"), "a3": {}})
    assert dropped == 1 and list(run["a1"]) == ["r1"] and run["a2"] == ranked("r2", "x") and run["a3"] == {}

    beir_like = evaluate(root, "test", "bm25")
    assert beir_like["mrr@10"] == 1.0 and beir_like["sample"]["identical_ids_dropped"] == 2
    kept = evaluate(root, "test", "bm25", ignore_identical_ids=False)
    assert kept["mrr@10"] == 0.5 and "identical_ids_dropped" not in kept["sample"]

    app = typer.Typer()
    app.command()(eval_command)
    for flags, mrr in (([], 1.0), (["--keep-identical-ids"], 0.5)):
        result = CliRunner().invoke(app, [str(root), "--split", "test", "--method", "bm25", "--json", *flags])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["mrr@10"] == mrr


# --------------------------------------------------------------------------- cache
def test_embeddings_are_cached_and_any_change_misses(mini_beir, tmp_path):
    encoder = tiny_encoder(method="vanilla")
    first = evaluate(mini_beir, "train", encoder, cache_dir=tmp_path / "cache")
    assert first["cache"] == {"hits": 0, "misses": 2, "dir": str(tmp_path / "cache")}
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2

    again = evaluate(mini_beir, "train", encoder, cache_dir=tmp_path / "cache")
    assert again["cache"]["hits"] == 2 and again["cache"]["misses"] == 0
    assert again["ndcg@10"] == first["ndcg@10"]

    changed = encoder.with_method("htp", k=1)
    assert evaluate(mini_beir, "train", changed, cache_dir=tmp_path / "cache")["cache"]["misses"] == 2
    deeper = encoder.with_method("vanilla", exit_layer=2)
    assert evaluate(mini_beir, "train", deeper, cache_dir=tmp_path / "cache")["cache"]["misses"] == 2
    # Another subsample changes the documents but not the queries.
    resampled = evaluate(mini_beir, "train", encoder, cache_dir=tmp_path / "cache", max_docs=1)
    assert resampled["cache"] == {"hits": 1, "misses": 1, "dir": str(tmp_path / "cache")}


def test_cache_ignores_a_matrix_of_the_wrong_size(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.save("k", np.zeros((3, 4), np.float32), {})
    assert cache.load("k", 3) is not None
    assert cache.load("k", 5) is None


# --------------------------------------------------------------------------- command
def test_eval_command_json_prints_exactly_the_metrics(mini_beir, tmp_path):
    app = typer.Typer()
    app.command()(eval_command)
    result = CliRunner().invoke(
        app, [str(mini_beir), "--method", "bm25", "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert list(payload) == ["ok", *JSON_KEYS, "sample"]  # the metrics, and what the dataset dropped
    assert payload["ok"] is True  # as every command's --json answer says it (only failures did)
    assert payload["queries"] == 5 and isinstance(payload["docs"], int)
    assert isinstance(payload["ndcg@10"], float)
    help_text = CliRunner().invoke(app, ["--help"]).output
    for option in ("--split", "--method", "--model", "--k", "--rewire-start", "--rewire-stop",
                   "--exit-layer", "--max-docs", "--max-queries", "--batch-size",
                   "--max-length", "--json", "--cache-dir"):
        assert option in help_text


@pytest.mark.parametrize("options", [
    ["--pipeline", "--mode", "sparse", "--batch-size", "3"], ["--method", "bm25", "--batch-size", "3"],
    ["--method", "minilm", "--batch-size", "3"], ["--method", "bm25", "--seed", "99"],
    ["--method", "bm25", "--cache-dir", "evcache"]])
def test_eval_options_that_would_change_nothing_are_refused(mini_beir, tmp_path, monkeypatch, options):
    """Each was accepted and silently unused: --batch-size by --pipeline (the settings' encoder)
    and the reference methods, --seed without a subsample, --cache-dir by BM25 (its cache
    statistics printed, the folder never created)."""
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command()(eval_command)
    result = CliRunner().invoke(app, [str(mini_beir), *options])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and options[-2] in said, said
    assert not (tmp_path / "evcache").exists()
    sampled = CliRunner().invoke(app, [str(mini_beir), "--method", "bm25", "--seed", "99", "--max-queries", "2"])
    assert sampled.exit_code == 0, sampled.output


def test_a_fused_run_is_titled_as_the_fusion(mini_beir, tmp_path):
    """eval --fuse-bm25 printed its table under the plain method's title; only --json said rrf."""
    encoder = tiny_encoder(method="vanilla")
    plain = evaluate(mini_beir, "train", encoder, cache_dir=tmp_path / "cache")
    fused = evaluate(mini_beir, "train", encoder, cache_dir=tmp_path / "cache", fuse_bm25=True)
    assert fused["describe"] == f"rrf(bm25, {plain['describe']})"
    assert evaluate(mini_beir, "train", "bm25")["cache"] is None  # BM25 embeds nothing


# --------------------------------------------------------------------------- real data
@pytest.mark.skipif(not (SHARED_DATA / "scifact").exists(), reason="shared SciFact data absent")
def test_scifact_subsample_keeps_all_judged_documents():
    dataset = load_beir(SHARED_DATA / "scifact", "train")
    assert len(dataset.queries) == 809 and len(dataset.corpus) == 5183
    assert sum(len(v) for v in dataset.qrels.values()) == 919
    small = subsample(dataset, max_docs=100, max_queries=50)
    judged = {d for docs in small.qrels.values() for d in docs}
    assert judged <= set(small.corpus) and len(small.corpus) == len(judged) + 100
