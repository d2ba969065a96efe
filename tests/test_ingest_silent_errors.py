"""Ingest and rebuild paths that used to lose documents, index stale text or ignore a setting
while reporting success (found by an audit; each test failed before its fix)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pipeline_helpers import DOCS, fail_embedding_of, settings_for, write_docs

from indexes import FaissVectorStore
from pipelines.errors import EmptySourceError, MetricMismatchError
from pipelines.ingest import ingest
from pipelines.rebuild import rebuild


def indexed(index_dir: Path) -> set[str]:
    return set(FaissVectorStore.open(index_dir, use_gpu=False).doc_hashes())


def stored_text(index_dir: Path, doc_id: str) -> str:
    store = FaissVectorStore.open(index_dir, use_gpu=False)
    nodes = store.get_nodes(node_ids=store.ref_doc_node_ids(doc_id))
    return " ".join(node.get_content() for node in nodes)


# 1 ------------------------------------------------------------------------------------------
def test_unlistable_subfolder_does_not_delete_its_documents(tmp_path, embedding, monkeypatch):
    """os.walk skips a folder it cannot list (permission denied, a flaky network share)
    without a word; the plan then sees its documents as gone and deletes them."""
    source = write_docs(tmp_path / "src")
    write_docs(source / "team", {"notes.txt": "the dog ran in the park .", "plan.md": "the sun rose over the hill ."})
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert {"team/notes.txt", "team/plan.md"} <= indexed(tmp_path / "idx")

    real_scandir = os.scandir
    blocked = str((source / "team").resolve())

    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    monkeypatch.undo()
    assert {"team/notes.txt", "team/plan.md"} <= indexed(tmp_path / "idx")
    assert stats.deleted == 0 and [e["doc_id"] for e in stats.errors] == ["team"]
    assert "could not list this folder" in stats.errors[0]["error"]


# 2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", ["rebuild", "ingest"])
def test_the_new_text_of_a_record_whose_id_repeats_is_indexed(tmp_path, embedding, run):
    """A JSONL whose _id repeats: 'the first one is kept' says the error, and ingest keeps the
    first record's new text; rebuild --source took the duplicate's error for the record's own
    failure and swapped its new text for the stale indexed nodes (and the stale hash)."""
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"_id": "a", "text": "the cat sat on the mat ."}, {"_id": "b", "text": "fish swam in the sea ."}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    settings = settings_for(embedding)
    ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    rows[0]["text"] = "protein binds receptor . cells grew faster ."
    rows.append({"_id": "a", "text": "a stray duplicate line ."})
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if run == "rebuild":
        rebuild(tmp_path / "idx", settings, source=corpus, embedding=embedding)
    else:
        ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    assert "protein" in stored_text(tmp_path / "idx", "a")


# 3 ------------------------------------------------------------------------------------------
def test_ingesting_one_file_does_not_delete_the_rest_of_the_index(tmp_path, embedding):
    """`htp-index ingest notes.txt --index idx` into an index of a folder: the single file is
    'the source', so every other document is deleted without a question (the empty-source
    guard only looks at a source with nothing in it)."""
    source = write_docs(tmp_path / "src")
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    extra = tmp_path / "more" / "notes.txt"
    extra.parent.mkdir()
    extra.write_text("the dog ran in the park .", encoding="utf-8")
    stats = ingest(extra, tmp_path / "idx", settings, embedding=embedding)
    assert set(DOCS) <= indexed(tmp_path / "idx") and "notes.txt" in indexed(tmp_path / "idx")
    assert stats.added == 1 and stats.deleted == 0


# 4 ------------------------------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_fails_alone(tmp_path, embedding):
    """A file whose name is not valid UTF-8 (copied from an old Windows/latin-1 share) must be
    one failed document; the source promises an unreadable document 'never stops the run'."""
    source = write_docs(tmp_path / "src")
    with open(os.path.join(os.fsencode(source), b"caf\xe9.txt"), "w", encoding="utf-8") as fh:
        fh.write("the moon set behind house .")
    stats = ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert set(DOCS) <= indexed(tmp_path / "idx")
    assert stats.failed == 1 and "not UTF-8" in stats.errors[0]["error"]
    assert stats.errors[0]["doc_id"] == "caf\ufffd.txt"


# 5 ------------------------------------------------------------------------------------------
def test_a_record_with_null_id_is_rejected_not_indexed_as_None(tmp_path):
    from pipelines.sources import SourceDocument, iter_jsonl

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"_id": None, "text": "the cat sat ."}) + "\n"
                      + json.dumps({"_id": None, "text": "the dog ran ."}) + "\n", encoding="utf-8")
    ids = [item.doc_id for item in iter_jsonl(corpus) if isinstance(item, SourceDocument)]
    assert "None" not in ids, ids


# 6 ------------------------------------------------------------------------------------------
def test_html_title_is_searchable_text(tmp_path):
    """chunking.to_llama_document: 'Titles are already part of the text (see sources)', so
    metadata is kept out of the embedded text. JSONL titles are; an HTML <title> is not: it
    only goes to metadata, which is excluded from the embedding and keyword text."""
    from llama_index.core.schema import MetadataMode

    from pipelines.chunking import make_splitter, split_documents
    from pipelines.sources import iter_folder

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "page.html").write_text(
        "<html><head><title>Zanzibar spice trade</title></head><body><p>It grew.</p></body></html>",
        encoding="utf-8")
    docs = list(iter_folder(tmp_path / "src"))
    nodes = split_documents(docs, make_splitter(str.split, 64, 0))
    texts = " ".join(n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes)
    assert "Zanzibar" in texts, texts


# 7 ------------------------------------------------------------------------------------------
def test_rebuild_from_an_empty_source_does_not_empty_the_index(tmp_path, embedding):
    """ingest refuses an emptied/unmounted source (EmptySourceError); rebuild --source reads
    the same kind of source and happily switches to an empty version, exit 0."""
    source = write_docs(tmp_path / "src")
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    empty = tmp_path / "mnt"
    empty.mkdir()
    with pytest.raises(EmptySourceError, match="holds no documents"):
        rebuild(tmp_path / "idx", settings, source=empty, embedding=embedding)
    assert set(DOCS) <= indexed(tmp_path / "idx")


# 8 ------------------------------------------------------------------------------------------
def test_rebuild_from_source_honours_delete_missing_false(tmp_path, embedding):
    """An append-only index (delete_missing = false, `--keep-missing`) keeps documents that left
    the source; rebuild --source drops every one of them, ignoring the setting."""
    source = write_docs(tmp_path / "src")
    settings = settings_for(embedding, delete_missing=False)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    (source / "cats.txt").unlink()
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert "cats.txt" in indexed(tmp_path / "idx")  # append-only, as asked
    rebuild(tmp_path / "idx", settings, source=source, embedding=embedding)
    assert "cats.txt" in indexed(tmp_path / "idx")


# 9 ------------------------------------------------------------------------------------------
def test_emptied_source_with_only_an_unsupported_file_does_not_delete_everything(tmp_path, embedding):
    """The empty-source guard counts an unsupported file (Thumbs.db, desktop.ini, a README
    without suffix left on a mount point) as content, so an emptied source deletes the index."""
    source = write_docs(tmp_path / "src")
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    for name in DOCS:
        (source / name).unlink()
    (source / "Thumbs.db").write_bytes(b"\x00\x01")
    with pytest.raises(EmptySourceError, match="no document that could be read.*Thumbs.db"):
        ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert set(DOCS) <= indexed(tmp_path / "idx")


# 10 -----------------------------------------------------------------------------------------
def test_a_jsonl_line_cut_short_does_not_delete_its_record(tmp_path, embedding):
    """A line that no longer parses (a writer appending/rewriting the file during the run, a
    truncated copy) is reported under its line number, so the record's id is 'missing' and its
    indexed version is deleted: the documented policy is that a broken record keeps it."""
    corpus = tmp_path / "corpus.jsonl"
    rows = [json.dumps({"_id": "a", "text": "the cat sat on the mat ."}),
            json.dumps({"_id": "b", "text": "fish swam in the sea ."})]
    corpus.write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = settings_for(embedding)
    ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    corpus.write_text(rows[0] + "\n" + rows[1][:20] + "\n", encoding="utf-8")
    stats = ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    assert stats.failed == 1
    assert "b" in indexed(tmp_path / "idx"), f"deleted={stats.deleted}"


# 11 -----------------------------------------------------------------------------------------
def test_a_symlinked_folder_is_reported_not_silently_skipped(tmp_path, embedding):
    """Links to directories are not followed (no loops) -- but not reported either: a folder
    of documents reached through a link is never indexed and the run says all is well."""
    source = write_docs(tmp_path / "src")
    shared = write_docs(tmp_path / "shared", {"policy.txt": "the dog ran in the park ."})
    (source / "shared").symlink_to(shared, target_is_directory=True)
    stats = ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    ids = indexed(tmp_path / "idx")
    assert "shared/policy.txt" not in ids
    assert [(e["doc_id"], "link to a folder" in e["error"]) for e in stats.errors] == [("shared", True)]


# 12 -----------------------------------------------------------------------------------------
def test_rebuild_does_not_drop_a_document_the_encoder_fails_on(tmp_path, embedding, monkeypatch):
    """ingest keeps a document's previous nodes when its embedding fails; a rebuild has no old
    nodes in its new version to keep, so it is refused and the live version stays (it used to
    switch without the document, saying only 'could not embed')."""
    from pipelines.errors import RebuildVerificationError

    source = write_docs(tmp_path / "src")
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    version = FaissVectorStore.read_manifest(tmp_path / "idx").version
    fail_embedding_of(embedding, "moon", monkeypatch, "simulated out of memory")
    with pytest.raises(RebuildVerificationError, match="could not be embedded.*live version is unchanged"):
        rebuild(tmp_path / "idx", settings, index_kind="flat", embedding=embedding)
    monkeypatch.undo()
    assert FaissVectorStore.read_manifest(tmp_path / "idx").version == version
    assert set(DOCS) <= indexed(tmp_path / "idx")


# 13 -----------------------------------------------------------------------------------------
def test_chunk_overlap_is_applied_or_refused_not_silently_capped(tmp_path, embedding):
    """An explicit chunk_overlap above a quarter of chunk_size is refused (it was capped by the
    splitter while the manifest and `info` recorded the value asked for); one within it is
    recorded and used as asked."""
    source = write_docs(tmp_path / "src")
    with pytest.raises(ValueError, match="chunk_overlap 32 is more than 1/4 of chunk_size 64"):
        ingest(source, tmp_path / "idx", settings_for(embedding).with_overrides(chunk_size=64, chunk_overlap=32),
               embedding=embedding)
    ingest(source, tmp_path / "idx", settings_for(embedding).with_overrides(chunk_size=64, chunk_overlap=16),
           embedding=embedding)
    recorded = FaissVectorStore.read_manifest(tmp_path / "idx").splitting
    from pipelines.chunking import make_splitter

    used = make_splitter(embedding.encoder.tokenize, recorded["chunk_size"], recorded["chunk_overlap"]).chunk_overlap
    assert recorded == {"chunk_size": 64, "chunk_overlap": 16} and used == 16


# 14 -----------------------------------------------------------------------------------------
def test_a_jsonl_record_with_half_an_emoji_fails_alone(tmp_path, embedding):
    """JSON text cut inside a surrogate pair (JavaScript's substring does it: "\\ud83d") parses to
    a lone surrogate; the content hash's utf-8 encode then raises out of the run: one bad record
    stops the whole ingest, every run, instead of being one failed document."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "text": "the cat sat on the mat ."}) + "\n"
                      + '{"_id": "b", "text": "fish swam in the sea \\ud83d"}\n', encoding="utf-8")
    stats = ingest(corpus, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert "a" in indexed(tmp_path / "idx")
    assert stats.failed == 1 and stats.errors[0]["doc_id"] == "b" and "surrogate" in stats.errors[0]["error"]


# 15 -----------------------------------------------------------------------------------------
def test_list_metadata_of_a_jsonl_record_is_kept_or_reported(tmp_path):
    """Non-scalar metadata values (tags lists, nested objects) are dropped without a word, and
    a change to them is not a change (the hash never sees them)."""
    from pipelines.sources import iter_jsonl

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "text": "the cat sat .", "metadata": {"tags": ["x", "y"], "year": 2020}}) + "\n",
                      encoding="utf-8")
    (item,) = list(iter_jsonl(corpus))
    assert item.metadata == {"tags": ["x", "y"], "year": 2020}


