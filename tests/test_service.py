"""The HTTP query service: the API contract, limits, auth, and switching to a new version."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pipeline_helpers import settings_for, write_docs

from pipelines.ingest import ingest
from pipelines.query import SearchRequest, open_index
from pipelines.service import IndexHolder, create_app


def make_client(index_dir, embedding, **kwargs) -> TestClient:
    settings = settings_for(embedding)
    holder = IndexHolder(index_dir, settings, open_index(index_dir, settings, embedding=embedding))
    return TestClient(create_app(index_dir, settings, holder=holder, **kwargs))


def test_query_returns_ranked_results_with_the_documented_fields(index_dir, embedding):
    with make_client(index_dir, embedding, reload_interval=0) as client:
        response = client.post("/query", json={"query": "the cat sat on the mat", "top_k": 2})
        assert response.status_code == 200
        body = response.json()
        assert len(body["results"]) == 2
        assert set(body["results"][0]) == {"node_id", "doc_id", "score", "text", "metadata"}
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        expected = open_index(index_dir, settings_for(embedding), embedding=embedding).search("the cat sat on the mat", 2)
        assert [r["node_id"] for r in body["results"]] == [r["node_id"] for r in expected]


def test_filters_are_applied(index_dir, embedding):
    with make_client(index_dir, embedding, reload_interval=0) as client:
        body = client.post("/query", json={
            "query": "the cat", "top_k": 5,
            "filters": {"filters": [{"key": "file_type", "value": "md", "operator": "=="}]},
        }).json()
        assert [r["doc_id"] for r in body["results"]] == ["sea.md"]


def test_a_wide_filter_is_answered_and_an_impossible_one_is_a_422_not_a_damaged_index(index_dir, embedding):
    """A thousand allowed values in an OR group was "Expression tree is too large" inside SQLite,
    which the service answered as damage (503, "put the file back from a backup"); a value past
    64 bits was a 500."""
    def leaf(value, key="file_type"):
        return {"key": key, "value": value, "operator": "=="}

    with make_client(index_dir, embedding, reload_interval=0) as client:
        wide = {"condition": "or", "filters": [leaf(f"t{i}") for i in range(999)] + [leaf("md")]}
        body = client.post("/query", json={"query": "the cat", "top_k": 5, "filters": wide})
        assert body.status_code == 200 and [r["doc_id"] for r in body.json()["results"]] == ["sea.md"]
        nested: dict = {"filters": [leaf("md")]}
        for _ in range(99):
            nested = {"condition": "or", "filters": [nested, leaf("txt")]}
        for bad in (nested, {"filters": [{"key": "size", "value": 2**63, "operator": "<"}]}):
            refused = client.post("/query", json={"query": "the cat", "filters": bad})
            assert refused.status_code == 422, refused.text
            assert "backup" not in refused.text
        assert client.get("/health").json()["status"] == "ok"


def test_boolean_filter_values_and_a_filter_past_64_kib_are_answered(index_dir, embedding):
    """``"value": true`` was a 422 (LlamaIndex's filter takes no booleans) though the CLI's
    public=true works; 3,000 or'ed conditions (74 KB) were a 413 at a 64 KiB body limit."""
    with make_client(index_dir, embedding, reload_interval=0) as client:
        for value, operator in ((True, "=="), ([True, False], "in"), (False, "!=")):
            flag = {"filters": [{"key": "public", "value": value, "operator": operator}]}
            answer = client.post("/query", json={"query": "the cat", "top_k": 5, "filters": flag})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["results"]) == (3 if operator == "!=" else 0)
        wide = {"condition": "or", "filters": [{"key": "file_type", "value": f"type-{i}", "operator": "=="}
                                               for i in range(3000)] + [{"key": "file_type", "value": "md"}]}
        answer = client.post("/query", json={"query": "the cat", "top_k": 5, "filters": wide})
        assert answer.status_code == 200 and [r["doc_id"] for r in answer.json()["results"]] == ["sea.md"]


