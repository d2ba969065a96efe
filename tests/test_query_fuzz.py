"""Hostile and odd queries get a clear 4xx or a valid answer, never a 500 (nor, through the
retriever, an unexpected exception): FTS5 syntax, NUL bytes, lone surrogates, non-UTF-8 and
malformed bodies, over-long queries, bad modes, alphas and top_k, and random unicode, in every
mode. Seeded and bounded, so a failure replays; the case that failed is in the message."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pipeline_helpers import DOCS, long_doc, settings_for, tiny_embedding, write_docs

from indexes import HtpIndexError
from pipelines.ingest import ingest
from pipelines.query import open_index
from pipelines.service import MAX_QUERY_CHARS, IndexHolder, create_app

SEED = 20
MODES = ("dense", "sparse", "hybrid")
RETRIEVER_MODES = {"dense": "default", "sparse": "sparse", "hybrid": "hybrid"}
BUDGET_S = 25.0  # a hard limit per test; on a busy 2-core machine the module takes ~20 s
RANDOM_UNTIL_S = 8.0  # the retriever tries random strings after the fixed cases until then

FTS5 = [
    '"', '""', '"the cat', "cat AND", "AND", "OR OR", "NOT cat", "cat NOT", "NEAR(cat dog, 2)",
    "NEAR(", "cat*", "*", "^cat", "text:cat", "doc_id:x", "{text}: cat", "(cat OR", ")", "-cat",
    "+", "cat - dog", "ver1.1", "a.b.c", "'", "cat'; DROP TABLE nodes; --", "%", "_", "\\",
    "cat OR dog AND NOT fish", "MATCH", "rank", "bm25(nodes)", "[", "]", ":", "::", "@", "#",
]
ODD = [
    "\x00", "cat\x00dog", "\x00" * 50, "\t\n\r", " ", "\u200b", "\u200b\u200d\ufeff", "\ud800",
    "cat\udfff", "\U0001f600" * 20, "\u202etac eht", "e\u0301" * 30, "\ufffd", "<bos>", "<PST>",
    "<pad><eos>", "the " * 1000, "x" * MAX_QUERY_CHARS, "x" * (MAX_QUERY_CHARS + 1), "y" * 5000,
    "0", "-1", "null", "NaN", "\u0000\u0001\u001f\u007f", "\U0010ffff", "ｃａｔ", "CAT", "猫が座った",
]
BAD_FIELDS: list[dict[str, Any]] = [
    {"mode": "DENSE"}, {"mode": ""}, {"mode": "bm25"}, {"mode": 1}, {"mode": None}, {"mode": ["dense"]},
    {"alpha": -0.1}, {"alpha": 1.5}, {"alpha": "x"}, {"alpha": None}, {"alpha": 0}, {"alpha": 1},
    {"top_k": 0}, {"top_k": -1}, {"top_k": 101}, {"top_k": 1.5}, {"top_k": "5"}, {"top_k": True},
    {"top_k": 10**20}, {"top_k": None}, {"filters": "x"}, {"filters": {"filters": [{"key": 1}]}},
    {"filters": {"filters": [{"key": "doc_id", "value": "\x00", "operator": "=="}]}},
    {"filters": {"filters": [{"key": "a", "value": [1, 2], "operator": "nin"}]}},
    {"filters": {"filters": [{"key": "a", "value": "b", "operator": "??"}]}},
    {"extra": "field"}, {"query": 5}, {"query": None}, {"query": ["cat"]}, {"query": {"a": 1}},
]
RAW_BODIES = [
    b"", b"{", b"[]", b'"cat"', b"null", b"\xff\xfe\x00c", b'{"query": "\xff\xfe cat"}',
    b'{"query": "cat", "top_k": NaN}', b'{"query": "cat", "alpha": Infinity}', b'{"query": "\\ud800"}',
    b'{"query": "cat"' + b" " * 10, b'{"query": "cat"}\x00', "{\"query\": \"caf\u00e9\"}".encode("latin-1"),
]


def random_text(rng: random.Random) -> str:
    """A string of random code points from the planes that break things most often."""
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0x2FF), (0x300, 0x36F), (0x4E00, 0x4FFF),
             (0x1F300, 0x1F64F), (0xD800, 0xDFFF), (0xFFF0, 0xFFFF), (0x10000, 0x10FFFF)]
    length = rng.choice([1, 2, 5, 20, 100, 1000])
    return "".join(chr(rng.randint(*rng.choice(pools))) for _ in range(length))


def queries(rng: random.Random, count: int) -> list[str]:
    words = "the cat sat fish sea moon night protein".split()
    mixed = [" ".join(rng.choice(words + FTS5) for _ in range(rng.randint(1, 6))) for _ in range(count)]
    return FTS5 + ODD + mixed + [random_text(rng) for _ in range(count)]


def payloads(rng: random.Random) -> Iterator[dict[str, Any]]:
    """Every query in every mode with a random valid alpha and top_k, then the bad fields."""
    for query in queries(rng, 100):
        yield {"query": query, "mode": rng.choice(MODES), "top_k": rng.choice([1, 3, 100]),
               "alpha": rng.choice([None, 0.0, 0.3, 1.0])}
    for bad in BAD_FIELDS:
        yield {"query": rng.choice(FTS5 + ODD[:12]), "mode": rng.choice(MODES), **bad}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small index (enough nodes for the correction and both search sides) and its settings."""
    embedding = tiny_embedding()
    root = tmp_path_factory.mktemp("fuzz")
    docs = {**DOCS, **{f"long{i}.txt": long_doc(12, seed=i) for i in range(4)}}
    settings = settings_for(embedding)
    ingest(write_docs(root / "src", docs), root / "idx", settings, embedding=embedding)
    return root / "idx", settings, embedding