# 16 -----------------------------------------------------------------------------------------
def test_an_index_inside_its_source_folder_is_not_read_as_documents(tmp_path, embedding):
    """`htp-index ingest . --index idx`: the index's own files (manifests, docs log, segments)
    are walked as source documents and each run 'fails' on them (exit 3 every time)."""
    source = write_docs(tmp_path / "src")
    settings = settings_for(embedding)
    ingest(source, source / "idx", settings, embedding=embedding)
    stats = ingest(source, source / "idx", settings, embedding=embedding)
    assert stats.failed == 0, [e["doc_id"] for e in stats.errors]


def test_a_jsonl_caught_mid_rewrite_does_not_empty_the_index(tmp_path, embedding):
    """The same guard, more likely: the exporter rewrites corpus.jsonl (truncate, write) while
    the scheduled ingest reads it; one half-written line is 'content', so every record goes."""
    corpus = tmp_path / "corpus.jsonl"
    rows = [json.dumps({"_id": str(i), "text": text}) for i, text in enumerate(DOCS.values())]
    corpus.write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = settings_for(embedding)
    ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    corpus.write_text(rows[0][:15], encoding="utf-8")  # the rewrite, caught after 15 bytes
    # the cut line names record "0": refused under it, and no record of the file is deleted
    stats = ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    assert stats.deleted == 0 and [e["doc_id"] for e in stats.errors] == ["0"]
    assert {"0", "1", "2"} <= indexed(tmp_path / "idx")
    corpus.write_text(rows[0][:5], encoding="utf-8")  # caught before its _id: by line, none deleted
    stats = ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    assert stats.deleted == 0 and [e["doc_id"] for e in stats.errors] == ["corpus.jsonl:1"]
    assert {"0", "1", "2"} <= indexed(tmp_path / "idx")
    # Caught later, with whole records before the cut: the cut one is refused, none deleted.
    corpus.write_text("\n".join(rows[:2]) + "\n" + rows[2][:15], encoding="utf-8")
    stats = ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    assert {"0", "1", "2"} <= indexed(tmp_path / "idx") and stats.deleted == 0
    assert [e["doc_id"] for e in stats.errors] == ["2"]


