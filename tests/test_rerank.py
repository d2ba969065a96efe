"""Query-likelihood reranking: the scorer's arithmetic on a tiny decoder, checked against a plain
forward pass of each sequence alone, and its place in the one query path."""

from __future__ import annotations

import pytest
import torch
from tiny_decoder import build_model, build_tokenizer

from htp_embed.rerank import (
    DEFAULT_WEIGHT,
    QueryLikelihoodScorer,
    RerankUnavailableError,
    blend_scores,
)

PASSAGES = [
    "the cat sat on the mat .",
    "protein binds receptor cells grew faster in mice treated with the drug .",
    "rain fell on the quiet city at night",
    "the river flowed past the mill",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    tokenizer = build_tokenizer(bos=True)
    return build_model(len(tokenizer)), tokenizer


def reference_score(model, tokenizer, scorer: QueryLikelihoodScorer, query: str, passage: str) -> float:
    """Mean log p(query token | everything before it), one unpadded sequence at a time."""
    context = (scorer._bos + scorer._before
               + tokenizer(passage, add_special_tokens=False)["input_ids"][: scorer.max_passage_tokens]
               + scorer._after)
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + query_ids])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state[0]
        logits = hidden @ model.get_input_embeddings().weight.T
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return float(torch.stack([log_probs[len(context) - 1 + j, t] for j, t in enumerate(query_ids)]).mean())


def test_scores_equal_one_sequence_at_a_time_whatever_the_batching(tiny) -> None:
    model, tokenizer = tiny
    # 40 tokens a batch splits these passages into several padded batches, sorted by length.
    scorer = QueryLikelihoodScorer(model, tokenizer, batch_tokens=40)
    query = "did the drug reduce tumour growth in mice ?"
    scores = scorer.score(query, PASSAGES)
    assert len({round(s.log_likelihood, 6) for s in scores}) == len(PASSAGES)
    for passage, scored in zip(PASSAGES, scores, strict=True):
        assert scored.log_likelihood < 0
        assert scored.log_likelihood == pytest.approx(reference_score(model, tokenizer, scorer, query, passage), abs=1e-4)
    # One batch for all gives the same numbers.
    together = QueryLikelihoodScorer(model, tokenizer, batch_tokens=10_000).score(query, PASSAGES)
    assert [s.log_likelihood for s in together] == pytest.approx([s.log_likelihood for s in scores], abs=1e-4)


def test_passages_are_truncated_to_the_token_budget(tiny) -> None:
    model, tokenizer = tiny
    scorer = QueryLikelihoodScorer(model, tokenizer, max_passage_tokens=5)
    long = "the cat sat on the mat and the dog ran in the park"
    short = "the cat sat on the"
    a, b = scorer.score("where did the cat sit ?", [long, short])
    assert a.log_likelihood == pytest.approx(b.log_likelihood, abs=1e-5)
    assert a.passage_tokens == b.passage_tokens


def test_no_passages_and_empty_queries(tiny) -> None:
    model, tokenizer = tiny
    scorer = QueryLikelihoodScorer(model, tokenizer)
    assert scorer.score("the cat", []) == []
    assert [s.log_likelihood for s in scorer.score("", PASSAGES[:2])] == [0.0, 0.0]


def test_only_the_first_query_tokens_are_scored(tiny) -> None:
    """A 4,096-character query took 16 s to rerank ten hits and held up every plain query of
    the service meanwhile: its likelihood is that of its first MAX_QUERY_TOKENS tokens."""
    from htp_embed.rerank import MAX_QUERY_TOKENS

    model, tokenizer = tiny
    scorer = QueryLikelihoodScorer(model, tokenizer)
    words = "the cat sat on the mat and the dog ran in the park".split()
    long = " ".join(words[i % len(words)] for i in range(MAX_QUERY_TOKENS * 3))
    first = tokenizer.decode(tokenizer(long, add_special_tokens=False)["input_ids"][:MAX_QUERY_TOKENS])
    assert scorer.cuts_query(long) and not scorer.cuts_query(first) and not scorer.cuts_query("the cat")
    assert [s.log_likelihood for s in scorer.score(long, PASSAGES)] == pytest.approx(
        [s.log_likelihood for s in scorer.score(first, PASSAGES)], abs=1e-5)


