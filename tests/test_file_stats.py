"""A scheduled ingest does not read again the files of a folder that have not changed since the
last run read and indexed them (their size, mtime, ctime and inode as recorded), and reads every
file whose record it cannot trust."""

from __future__ import annotations

import os

import pytest
from pipeline_helpers import DOCS, settings_for, write_docs

import pipelines.sources
from indexes import FaissVectorStore
from pipelines import file_stats
from pipelines.ingest import ingest


@pytest.fixture
def reads(monkeypatch):
    """The files read (by path name), and no racy window: files written before a run count as
    settled (the window itself is tested below)."""
    monkeypatch.setattr(file_stats, "RACY_NS", 0)
    seen: list[str] = []
    real_file, real_jsonl = pipelines.sources.read_file, pipelines.sources.iter_jsonl

    def read_file(path, *args, **kwargs):
        seen.append(path.name)
        return real_file(path, *args, **kwargs)

    def iter_jsonl(path, *args, **kwargs):
        seen.append(path.name)
        return real_jsonl(path, *args, **kwargs)

    monkeypatch.setattr(pipelines.sources, "read_file", read_file)
    monkeypatch.setattr(pipelines.sources, "iter_jsonl", iter_jsonl)
    return seen


def source_with_records(tmp_path):
    source = write_docs(tmp_path / "src")
    (source / "c.jsonl").write_text('{"_id": "a", "text": "the zebra sat ."}\n{"_id": "b", "text": "the yak ran ."}\n')
    return source


def hashes(index_dir):
    return FaissVectorStore.open(index_dir).doc_hashes()


def test_an_unchanged_folder_is_not_read_again_and_nothing_changes(tmp_path, embedding, reads):
    source = source_with_records(tmp_path)
    settings = settings_for(embedding)
    first = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert sorted(reads) == sorted([*DOCS, "c.jsonl"])
    before = hashes(tmp_path / "idx")
    reads.clear()
    again = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert reads == [] and again.unchanged == len(before) and again.version == first.version
    assert hashes(tmp_path / "idx") == before


def test_a_changed_file_is_read_even_with_its_size_and_mtime_put_back(tmp_path, embedding, reads):
    source = source_with_records(tmp_path)
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    victim = source / "cats.txt"
    stat = victim.stat()
    victim.write_text(victim.read_text().replace("cat", "rat"))  # same size
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime put back: ctime still moved
    reads.clear()
    stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert reads == ["cats.txt"] and stats.updated == 1
    (source / "c.jsonl").write_text('{"_id": "a", "text": "the zebra sat ."}\n')  # a record removed
    (source / "new.md").write_text("a new note .")
    reads.clear()
    stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert sorted(reads) == ["c.jsonl", "new.md"] and (stats.added, stats.deleted) == (1, 1)
    assert "c.jsonl#b" not in hashes(tmp_path / "idx")


def test_files_touched_just_before_a_run_are_read_again(tmp_path, embedding, reads, monkeypatch):
    # a write in the clock tick of the read that recorded it could leave the stat as recorded
    monkeypatch.setattr(file_stats, "RACY_NS", 3_600 * 10**9)
    source = source_with_records(tmp_path)
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    reads.clear()
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert sorted(reads) == sorted([*DOCS, "c.jsonl"])


def test_a_file_that_gave_an_error_is_read_every_run_and_keeps_its_records(tmp_path, embedding, reads):
    source = source_with_records(tmp_path)
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    (source / "c.jsonl").write_text('{"_id": "a", "text": "the zebra sat ."}\n{"_id": "b", "te\n')
    for _ in range(2):
        reads.clear()
        stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
        assert reads == ["c.jsonl"] and stats.failed == 1
        assert {"c.jsonl#a", "c.jsonl#b"} <= set(hashes(tmp_path / "idx"))


def test_a_record_the_index_no_longer_matches_is_not_trusted(tmp_path, embedding, reads):
    # another writer (a rebuild, the store API, a run that failed part-way) changed the index
    source = source_with_records(tmp_path)
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    store = FaissVectorStore.open(tmp_path / "idx")
    store.delete("sea.md")
    store.persist()
    reads.clear()
    stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert reads == ["sea.md"] and stats.added == 1 and "sea.md" in hashes(tmp_path / "idx")


def test_trust_file_stats_false_reads_every_file(tmp_path, embedding, reads):
    source = source_with_records(tmp_path)
    settings = settings_for(embedding, trust_file_stats=False)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    reads.clear()
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert sorted(reads) == sorted([*DOCS, "c.jsonl"])


def test_a_failing_record_of_a_jsonl_whose_path_holds_a_hash_keeps_its_version(tmp_path, embedding, reads):
    # the file was taken to be "C" (split at the first '#'), recorded without its failing
    # record, and the next run skipped it and deleted that record as gone
    source = write_docs(tmp_path / "src")
    (source / "C#").mkdir()
    records = source / "C#" / "notes.jsonl"
    records.write_text('{"_id": "1", "text": "the zebra sat ."}\n{"_id": "3", "text": "the yak ran ."}\n')
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    records.write_text('{"_id": "1", "text": "the zebra sat ."}\n{"_id": "3", "text": ""}\n')
    for _ in range(2):
        reads.clear()
        stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
        assert "notes.jsonl" in reads and stats.failed == 1 and stats.deleted == 0
        assert "C#/notes.jsonl#3" in hashes(tmp_path / "idx")


def test_a_new_readers_revision_reads_every_file_once(tmp_path, embedding, reads, monkeypatch):
    """The record was keyed by the package's version, which readers' changes do not move:
    after an upgrade that reads HTML's soft hyphens away, an unchanged page kept the old text."""
    source = source_with_records(tmp_path)
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    reads.clear()
    monkeypatch.setattr(file_stats, "READERS_REVISION", pipelines.sources.READERS_REVISION + 1)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert sorted(reads) == sorted([*DOCS, "c.jsonl"])
    reads.clear()
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert reads == []


def test_records_no_run_has_written_for_months_are_removed(tmp_path):
    """Records are keyed by index, folder, size limit and versions, and nothing removed them:
    each deleted or moved index and each upgrade left one for good (1,095 on a test machine)."""
    import time

    folder = tmp_path / "cache" / "file-stats"
    folder.mkdir(parents=True)
    now = time.time()
    ages = {"gone.json": 100, "idle.json": 30, ".gone.json.123.tmp": 100}
    for name, days in ages.items():
        (folder / name).write_text("{}")
        os.utime(folder / name, (now - days * 86400, now - days * 86400))
    cache = file_stats.FileStatsCache.for_source(tmp_path / "idx", tmp_path / "src", 1 << 20, cache_dir=tmp_path / "cache")
    cache.records.save({})
    left = sorted(path.name for path in folder.iterdir())
    assert left == sorted(["idle.json", cache.path.name])
