"""Faults the query service meets on real machines: a new version that fails to load for a
while (retried with back-off), and files of the served version deleted or truncated under it
(it keeps serving what it holds, and /health says it is unhealthy and why)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pipeline_helpers import settings_for

import pipelines.service
from indexes import FaissVectorStore
from pipelines.ingest import ingest
from pipelines.maintenance import compact_index
from pipelines.query import open_index
from pipelines.service import IndexHolder, create_app, version_files


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def holder_for(index_dir: Path, embedding, clock: Clock) -> IndexHolder:
    settings = settings_for(embedding)
    return IndexHolder(index_dir, settings, open_index(index_dir, settings, embedding=embedding),
                       clock=clock, retry_base=2.0, retry_max=5.0)


def new_version(index_dir: Path, embedding, tmp_path: Path) -> int:
    (tmp_path / "src" / "new.txt").write_text("protein binds receptor .", encoding="utf-8")
    stats = ingest(tmp_path / "src", index_dir, settings_for(embedding), embedding=embedding)
    assert stats.version is not None
    return stats.version


def test_a_temporary_load_failure_is_retried_with_back_off(index_dir, embedding, tmp_path, monkeypatch):
    clock = Clock()
    holder = holder_for(index_dir, embedding, clock)
    first = holder.current.version
    latest = new_version(index_dir, embedding, tmp_path)
    real_open, tries = pipelines.service.open_index, []

    def flaky_open(*args, **kwargs):
        tries.append(clock.now)
        if len(tries) <= 3:
            raise OSError(5, "Input/output error (a flaky network disk)")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(pipelines.service, "open_index", flaky_open)
    with TestClient(create_app(index_dir, holder=holder, reload_interval=0)) as client:
        assert holder.refresh() is False and len(tries) == 1
        health = client.get("/health").json()
        assert health["status"] == "stale" and health["version"] == first
        assert health["newer_version"] == latest and "Input/output error" in health["newer_version_error"]
        assert health["retry_in_s"] == 2.0

        assert holder.refresh() is False and len(tries) == 1  # within the back-off: not retried
        clock.now += 2.0
        assert holder.refresh() is False and len(tries) == 2  # retried; the next wait doubles
        clock.now += 3.9
        assert holder.refresh() is False and len(tries) == 2
        clock.now += 0.1
        assert holder.refresh() is False and len(tries) == 3
        clock.now += 5.0  # capped at retry_max
        assert holder.refresh() is True and len(tries) == 4

        health = client.get("/health").json()
        assert health["status"] == "ok" and health["version"] == latest and "newer_version" not in health
        assert client.post("/query", json={"query": "protein", "top_k": 1}).json()["version"] == latest


def test_a_newer_version_after_a_failure_is_tried_at_once(index_dir, embedding, tmp_path, monkeypatch):
    clock = Clock()
    holder = holder_for(index_dir, embedding, clock)
    real_open = pipelines.service.open_index
    monkeypatch.setattr(pipelines.service, "open_index", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    new_version(index_dir, embedding, tmp_path)
    assert holder.refresh() is False and holder.attempts == 1
    monkeypatch.setattr(pipelines.service, "open_index", real_open)
    (tmp_path / "src" / "newer.txt").write_text("the moon rose .", encoding="utf-8")
    ingest(tmp_path / "src", index_dir, settings_for(embedding), embedding=embedding)
    assert holder.refresh() is True  # CURRENT moved: no back-off for a version not yet tried


def served_files(index_dir: Path) -> list[Path]:
    """The served version's data files, largest first (the manifest itself excluded)."""
    manifest = FaissVectorStore.read_manifest(index_dir)
    files = [path for path, size in version_files(index_dir, manifest).items() if size]
    assert files and all(path.is_file() for path in files)
    return sorted(files, key=lambda path: path.stat().st_size, reverse=True)


def same_answers(a: dict, b: dict) -> bool:
    """The same results in the same order, scores equal up to float rounding."""
    def plain(body: dict) -> list:
        return [{k: v for k, v in hit.items() if k != "score"} for hit in body["results"]]

    scores = [[hit["score"] for hit in body["results"]] for body in (a, b)]
    return (a["version"] == b["version"] and plain(a) == plain(b)
            and scores[0] == pytest.approx(scores[1], rel=1e-5, abs=1e-6))


@pytest.mark.parametrize("fault", ["deleted", "truncated"])
def test_damaged_files_of_the_served_version_make_it_unhealthy_and_never_answer_wrong(
        index_dir, embedding, fault, caplog):
    holder = holder_for(index_dir, embedding, Clock())
    with TestClient(create_app(index_dir, holder=holder, reload_interval=0)) as client:
        before = client.post("/query", json={"query": "the cat sat", "top_k": 3})
        assert before.status_code == 200 and client.get("/health").status_code == 200
        victim = served_files(index_dir)[0]
        if fault == "deleted":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

        holder.refresh()  # the watcher's round
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "unhealthy" and body["version"] == before.json()["version"]
        assert str(victim) in body["reason"] and fault in body["reason"]

        after = client.post("/query", json={"query": "the cat sat", "top_k": 3})
        if fault == "deleted":  # an unlinked file lives on while open: same answers
            # (scores to float rounding: the query may be embedded on another number of threads)
            assert after.status_code == 200 and same_answers(after.json(), before.json())
        else:  # a file cut short under a mapping would read wrong: refused, never a wrong answer
            assert after.status_code == 503 and str(victim) in after.json()["detail"]
            # the way out named is one that works: a rebuild reads the same damaged version
            assert "restore --index" in after.json()["detail"] and "rebuild" not in after.json()["detail"]
        holder.refresh()
    assert sum("still serving version" in r.getMessage() for r in caplog.records) == 1  # said once


def test_files_removed_by_retention_while_a_newer_version_is_live_make_it_stale_not_unhealthy(
        index_dir, embedding, tmp_path):
    # a service behind by a few commits (a long reload interval) found its version's files gone
    # to retention and said 503 "unhealthy", which takes it out of a load balancer, while it
    # answered right from the files it holds open and would load the live version next
    holder = holder_for(index_dir, embedding, Clock())
    with TestClient(create_app(index_dir, holder=holder, reload_interval=0)) as client:
        before = client.post("/query", json={"query": "the cat sat", "top_k": 3}).json()
        served = served_files(index_dir)
        new_version(index_dir, embedding, tmp_path)
        latest = compact_index(index_dir, settings_for(embedding)).version  # one merged segment
        named = set(version_files(index_dir, FaissVectorStore.read_manifest(index_dir)))
        victim = next(path for path in served if path not in named)
        victim.unlink()  # as retention removes what no kept version names
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "stale"
        assert str(victim) in health.json()["reason"] and f"version {latest} is live" in health.json()["reason"]
        assert same_answers(client.post("/query", json={"query": "the cat sat", "top_k": 3}).json(), before)
        assert holder.refresh() is True
        assert client.get("/health").json() | {"status": "ok"} == client.get("/health").json()