# 17 -----------------------------------------------------------------------------------------
def test_html_table_cells_stay_separate_words():
    """<td>/<th>/<dt>/<dd> are not block tags for the extractor: adjacent cells are glued into
    one token ('aspirin100mg'), so neither keyword nor dense search finds 'aspirin'."""
    from pipelines.sources import html_to_text

    text, _ = html_to_text("<table><tr><td>aspirin</td><td>100mg</td></tr></table>")
    assert "aspirin" in text.split(), text


# 18 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_vectors", [False, True])
def test_rebuild_keeps_the_metric_the_index_was_built_with(tmp_path, embedding, keep_vectors):
    """An index built with metric = "l2": a later `htp-index rebuild --index-kind flat` (or
    --keep-vectors) without the setting writes the new version with the default metric "ip"
    (_create_store takes settings.metric, not the live index's), and says nothing."""
    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings_for(embedding, metric="l2"), embedding=embedding)
    assert FaissVectorStore.read_manifest(tmp_path / "idx").metric == "l2"
    rebuild(tmp_path / "idx", settings_for(embedding), index_kind="flat", embedding=embedding,
            keep_vectors=keep_vectors)
    assert FaissVectorStore.read_manifest(tmp_path / "idx").metric == "l2"


def test_an_explicit_metric_other_than_the_index_is_refused_at_ingest(tmp_path, embedding):
    """index_kind set explicitly and different is refused naming rebuild; metric used to be
    ignored (the index kept 'ip', the run reported success)."""
    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    (source / "new.txt").write_text("the dog ran in the park .", encoding="utf-8")
    with pytest.raises(MetricMismatchError, match="rebuild"):
        ingest(source, tmp_path / "idx", settings_for(embedding, metric="l2"), embedding=embedding)
    assert FaissVectorStore.read_manifest(tmp_path / "idx").metric == "ip"