def test_a_model_with_an_untied_output_head_is_refused_with_the_reason(tiny) -> None:
    _, tokenizer = tiny
    model = build_model(len(tokenizer))
    model.config.tie_word_embeddings = False
    with pytest.raises(RerankUnavailableError, match="tied embeddings"):
        QueryLikelihoodScorer(model, tokenizer)


# ----------------------------------------------------------------- through the query path
def test_blend_standardises_both_sides_and_tolerates_missing_or_equal_scores() -> None:
    assert blend_scores([3.0, 1.0], [-1.0, -2.0], 0.5) == pytest.approx([1.0, -1.0])
    # The likelihood alone decides at weight 1, the retrieval alone at 0.
    assert blend_scores([3.0, 1.0], [-2.0, -1.0], 1.0) == pytest.approx([-1.0, 1.0])
    assert blend_scores([3.0, 1.0], [-2.0, -1.0], 0.0) == pytest.approx([1.0, -1.0])
    # No retrieval score counts as the average; all-equal scores add nothing.
    assert blend_scores([None, 2.0, 4.0], [-1.0, -1.0, -1.0], 0.5) == pytest.approx([0.0, -0.5 * 1.5**0.5, 0.5 * 1.5**0.5])
    with pytest.raises(ValueError, match="within 0..1"):
        blend_scores([1.0], [1.0], 1.5)


QUERY = "the cat sat in the park"


def expected_rerank(index, query: str, top_k: int) -> list[tuple[str, float]]:
    """What reranking must return, from its parts: the plain candidates, the scorer, the blend."""
    candidates = index.search(query, max(top_k, index.rerank_depth), rerank=False)
    scorer = QueryLikelihoodScorer(index.encoder.model, index.encoder.tokenizer,
                                   max_passage_tokens=index.rerank_passage_tokens,
                                   segmenter=index.encoder.config.segmenter)
    likelihood = [s.log_likelihood for s in scorer.score(query, [hit["text"] for hit in candidates])]
    blended = blend_scores([hit["score"] for hit in candidates], likelihood, DEFAULT_WEIGHT)
    ranked = sorted(zip((hit["node_id"] for hit in candidates), blended, strict=True), key=lambda pair: -pair[1])
    return ranked[:top_k]


def test_a_reranked_query_returns_the_best_of_the_wider_candidate_list(index_dir, embedding) -> None:
    from pipeline_helpers import settings_for

    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    assert index.default_rerank is False
    reranked = index.search(QUERY, 2, rerank=True)
    want = expected_rerank(index, QUERY, 2)
    assert [(hit["node_id"], hit["score"]) for hit in reranked] == [(n, pytest.approx(s)) for n, s in want]
    # Every candidate (3 nodes, depth 10) was scored: the reranker can promote the plain third.
    plain = index.search(QUERY, 3, rerank=False)
    assert len(plain) == 3 and index.search(QUERY, 2) == plain[:2]
    # On this query the reranker promotes the plain third hit (so the checks above can tell).
    assert [hit["node_id"] for hit in reranked] != [hit["node_id"] for hit in plain[:2]]


def test_a_reranked_request_refuses_a_negative_top_k_and_says_when_the_query_was_cut(index_dir, embedding) -> None:
    """top_k -1 with rerank returned rerank_depth - 1 hits (a reranked request retrieves
    max(top_k, depth), which hid it from the store's check); the plain request refused it."""
    from pipeline_helpers import settings_for

    from htp_embed.rerank import MAX_QUERY_TOKENS
    from pipelines.query import InvalidQueryError, open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    for rerank in (False, True):
        with pytest.raises(InvalidQueryError, match="top_k must be a whole number >= 0"):
            index.search(QUERY, -1, rerank=rerank)
    assert index.search(QUERY, 0, rerank=True) == []
    with pytest.raises(ValueError, match="similarity_top_k"):
        index.as_index().as_query_engine(llm=None, similarity_top_k=-1, rerank=True)
    long = " ".join([QUERY] * MAX_QUERY_TOKENS)
    said = "reranking scored the likelihood of the query's first"
    assert any(said in warning for warning in index.query_warnings(long, "sparse", rerank=True))
    assert not any(said in warning for warning in index.query_warnings(long, "sparse", rerank=False))
    assert not any(said in warning for warning in index.query_warnings(QUERY, "sparse", rerank=True))


