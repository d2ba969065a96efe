"""Evaluation, the reranker's surroundings and the LlamaIndex index that used to be silently
wrong: documents ranked from top-k nodes, a reused index keeping other samples, ties scored in
another order, empty splits scored 0, a header-less qrels file, the reported split, BM25
"fused" with itself, and as_index() engines searching dense-only (each failed before its fix)."""

from __future__ import annotations

import json

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


def test_ids_are_read_as_ingest_reads_them_and_the_first_duplicate_is_kept(tmp_path):
    # ' d4 ' in the corpus and qrels: ingest strips it, so a hit on 'd4' scored as a miss; a
    # repeated _id kept the last record, where ingest keeps the first
    from pipelines.beir import load_beir

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text('{"_id": " d4 ", "text": "first"}\n{"_id": "d4", "text": "second"}\n'
                                       '{"_id": "d5", "text": "other"}\n')
    (root / "queries.jsonl").write_text('{"_id": " q1", "text": "what"}\n')
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1 \t d4 \t1\nq9\td5\t1\nq1\tgone\t1\n")
    data = load_beir(root, "test")
    assert data.corpus["d4"].text == "first" and data.qrels == {"q1": {"d4": 1}}
    assert data.notes == {"repeated_doc_ids": 1, "dropped_judgements_missing_docs": 1,
                          "dropped_judged_queries_missing": 1}


def test_a_judgement_line_that_is_not_three_fields_is_refused_by_line_not_skipped(tmp_path):
    """'q2 d3 1' with spaces was skipped without a word: query q2 left the evaluation and the
    NDCG it reported rose (0.544 -> 0.815 on the trial's three queries)."""
    from pipelines.beir import read_qrels
    from pipelines.errors import DatasetError

    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2 d3 1\n\nq3\td3\t1\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"test.tsv:3: 1 tab-separated field\(s\) where a judgement has 3"):
        read_qrels(path)
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq3\td3\t1\n", encoding="utf-8")
    assert read_qrels(path) == {"q1": {"d1": 1}, "q3": {"d3": 1}}  # a blank line is nothing


def test_a_pair_graded_twice_is_refused_when_the_grades_differ_and_noted_when_they_agree(tmp_path):
    """The last grade won: 'q1 d1 1' then 'q1 d1 0' made q1's answer not relevant (NDCG
    0.544 -> 0.210) and a repeated query _id kept its first text, both without a word."""
    from pipelines.beir import load_beir
    from pipelines.errors import DatasetError

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": "b"}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n{"_id": "q1", "text": "second"}\n')
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td2\t0\nq1\td1\t0\n")
    with pytest.raises(DatasetError, match=r"test.tsv:3: query 'q1' grades document 'd1' 0, where line 1 graded it 1"):
        load_beir(root, "test")
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td1\t1\n")
    data = load_beir(root, "test")
    assert data.queries == {"q1": "first"} and data.qrels == {"q1": {"d1": 1}}
    assert data.notes == {"repeated_query_ids": 1, "repeated_judgements": 1}


def test_empty_documents_and_queries_left_without_judgements_are_counted(tmp_path):
    # an empty record was scored by --method (ingest leaves it out), and a query whose judged
    # documents were all missing left the evaluation with only its judgements counted
    from pipelines.beir import load_beir

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d2", "title": "", "text": " "}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b"}\n')
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq2\td2\t1\nq2\td9\t1\n")
    data = load_beir(root, "test")
    assert set(data.corpus) == {"d1"} and data.qrels == {"q1": {"d1": 1}}
    assert data.notes == {"empty_docs": 1, "dropped_judgements_missing_docs": 2,
                          "dropped_queries_all_judged_docs_missing": 1}


def test_a_dataset_written_with_byte_order_marks_is_read_as_ingest_reads_it(tmp_path):
    from pipelines.beir import load_beir

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_bytes(b'\xef\xbb\xbf{"_id": "d1", "text": "a cat"}\r\n')
    (root / "queries.jsonl").write_bytes(b'\xef\xbb\xbf{"_id": "q1", "text": "cat"}\r\n')
    (root / "qrels" / "test.tsv").write_bytes(b"\xef\xbb\xbfquery-id\tcorpus-id\tscore\r\nq1\td1\t1\r\n")
    data = load_beir(root, "test")
    assert data.qrels == {"q1": {"d1": 1}} and data.queries == {"q1": "cat"} and set(data.corpus) == {"d1"}