def test_a_jsonl_line_without_a_readable_id_keeps_every_record_of_its_file(tmp_path, embedding):
    """A damaged line whose _id cannot be read could be any record: none of the file's records
    is deleted as gone while it is there (the error says so); once fixed, deletions resume."""
    corpus = tmp_path / "corpus.jsonl"
    rows = [json.dumps({"_id": str(i), "text": text}) for i, text in enumerate(DOCS.values())]
    corpus.write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = settings_for(embedding)
    ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    corpus.write_text(rows[0] + "\n" + '{"text": "a record cut before its id \n', encoding="utf-8")
    stats = ingest(corpus, tmp_path / "idx", settings, embedding=embedding)
    assert stats.deleted == 0 and {"0", "1", "2"} <= indexed(tmp_path / "idx")
    assert "no record of corpus.jsonl is deleted until this line is fixed" in stats.errors[0]["error"]
    corpus.write_text(rows[0] + "\n", encoding="utf-8")
    assert ingest(corpus, tmp_path / "idx", settings, embedding=embedding).deleted == 2


def test_rebuild_from_a_source_with_an_unlistable_folder_keeps_its_documents(tmp_path, embedding, monkeypatch):
    source = write_docs(tmp_path / "src")
    write_docs(source / "team", {"notes.txt": "the dog ran in the park ."})
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    real_scandir, blocked = os.scandir, str((source / "team").resolve())

    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats = rebuild(tmp_path / "idx", settings, source=source, embedding=embedding)
    monkeypatch.undo()
    assert "team/notes.txt" in indexed(tmp_path / "idx") and stats.failed == 1