def test_health_reports_the_version(index_dir, embedding):
    with make_client(index_dir, embedding, reload_interval=0) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["count"] == 3 and health["version"] >= 1


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"query": "", "top_k": 3}, 422),
        ({"query": "x" * 5000, "top_k": 3}, 422),
        ({"query": "cat", "top_k": 0}, 422),
        ({"query": "cat", "top_k": 1000}, 422),
        ({"top_k": 3}, 422),
        ({"query": "cat", "top_k": True}, 422),
        ({"query": "cat", "top_k": 2.0}, 422),
        ({"query": "cat", "rerank": "yes"}, 422),  # not read as true
        ({"query": "cat", "alpha": "0.5"}, 422),
        ({"query": "\u200b\u200b", "top_k": 3}, 422),  # zero-width only: ingest calls it empty
        ({"query": "\x00\x01 \u2028", "top_k": 3}, 422),  # controls and separators only
    ],
)
def test_bad_requests_get_4xx(index_dir, embedding, payload, status):
    with make_client(index_dir, embedding, reload_interval=0) as client:
        assert client.post("/query", json=payload).status_code == status


def test_a_query_of_invisible_characters_is_refused_by_name(index_dir, embedding):
    """"\u200b" passed the whitespace check and was embedded as if it said something: every
    query answered the same arbitrary top k, where a document of the same text is refused."""
    with make_client(index_dir, embedding, reload_interval=0) as client:
        refused = client.post("/query", json={"query": "\u200b\ufeff"})
        assert refused.status_code == 422 and "invisible characters" in refused.json()["detail"]
        assert client.post("/query", json={"query": "\u200bcat"}).status_code == 200


def test_an_alpha_for_a_query_that_fuses_nothing_is_refused_not_ignored(index_dir, embedding):
    with make_client(index_dir, embedding, reload_interval=0) as client:
        for mode in ("dense", "sparse"):
            refused = client.post("/query", json={"query": "the cat", "mode": mode, "alpha": 0.5})
            assert refused.status_code == 422 and f"mode {mode} fuses nothing" in refused.json()["detail"]
        hybrid = client.post("/query", json={"query": "the cat", "mode": "hybrid", "alpha": 0.5})
        default = client.post("/query", json={"query": "the cat", "alpha": 0.5})  # hybrid by default
        assert hybrid.status_code == default.status_code == 200 and hybrid.json() == default.json()


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({"query": "the cat", "filter": {"filters": [{"key": "file_type", "value": "md"}]}}, "filter"),
        ({"query": "the cat", "topk": 1}, "topk"),
        ({"query": "the cat", "filters": {"filters": [{"key": "file_type", "value": "md", "op": "!="}]}}, "'op'"),
        ({"query": "the cat", "filters": {"filters": [{"filters": [{"key": "k", "value": 1, "operater": "=="}]}]}},
         "'operater'"),
        ({"query": "the cat", "filters": {"filters": [], "conditon": "or"}}, "'conditon'"),
    ],
)
def test_unknown_fields_are_refused_not_ignored(index_dir, embedding, payload, named):
    """A misspelled field would answer 200 with unfiltered results, the default count, or (a
    misspelled ``operator``) the opposite filter: it is a 422 naming the field."""
    with make_client(index_dir, embedding, reload_interval=0) as client:
        response = client.post("/query", json=payload)
        assert response.status_code == 422 and named in response.text