def check_answer(response: Any, case: Any) -> None:
    """A 4xx with a readable detail, or a 200 whose results are valid and finite."""
    assert response.status_code < 500, f"{response.status_code} for {case!r}: {response.text[:300]}"
    body = response.json()
    if response.status_code >= 400:
        assert body.get("detail"), f"a {response.status_code} without a reason for {case!r}"
        return
    assert response.status_code == 200 and isinstance(body["results"], list), case
    for hit in body["results"]:
        assert hit["score"] is None or math.isfinite(hit["score"]), (case, hit)
        assert isinstance(hit["node_id"], str) and isinstance(hit["text"], str), (case, hit)


def test_the_service_answers_hostile_queries_with_a_4xx_or_results(served):
    index_dir, settings, embedding = served
    rng = random.Random(SEED)
    holder = IndexHolder(index_dir, settings, open_index(index_dir, settings, embedding=embedding))
    began, sent = time.monotonic(), 0
    with TestClient(create_app(index_dir, settings, holder=holder, reload_interval=0),
                    raise_server_exceptions=False) as client:
        for payload in payloads(rng):
            body = json.dumps(payload).encode()  # ensure_ascii: lone surrogates travel as \ud800
            check_answer(client.post("/query", content=body, headers={"content-type": "application/json"}),
                         payload)
            sent += 1
        for raw in RAW_BODIES:
            for content_type in ("application/json", "text/plain"):
                check_answer(client.post("/query", content=raw, headers={"content-type": content_type}), raw)
                sent += 1
        check_answer(client.post("/query", content=b"x" * 70_000), "a 70 kB body")
        check_answer(client.get("/query"), "GET /query")
    assert sent > 300
    assert time.monotonic() - began < BUDGET_S, f"{sent} requests took {time.monotonic() - began:.1f} s"


def test_the_retriever_answers_hostile_queries_or_raises_a_clear_error(served):
    index_dir, settings, embedding = served
    rng = random.Random(SEED + 1)
    index = open_index(index_dir, settings, embedding=embedding)
    retrievers = {
        mode: index.as_retriever(similarity_top_k=3, vector_store_query_mode=RETRIEVER_MODES[mode])
        for mode in MODES
    }
    began, tried = time.monotonic(), 0
    for query in queries(rng, 40):  # the fixed cases first; random ones while the budget lasts
        if tried >= len(FTS5) + len(ODD) and time.monotonic() - began > RANDOM_UNTIL_S:
            break
        mode = rng.choice(MODES)
        try:
            hits = retrievers[mode].retrieve(query)
        except (ValueError, HtpIndexError) as exc:  # a clear refusal, e.g. an empty text
            assert str(exc), f"an empty message for {query!r} in {mode}"
        else:
            assert all(hit.score is None or math.isfinite(hit.score) for hit in hits), (mode, query)
        tried += 1
    for alpha in (-1.0, 2.0, float("nan")):
        with pytest.raises((ValueError, HtpIndexError)):
            index.as_retriever(vector_store_query_mode="hybrid", alpha=alpha).retrieve("the cat")
    assert tried >= len(FTS5) + len(ODD)
    assert time.monotonic() - began < BUDGET_S, f"{tried} queries took {time.monotonic() - began:.1f} s"