def test_a_first_ingest_of_a_source_without_documents_says_so(tmp_path, embedding, caplog):
    # it wrote an empty index and printed zeros, without a word about why
    empty = tmp_path / "src"
    empty.mkdir()
    (empty / ".hidden.txt").write_text("left out by design")
    stats = ingest(empty, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert stats.count == 0
    assert any("holds no documents" in record.getMessage() and ".jsonl" in record.getMessage()
               for record in caplog.records if record.levelname == "WARNING")


def test_a_correction_unlike_the_indexs_is_refused_not_ignored(tmp_path, embedding):
    # correction = "none" on an index whose vectors are centred changed nothing and said nothing
    # (a kept eval index scored 92.3 where a fresh one without the correction scored 79.8)
    from pipelines.errors import CorrectionMismatchError
    from pipelines.runs import RunStats

    many = {f"d{i}.txt": f"the cat number {i} sat on mat {i} . the dog ran far ." for i in range(10)}
    source = write_docs(tmp_path / "src", many)
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert FaissVectorStore.open(tmp_path / "idx").correction is not None
    (source / "new.txt").write_text("a new text arrives .")
    with pytest.raises(CorrectionMismatchError, match="rebuild"):
        ingest(source, tmp_path / "idx", settings_for(embedding, correction="none"), embedding=embedding)
    assert "new.txt" not in indexed(tmp_path / "idx")
    stats = ingest(source, tmp_path / "idx", settings_for(embedding, correction="center"), embedding=embedding)
    assert isinstance(stats, RunStats) and "new.txt" in indexed(tmp_path / "idx")


def test_an_adapter_asked_of_a_corpus_too_small_for_one_does_not_block_later_ingests(tmp_path, embedding):
    # The adapter fell back to the centring (too few pseudo-query pairs), then the next ingest
    # with the same setting was refused as a correction mismatch, and so was every one after
    # a rebuild (which fell back again): a scheduled ingest failed for good
    from pipelines.errors import CorrectionMismatchError

    many = {f"d{i}.txt": f"the cat number {i} sat on mat {i} . the dog ran far ." for i in range(10)}
    source = write_docs(tmp_path / "src", many)
    adapter = settings_for(embedding, correction="adapter")
    ingest(source, tmp_path / "idx", adapter, embedding=embedding)
    assert FaissVectorStore.open(tmp_path / "idx").correction.kind == "center"
    (source / "new.txt").write_text("a new text arrives .")
    ingest(source, tmp_path / "idx", adapter, embedding=embedding)
    assert "new.txt" in indexed(tmp_path / "idx")
    with pytest.raises(CorrectionMismatchError):  # a centring is still not "none"
        ingest(source, tmp_path / "idx", settings_for(embedding, correction="none"), embedding=embedding)


def test_an_emptied_jsonl_file_in_a_folder_keeps_its_records_and_is_reported(tmp_path, embedding):
    # truncated before a rewrite, it gave no item at all: every record deleted, exit 0, no word
    source = write_docs(tmp_path / "src")
    records = tmp_path / "src" / "c.jsonl"
    records.write_text('{"_id": "a", "text": "the zebra sat ."}\n{"_id": "b", "text": "the yak ran ."}\n')
    settings = settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    records.write_text("\n  \n")
    stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert stats.deleted == 0 and {"c.jsonl#a", "c.jsonl#b"} <= indexed(tmp_path / "idx")
    assert [e["doc_id"] for e in stats.errors] == ["c.jsonl"] and "empty JSONL" in stats.errors[0]["error"]
    records.unlink()  # removed on purpose: its records go
    stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert stats.deleted == 2 and not {"c.jsonl#a", "c.jsonl#b"} & indexed(tmp_path / "idx")


@pytest.mark.parametrize("command", ["ingest", "rebuild"])
def test_a_commit_that_fails_on_a_full_disk_leaves_no_segment_behind(tmp_path, embedding, monkeypatch, command):
    # The failed commit put its segments back into their staging folders for a retry, but the
    # command exited: they stayed until a later commit, holding the room the retry needed
    import errno

    from indexes import persist

    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    before = FaissVectorStore.open(tmp_path / "idx").version
    (source / "more.txt").write_text("a further text about the harbour and its boats .")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persist, "_write_text_durably", full)
    with pytest.raises(OSError, match="No space left"):
        if command == "ingest":
            ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
        else:
            rebuild(tmp_path / "idx", settings_for(embedding), embedding=embedding)
    monkeypatch.undo()
    segments_dir = tmp_path / "idx" / "segments"
    assert [p.name for p in segments_dir.iterdir() if p.name.startswith(".tmp")] == []
    assert FaissVectorStore.open(tmp_path / "idx").version == before
    assert ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding).count == 4


def test_a_segment_that_cannot_be_written_names_the_index(tmp_path, embedding, monkeypatch):
    # SQLite's bare "disk I/O error" (under ulimit -f) named neither the file nor the index
    import sqlite3

    from indexes import docstore

    def refuse(path):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(docstore, "_new_file", refuse)
    with pytest.raises(OSError, match=r"could not write a segment of the index at .*idx \(disk I/O error\)"):
        ingest(write_docs(tmp_path / "src"), tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert not (tmp_path / "idx" / "CURRENT").exists()


def test_a_compaction_whose_commit_fails_leaves_no_segment_behind(tmp_path, embedding, monkeypatch):
    import errno

    from indexes import persist
    from pipelines.maintenance import compact_index

    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    (source / "more.txt").write_text("a further text about the harbour and its boats .")
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persist, "_write_text_durably", full)
    with pytest.raises(OSError, match="No space left"):
        compact_index(tmp_path / "idx", settings_for(embedding))
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "idx" / "segments").iterdir() if p.name.startswith(".tmp")] == []
    assert compact_index(tmp_path / "idx", settings_for(embedding)).merges >= 1