def test_malformed_json_and_huge_bodies_are_refused(index_dir, embedding):
    with make_client(index_dir, embedding, reload_interval=0) as client:
        bad = client.post("/query", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 422 and "JSON" in str(bad.json()["detail"])
        latin1 = client.post("/query", content=b'{"query": "caf\xe9"}', headers={"content-type": "application/json"})
        assert latin1.status_code == 422 and "not UTF-8 (byte 0xe9 at offset 14)" in latin1.json()["detail"]
        fine = client.post("/query", content='{"query": "café", "top_k": 1}'.encode(), headers={"content-type": "application/json"})
        assert fine.status_code == 200 and len(fine.json()["results"]) == 1  # the body still reaches the endpoint
        huge = client.post("/query", content=b"x" * 1_100_000, headers={"content-type": "application/json"})
        assert huge.status_code == 413 and "over 1048576 bytes" in huge.json()["detail"]

        def chunks():  # no Content-Length: the size cannot be checked up front
            yield b'{"query": "cat"}'

        chunked = client.post("/query", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 411


def test_bearer_token_is_required_when_configured(index_dir, embedding):
    with make_client(index_dir, embedding, reload_interval=0, api_token="s3cret") as client:
        assert client.post("/query", json={"query": "cat"}).status_code == 401
        ok = client.post("/query", json={"query": "cat"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200


def test_health_without_the_token_says_the_status_alone(index_dir, embedding):
    """A load balancer probes /health without a token; the details (the index's path, its
    files and their errors) are for a caller holding it."""
    with make_client(index_dir, embedding, reload_interval=0, api_token="s3cret") as client:
        assert client.get("/health").json() == {"status": "ok"}
        wrong = client.get("/health", headers={"Authorization": "Bearer nope"}).json()
        assert wrong == {"status": "ok"}
        full = client.get("/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert full["status"] == "ok" and full["count"] == 3 and str(index_dir) in full["index"]


@pytest.mark.parametrize("token", ["s3cret", "pässwort-ключ"])
def test_a_token_or_header_outside_ascii_is_compared_not_a_500(index_dir, embedding, token):
    """hmac.compare_digest raises on non-ASCII text: a client's odd header was a 500, and with a
    non-ASCII token configured no client could ever pass."""
    with make_client(index_dir, embedding, reload_interval=0, api_token=token) as client:
        def status(header: bytes) -> int:
            return client.post("/query", json={"query": "cat"}, headers={b"Authorization": header}).status_code

        assert status(b"Bearer caf\xe9") == 401  # Latin-1 bytes
        assert status("Bearer café".encode()) == 401
        assert status(b"Bearer " + token.encode()) == 200  # the token as UTF-8, the way clients send it


def test_openapi_docs_are_served(index_dir, embedding):
    with make_client(index_dir, embedding, reload_interval=0) as client:
        assert client.get("/docs").status_code == 200
        assert "/query" in client.get("/openapi.json").json()["paths"]


def test_a_new_version_is_picked_up_without_dropping_requests(index_dir, embedding, tmp_path):
    with make_client(index_dir, embedding, reload_interval=0.2) as client:
        first = client.get("/health").json()["version"]
        errors: list[int] = []
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                response = client.post("/query", json={"query": "protein binds receptor", "top_k": 1})
                if response.status_code != 200:
                    errors.append(response.status_code)

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            (tmp_path / "src" / "new.txt").write_text("protein binds receptor . cells grew faster .")
            ingest(tmp_path / "src", index_dir, settings_for(embedding), embedding=embedding)
            deadline = time.time() + 20
            while client.get("/health").json()["version"] == first and time.time() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            worker.join()
        assert client.get("/health").json()["version"] > first
        assert errors == []
        top = client.post("/query", json={"query": "protein binds receptor", "top_k": 4}).json()["results"]
        assert "new.txt" in [r["doc_id"] for r in top]


def test_queries_keep_working_through_a_rebuild_and_switch_to_the_new_encoder(tmp_path, tiny_model_dir):
    """Rebuild to another method while a client queries: no errors, and the service moves to
    the rebuilt version and its encoder."""
    from htp_embed import HTPEncoder
    from htp_embed.llama_index import HTPEmbedding
    from pipelines.rebuild import rebuild

    loaded = HTPEmbedding(HTPEncoder(model=str(tiny_model_dir), segmenter="sentencizer", show_progress=False,
                                     rewire_start=1, rewire_stop=3, exit_layer=None))
    settings = settings_for(loaded)
    index_dir = tmp_path / "idx"
    ingest(write_docs(tmp_path / "src"), index_dir, settings, embedding=loaded)
    holder = IndexHolder(index_dir, settings, open_index(index_dir, settings, embedding=loaded))
    with TestClient(create_app(index_dir, settings, holder=holder, reload_interval=0.2)) as client:
        before = client.get("/health").json()
        errors: list[int] = []
        served: set[int] = set()
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                response = client.post("/query", json={"query": "the cat sat", "top_k": 3})
                if response.status_code != 200:
                    errors.append(response.status_code)
                else:
                    served.add(response.json()["version"])

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            stats = rebuild(index_dir, settings, encoder_overrides={"method": "vanilla"})
            deadline = time.time() + 30
            while client.get("/health").json()["version"] != stats.version and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join()
        after = client.get("/health").json()
        assert errors == []
        assert after["version"] == stats.version > before["version"]
        assert "/vanilla[" in after["encoder"] and "/htp[" in before["encoder"]
        assert {before["version"], stats.version} <= served


def test_a_corrupt_new_version_is_reported_and_the_old_one_keeps_serving(index_dir, embedding, tmp_path, caplog,
                                                                        monkeypatch):
    from indexes import persist

    real_switch = persist.switch_current

    def switch_to_a_damaged_version(root, version):
        # damaged before it goes live: damaging it after the ingest raced the service's watcher,
        # which could load the version first (then a damaged file it serves is 'unhealthy')
        newest = persist.read_manifest(root, version).segments[-1]  # the segment this ingest wrote
        damaged = Path(root) / "segments" / newest.name / "vectors.faiss"
        damaged.write_bytes(damaged.read_bytes()[:-10])
        real_switch(root, version)

    with make_client(index_dir, embedding, reload_interval=0.1) as client:
        first = client.get("/health").json()
        (tmp_path / "src" / "new.txt").write_text("protein binds receptor .")
        monkeypatch.setattr(persist, "switch_current", switch_to_a_damaged_version)
        stats = ingest(tmp_path / "src", index_dir, settings_for(embedding), embedding=embedding)
        monkeypatch.undo()
        deadline = time.time() + 10
        while client.get("/health").json()["status"] == "ok" and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # several more watcher rounds: the failure is logged once, not each round
        health = client.get("/health").json()
        assert health["status"] == "stale" and health["version"] == first["version"]
        assert health["newer_version"] == stats.version and "vectors.faiss" in health["newer_version_error"]
        answer = client.post("/query", json={"query": "the cat", "top_k": 2})
        assert answer.status_code == 200 and answer.json()["version"] == first["version"]
        # an app that only queries is told its answer comes from the older version
        assert answer.json()["warnings"] == [
            f"answered from version {first['version']}: version {stats.version} is published but could not "
            f"be loaded ({health['newer_version_error']}); the service retries it (GET /health)"]
        assert sum("cannot load version" in r.getMessage() for r in caplog.records) == 1


def same_results(a: list[list[dict]], b: list[list[dict]]) -> bool:
    """Same hits in the same order, scores equal within float tolerance."""
    strip = [[{k: v for k, v in hit.items() if k != "score"} for hit in hits] for hits in a]
    return strip == [[{k: v for k, v in hit.items() if k != "score"} for hit in hits] for hits in b] and all(
        abs(x["score"] - y["score"]) < 1e-5 for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def test_concurrent_queries_are_answered_in_batches_with_the_same_results(index_dir, embedding):
    from concurrent.futures import ThreadPoolExecutor

    from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters

    settings = settings_for(embedding)
    index = open_index(index_dir, settings, embedding=embedding)
    queries = ["the cat sat", "fish in the sea", "the moon at night", "rain on the city"] * 3
    by_md = MetadataFilters(filters=[MetadataFilter(key="file_type", value="md")])
    single = [index.search(q, 2) for q in queries] + [index.search("the cat", 2, by_md)]
    assert same_results(index.search_many([SearchRequest(q, 2) for q in queries] + [SearchRequest("the cat", 2, by_md)]), single)

    sizes: list[int] = []
    real = index.search_many

    def slow_first_batch(requests):
        sizes.append(len(requests))
        if len(sizes) == 1:
            time.sleep(0.5)  # the others queue up meanwhile
        return real(requests)

    index.search_many = slow_first_batch  # type: ignore[method-assign]
    holder = IndexHolder(index_dir, settings, index)
    bad = {"query": "cat", "filters": {"filters": [{"key": "year", "value": 1, "operator": "text_match_insensitive"}]}}
    with TestClient(create_app(index_dir, settings, holder=holder, reload_interval=0)) as client, \
            ThreadPoolExecutor(8) as pool:
        first = pool.submit(client.post, "/query", json={"query": queries[0], "top_k": 2})
        time.sleep(0.1)
        rest = [pool.submit(client.post, "/query", json={"query": q, "top_k": 2}) for q in queries[1:]]
        wrong = pool.submit(client.post, "/query", json=bad)
        responses = [first.result(), *(r.result() for r in rest)]
        assert [r.status_code for r in responses] == [200] * len(queries)
        assert same_results([r.json()["results"] for r in responses], single[:-1])
        assert wrong.result().status_code == 422  # the bad request fails alone
    assert sizes[0] == 1 and max(sizes) > 1


def test_the_service_runs_its_query_widths_before_answering(index_dir, embedding, caplog):
    settings = settings_for(embedding)
    index = open_index(index_dir, settings, embedding=embedding)
    warmed: list[int] = []
    real = index.encoder.warm_query_widths
    index.encoder.warm_query_widths = lambda: warmed.append(threading.get_ident()) or real()
    holder = IndexHolder(index_dir, settings, index)
    with caplog.at_level("INFO", logger="pipelines.service"):
        app = create_app(index_dir, settings, holder=holder, reload_interval=0)
    assert len(warmed) == 1 and warmed[0] != threading.get_ident()  # on the model's thread
    assert "warmed up" in caplog.text
    with TestClient(app) as client:
        assert client.post("/query", json={"query": "the cat sat", "top_k": 1}).status_code == 200
    create_app(index_dir, settings, holder=holder, reload_interval=0, warm_up=False)
    assert len(warmed) == 1


def test_a_failing_warm_up_is_logged_and_the_service_still_starts(index_dir, embedding, caplog):
    settings = settings_for(embedding)
    index = open_index(index_dir, settings, embedding=embedding)

    def broken() -> int:
        raise RuntimeError("simulated: no memory for the warm-up")

    index.encoder.warm_query_widths = broken
    with caplog.at_level("WARNING", logger="pipelines.service"):
        app = create_app(index_dir, settings, holder=IndexHolder(index_dir, settings, index), reload_interval=0)
    assert "query warm-up failed (RuntimeError: simulated" in caplog.text
    with TestClient(app) as client:
        assert client.post("/query", json={"query": "the cat sat", "top_k": 1}).status_code == 200


def test_a_query_longer_than_the_encoder_window_is_answered_with_a_warning(index_dir, embedding):
    encoder = embedding.encoder
    words = max(encoder.query_text_budget, 1) + 50
    long_query = " ".join(["cat"] * words)
    assert len(long_query) <= 4096 and encoder.truncates_query(long_query)
    with make_client(index_dir, embedding, reload_interval=0) as client:
        hybrid = client.post("/query", json={"query": long_query, "top_k": 2, "mode": "hybrid"}).json()
        dense = client.post("/query", json={"query": long_query, "top_k": 2, "mode": "dense"}).json()
        sparse = client.post("/query", json={"query": long_query, "top_k": 2, "mode": "sparse"}).json()
        short = client.post("/query", json={"query": "the cat sat", "top_k": 2}).json()
    assert hybrid["results"] and "its vector stands for its beginning only" in hybrid["warnings"][0]
    assert "keyword search used all of it" in hybrid["warnings"][0]
    assert len(dense["warnings"]) == 1 and "keyword" not in dense["warnings"][0]
    assert sparse["warnings"] == [] and short["warnings"] == []  # no vector, or nothing cut


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.0.1.1", True), ("localhost", True),
                                                 ("::1", True), ("[::1]", True), ("0.0.0.0", False),
                                                 ("::", False), ("192.168.1.5", False), ("myhost", False)])
def test_is_loopback(host, loopback):
    from pipelines.service import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("host", "token", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", "s3cret", False),
                                                       ("127.0.0.1", None, False)])
def test_serving_beyond_this_machine_without_a_token_is_warned_about(monkeypatch, caplog, host, token, warned):
    """``--host 0.0.0.0`` without a token serves every document's text to anyone on the
    network: allowed (a private network, a proxy in front), but said at start."""
    import socket

    import uvicorn

    import pipelines.service as service

    monkeypatch.setattr(service, "create_app", lambda *args, **kwargs: object())
    monkeypatch.setattr(service, "listening_socket", lambda host, port: socket.socket())  # binds nothing
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    if token:
        monkeypatch.setenv(service.TOKEN_ENV, token)
    else:
        monkeypatch.delenv(service.TOKEN_ENV, raising=False)
    with caplog.at_level("WARNING", logger="pipelines.service"):
        service.serve("some-index", host=host)
    assert ("without HTP_INDEX_API_TOKEN" in caplog.text) is warned


def test_serve_says_it_listens_only_once_the_index_and_encoder_are_loaded(monkeypatch, caplog):
    """"listening on http://127.0.0.1:PORT" was logged ~17 s before a connection was answered
    (the encoder loads first): it is said now after the app is made, a loading line before."""
    import socket

    import uvicorn

    import pipelines.service as service

    said_when_loading: list[str] = []

    def create_app(*args, **kwargs):
        said_when_loading.append(caplog.text)
        return object()

    monkeypatch.setattr(service, "create_app", create_app)
    monkeypatch.setattr(service, "listening_socket", lambda host, port: socket.socket())  # binds nothing
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    with caplog.at_level("INFO", logger="pipelines.service"):
        service.serve("some-index")
    assert "loading some-index and its encoder, then serving on http://" in said_when_loading[0]
    assert "listening on" not in said_when_loading[0] and "listening on http://" in caplog.text