def test_the_settings_default_and_the_http_field_turn_reranking_on(index_dir, embedding) -> None:
    from fastapi.testclient import TestClient
    from pipeline_helpers import settings_for

    from pipelines.query import open_index
    from pipelines.service import IndexHolder, create_app

    settings = settings_for(embedding, rerank=True, rerank_depth=3)
    index = open_index(index_dir, settings, embedding=embedding)
    want = [n for n, _ in expected_rerank(index, QUERY, 2)]
    assert [hit["node_id"] for hit in index.search(QUERY, 2)] == want
    plain = [hit["node_id"] for hit in index.search(QUERY, 2, rerank=False)]
    assert plain != want

    off = settings_for(embedding)
    holder = IndexHolder(index_dir, off, open_index(index_dir, off, embedding=embedding))
    with TestClient(create_app(index_dir, off, holder=holder, reload_interval=0)) as client:
        assert client.get("/health").json()["rerank"] is False
        on = client.post("/query", json={"query": QUERY, "top_k": 2, "rerank": True}).json()
        assert [r["node_id"] for r in on["results"]] == want
        default = client.post("/query", json={"query": QUERY, "top_k": 2}).json()
        assert [r["node_id"] for r in default["results"]] == plain
        assert client.post("/query", json={"query": QUERY, "rerank": "maybe"}).status_code == 422


def test_the_postprocessor_reranks_a_llamaindex_retrievers_nodes_as_the_query_path_does(index_dir, embedding) -> None:
    from pipeline_helpers import settings_for

    from htp_embed.llama_index import QueryLikelihoodRerank
    from pipelines.query import open_index

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    reranker = QueryLikelihoodRerank(index.encoder, top_n=2)  # as the README shows it
    hits = reranker.postprocess_nodes(index.as_retriever(similarity_top_k=10).retrieve(QUERY), query_str=QUERY)
    assert [(hit.node.node_id, hit.score) for hit in hits] == [
        (node_id, pytest.approx(score)) for node_id, score in expected_rerank(index, QUERY, 2)]
    with pytest.raises(ValueError, match="needs the query"):
        reranker.postprocess_nodes(hits)


def test_llamaindex_engines_rerank_as_search_does_where_the_index_reranks(index_dir, embedding) -> None:
    """An app that sets ``rerank = true`` and queries through ``as_index()`` engines gets what
    ``search`` returns, not silently the plain fused hits; ``rerank`` to an engine overrides."""
    from llama_index.core.llms import MockLLM
    from llama_index.core.schema import QueryBundle
    from pipeline_helpers import settings_for

    from htp_embed.llama_index import QueryLikelihoodRerank
    from pipelines.query import open_index

    def rerankers(engine) -> list[QueryLikelihoodRerank]:
        return [p for p in engine._node_postprocessors if isinstance(p, QueryLikelihoodRerank)]

    def found(engine) -> list[tuple[str, float]]:
        return [(hit.node.node_id, hit.score) for hit in engine.retrieve(QueryBundle(QUERY))]

    index = open_index(index_dir, settings_for(embedding, rerank=True, rerank_depth=3), embedding=embedding)
    reranked = [(hit["node_id"], pytest.approx(hit["score"])) for hit in index.search(QUERY, 2)]
    plain = [(hit["node_id"], pytest.approx(hit["score"])) for hit in index.search(QUERY, 2, rerank=False)]
    assert [n for n, _ in reranked] != [n for n, _ in plain]  # so the checks below can tell
    engine = index.as_index().as_query_engine(llm=MockLLM(), similarity_top_k=2)
    assert found(engine) == reranked
    assert found(index.as_index().as_query_engine(llm=MockLLM(), similarity_top_k=2, rerank=False)) == plain
    # a chat engine passes its arguments on to a query engine: still one reranker, keeping 2
    chat = index.as_index().as_chat_engine(chat_mode="context", llm=MockLLM(), similarity_top_k=2)
    assert [r.top_n for r in rerankers(chat)] == [2]
    # a caller's own reranker is not doubled
    own = QueryLikelihoodRerank(index.encoder, top_n=1)
    engine = index.as_index().as_query_engine(llm=MockLLM(), similarity_top_k=3, node_postprocessors=[own])
    assert rerankers(engine) == [own]

    off = open_index(index_dir, settings_for(embedding), embedding=embedding)
    assert found(off.as_index().as_query_engine(llm=MockLLM(), similarity_top_k=2)) == plain
    assert found(off.as_index().as_query_engine(llm=MockLLM(), similarity_top_k=2, rerank=True)) == reranked