@pytest.mark.parametrize(("damage", "said"), [
    (lambda root: (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": \n'),
     "corpus.jsonl:2: not a JSON record"),
    (lambda root: (root / "queries.jsonl").write_text('{"_id": "q1", "query": "no text field"}\n'),
     'queries.jsonl:1: a query needs a "text" string'),
    (lambda root: (root / "queries.jsonl").write_text('{"_id": "q1", "text": "   "}\n'),
     'queries.jsonl:1: a query needs a "text" string with a visible character'),
    (lambda root: (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d2", "title": "t"}\n'),
     'corpus.jsonl:2: a document needs a "text" string'),
    (lambda root: (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": 12345}\n'),
     'its "text" is 12345'),
    (lambda root: (root / "qrels" / "test.tsv").write_text("q1\t0\td1\t1\n"), "a TREC qrels line"),
    (lambda root: (root / "corpus.jsonl").unlink(), "corpus.jsonl is missing"),
    (lambda root: (root / "qrels" / "test.tsv").rename(root / "qrels" / "dev.tsv"), "no qrels for split 'test'"),
])
def test_a_malformed_dataset_is_one_error_line_and_exit_2_not_a_traceback(tmp_path, damage, said):
    from typer.testing import CliRunner

    from htp_cli.main import app

    data = write_beir(tmp_path / "beir", {"d1": Document("", "a cat"), "d2": Document("", "a dog")},
                      {"q1": "cat"}, {"q1": {"d1": 1}}, split="test")
    damage(data)
    result = CliRunner().invoke(app, ["eval", str(data), "--split", "test", "--method", "bm25"])
    assert result.exit_code == 2, result.output
    assert said in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("options", [["--max-queries", "0"], ["--max-docs", "-1"], ["--batch-size", "0"],
                                     ["--model", "nonexistent"], ["--k", "3"], ["--exit-layer", "4"],
                                     ["--fuse-bm25"]])
def test_options_a_bm25_evaluation_cannot_use_are_refused(tmp_path, options):
    """'--method bm25 --model nonexistent --k foo' exited 0 having used none of them, and
    '--max-queries 0' died unpacking an empty sample."""
    from typer.testing import CliRunner

    from htp_cli.main import app

    data = write_beir(tmp_path / "beir", {"d1": Document("", "a cat")}, {"q1": "cat"}, {"q1": {"d1": 1}}, split="test")
    result = CliRunner().invoke(app, ["eval", str(data), "--split", "test", "--method", "bm25", *options])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("options", "said"), [(["--method", "vanilla", "--k", "3"], "--k does not apply to method vanilla"),
                                             (["--method", "vanilla", "--k", "adaptive"],  # the default, given
                                              "--k does not apply to method vanilla"),
                                             (["--method", "last", "--rewire-start", "2"],
                                              "--rewire-start does not apply to method last")])
def test_options_the_encoders_method_ignores_are_refused_as_ingest_refuses_them(tmp_path, options, said):
    """`eval --method vanilla --k 3` scored plain vanilla (the same NDCG as without --k), exit 0,
    while ingest and rebuild refused the same options: one rule now answers for both."""
    from typer.testing import CliRunner

    from htp_cli.main import app

    data = write_beir(tmp_path / "beir", {"d1": Document("", "a cat")}, {"q1": "cat"}, {"q1": {"d1": 1}}, split="test")
    result = CliRunner().invoke(app, ["eval", str(data), "--split", "test", *options])
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output


def test_a_fractional_relevance_grade_is_refused_not_truncated(tmp_path):
    from pipelines.beir import read_qrels

    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t0.5\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test.tsv:2: score '0.5' is not a whole number"):
        read_qrels(path)
    path.write_text("q1\td1\t2.0\n", encoding="utf-8")
    assert read_qrels(path) == {"q1": {"d1": 2}}


def test_recall_at_k_is_over_k_documents_however_many_nodes_each_has(tmp_path, embedding):
    # the deeper search stopped at 16x top_k nodes: with 20-node documents a top-10 searched
    # 160 nodes, which named 8 documents, and the judged ones ranked 9-10 counted as missed
    corpus = {f"d{i:02d}": Document("", " ".join(f"the cat number w{j} sat on the mat ." for j in range(64)))
              for i in range(12)}
    data = write_beir(tmp_path / "beir", corpus, {"q": "mat"}, {"q": {"d00": 1}}, split="train")
    settings = settings_for(embedding, chunk_size=32)
    run, info = pipeline_run(prepare_dataset(data, "train"), tmp_path / "idx", settings, mode="sparse", top_k=10,
                             embedding=embedding)
    assert info["ingest"]["nodes_embedded"] > 16 * len(corpus)  # more than 16 nodes a document
    assert len(run["q"]) == 10


def test_eval_refuses_an_index_dir_that_holds_other_documents(tmp_path, embedding):
    # it made the user's index hold the dataset alone: their own documents deleted, exit 0
    from pipeline_helpers import write_docs

    from pipelines.errors import OptionConflictError
    from pipelines.ingest import ingest

    settings = settings_for(embedding)
    ingest(write_docs(tmp_path / "mine"), tmp_path / "idx", settings, embedding=embedding)
    data = write_beir(tmp_path / "beir", {"a": Document("", "the zebra sat .")}, {"q": "zebra"}, {"q": {"a": 1}},
                      split="train")
    with pytest.raises(OptionConflictError, match="not in the dataset"):
        evaluate_pipeline(data, "train", mode="sparse", settings=settings, index_dir=tmp_path / "idx",
                          embedding=embedding)
    assert "cats.txt" in open_index(tmp_path / "idx", settings, embedding=embedding).store.doc_hashes()


def test_pipeline_eval_leaves_a_query_hit_on_its_own_id_out_as_beir_does(tmp_path, embedding):
    """ArguAna-like: the query is also a document of its id, unjudged for itself, and the
    product finds it first. BEIR's evaluator leaves that hit out; scored, it halves MRR."""
    corpus = {"q": Document("", "zebra sat on the mat ."), "a": Document("", "a zebra and a mat ."),
              "c": Document("", "fish swam in the sea .")}
    data = write_beir(tmp_path / "beir", corpus, {"q": "zebra sat on the mat ."}, {"q": {"a": 1}}, split="train")
    settings = settings_for(embedding)
    beir_like = evaluate_pipeline(data, "train", mode="sparse", settings=settings, index_dir=tmp_path / "idx",
                                  embedding=embedding)
    assert beir_like["mrr@10"] == 1.0 and beir_like["sample"]["identical_ids_dropped"] == 1
    kept = evaluate_pipeline(data, "train", mode="sparse", settings=settings, index_dir=tmp_path / "idx",
                             embedding=embedding, ignore_identical_ids=False)
    assert kept["mrr@10"] == 0.5 and "identical_ids_dropped" not in kept["sample"]


def test_corpus_records_ingest_cannot_read_are_left_out_as_empty_ones_are(tmp_path):
    """A record of zero-width or control characters only passed as a document: `eval --method`
    scored it as relevant and retrievable, `eval --pipeline` failed outright (exit 1, naming its
    own temporary file) when ingest refused it. Both leave it out now, counted."""
    from pipelines.beir import load_beir

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    records = [{"_id": "d1", "text": "a cat sat"}, {"_id": "d2", "text": "\u200b"},
               {"_id": "d3", "text": "\u0001\u0002\u0003"}, {"_id": "d4", "title": "\u00ad", "text": "\u0000 "},
               {"_id": "d5", "text": "soft\u00adhyphen dog"}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "cat"}\n{"_id": "q2", "text": "dog"}\n'
                                        '{"_id": "q3", "text": "bird"}\n')
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td2\t1\nq2\td5\t1\nq3\td1\t0\n")
    data = load_beir(root, "test")
    assert set(data.corpus) == {"d1", "d5"}
    assert data.notes["empty_docs"] == 3
    # a query judging nothing relevant stays in (BEIR's evaluator averages it in at 0), counted
    assert set(data.queries) == {"q1", "q2", "q3"} and data.notes["queries_without_relevant_docs"] == 1


@pytest.mark.parametrize("text", ["\u200b", "\u0000\u0001", "\u00ad"])
def test_a_query_without_visible_text_is_refused_by_line(tmp_path, text):
    from pipelines.beir import load_beir
    from pipelines.errors import DatasetError

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "a cat"}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "cat"}\n' + json.dumps({"_id": "q2", "text": text}) + "\n")
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    with pytest.raises(DatasetError, match=r"queries.jsonl:2: a query needs a \"text\" string with a visible"):
        load_beir(root, "test")