def test_evaluation_puts_the_reranked_documents_above_the_rest_of_the_plain_list() -> None:
    from pipelines.eval_pipeline import reranked_on_top

    plain = [{"doc_id": d, "score": s} for d, s in (("a", 0.9), ("b", 0.8), ("a", 0.7), ("c", 0.6), ("d", 0.5))]
    reranked = [{"doc_id": "b", "score": 1.2}, {"doc_id": "a", "score": -0.3}]
    ranked = reranked_on_top(reranked, plain, top_k=3)
    assert list(ranked) == ["b", "a", "c"]
    assert list(ranked.values()) == sorted(ranked.values(), reverse=True)
    # The reranker's scores beside the plain order (how benchmarks/quality/rerank.py blends
    # them): the reranked documents still come in score order.
    in_plain_order = [{"doc_id": "a", "score": -0.3}, {"doc_id": "b", "score": 1.2}]
    assert list(reranked_on_top(in_plain_order, plain, top_k=3)) == ["b", "a", "c"]


def test_a_slow_reranked_request_does_not_hold_up_the_plain_queries_behind_it(index_dir, embedding) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient
    from pipeline_helpers import settings_for

    from pipelines.query import open_index
    from pipelines.service import IndexHolder, create_app

    settings = settings_for(embedding)
    index = open_index(index_dir, settings, embedding=embedding)
    release, reranking = threading.Event(), threading.Event()
    real = index.reranker.rerank

    def held(*args, **kwargs):
        reranking.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    object.__setattr__(index.reranker, "rerank", held)
    holder = IndexHolder(index_dir, settings, index)
    with TestClient(create_app(index_dir, settings, holder=holder, reload_interval=0)) as client, \
            ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.post, "/query", json={"query": QUERY, "top_k": 2, "rerank": True})
        assert reranking.wait(30)
        plain = client.post("/query", json={"query": QUERY, "top_k": 2})  # answered while the rerank waits
        assert plain.status_code == 200 and not slow.done()
        release.set()
        assert slow.result().status_code == 200
        assert [r["node_id"] for r in slow.result().json()["results"]] == [n for n, _ in expected_rerank(index, QUERY, 2)]


def test_a_service_that_reranks_every_query_refuses_a_model_that_cannot(tmp_path) -> None:
    """With rerank = true and a model whose output head is not its embeddings, the service
    started, /health said "ok", and every default query got a 409."""
    from pipeline_helpers import write_docs
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.ingest import ingest
    from pipelines.service import create_app
    from pipelines.settings import EncoderConfig, Settings

    tokenizer = build_tokenizer(bos=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "untied")
    tokenizer.save_pretrained(tmp_path / "untied")
    settings = Settings(encoder=EncoderConfig(model=str(tmp_path / "untied"), segmenter="sentencizer",
                                              show_progress=False), chunk_size=48, chunk_overlap=0)
    ingest(write_docs(tmp_path / "src"), tmp_path / "idx", settings)
    create_app(tmp_path / "idx", settings, reload_interval=0, warm_up=False)  # not reranking: serves
    with pytest.raises(RerankUnavailableError, match="tied embeddings"):
        create_app(tmp_path / "idx", settings.with_overrides(rerank=True), reload_interval=0, warm_up=False)
    # asked of the command line, it fails again unchanged: bad usage (exit 2), not a failed run's 1
    import json

    from typer.testing import CliRunner

    from htp_cli.main import app

    asked = CliRunner().invoke(app, ["query", "cat", "--index", str(tmp_path / "idx"), "--rerank", "--json"])
    assert asked.exit_code == 2 and "tied embeddings" in json.loads(asked.stdout)["error"], asked.output
