"""Every kind of bad input in one source folder: each bad document gets a clear error of its
own in the run's statistics and in the log, every good one is indexed, and the command exits
with 3 ("partial": see `htp-index --help`)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pipeline_helpers import DOCS, write_docs
from typer.testing import CliRunner

from htp_cli.main import EXIT_PARTIAL, app
from pipelines.query import open_index

LONG_SENTENCE = " ".join(["cat", "dog", "sea", "sun", "moon", "rain"][i % 6] for i in range(20_000))

# file name -> (bytes, the error it must get, or None when it must be indexed)
CASES: dict[str, tuple[bytes, str | None]] = {
    "empty.txt": (b"", "empty document"),
    "whitespace.txt": (b"  \n\t \r\n  ", "empty document"),
    "invisible.txt": ("\u200b\u200d\ufeff \u2060".encode(), "empty document"),
    "binary.txt": (bytes(range(256)) * 8, "binary content"),
    "controls.txt": (bytes(range(1, 32)) * 64, "binary content"),
    "latin1.txt": ("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"), "not valid UTF-8"),
    "utf16.txt": ("the moon rose over the sea .".encode("utf-16"), None),
    "notes.docx": (b"PK\x03\x04 not a supported format", "unsupported file type"),
    "archive": (b"no suffix at all", "unsupported file type"),
    "long-sentence.txt": (LONG_SENTENCE.encode(), None),
    "placeholders.txt": (b"the cat <PST> sat <B-PST> on the <bos> mat </s> <eos> <|endoftext|> .", None),
    "zero-width.txt": ("the\u200b cat\u200d sat\x07 on\x1b the mat\u2028 .".encode(), None),
    "corpus.jsonl": (
        "\n".join([
            json.dumps({"_id": "j1", "text": "the dog ran in the park ."}),
            "{this is not json",
            json.dumps({"title": "a record without an id"}),
            json.dumps({"_id": "j1", "text": "a duplicate id"}),
            json.dumps({"_id": "j2", "text": "\u200b\u200b"}),
        ]).encode(),
        None,
    ),
}
JSONL_ERRORS = {"corpus.jsonl#corpus.jsonl:2": "malformed record", "corpus.jsonl#corpus.jsonl:3": 'no "_id"',
                "corpus.jsonl#j1": "duplicate _id", "corpus.jsonl#j2": "empty document"}


@pytest.fixture()
def bad_source(tmp_path):
    source = write_docs(tmp_path / "src")
    for name, (payload, _) in CASES.items():
        (source / name).write_bytes(payload)
    with open(source / "huge.txt", "wb") as handle:  # 50 MB, over the default 20 MB limit
        handle.write(b"the cat sat on the mat . " * (50 * 2**20 // 25))
    (tmp_path / "outside.txt").write_text("a secret outside the source root .")
    os.symlink(tmp_path / "outside.txt", source / "escape.txt")
    os.symlink(source / "loop-b.txt", source / "loop-a.txt")  # a loop of file links
    os.symlink(source / "loop-a.txt", source / "loop-b.txt")
    os.symlink(source, source / "subdir-loop")  # a directory loop: reported, not followed
    return source


EXPECTED_ERRORS = {
    **{name: message for name, (_, message) in CASES.items() if message},
    **JSONL_ERRORS,
    "huge.txt": "over the 20 MiB limit",
    "escape.txt": "outside the source root",
    "loop-a.txt": "symbolic link loop",
    "loop-b.txt": "symbolic link loop",
    "subdir-loop": "a link to a folder",
}


def test_each_bad_document_fails_alone_with_a_clear_error(bad_source, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", str(tiny_model_dir))
    monkeypatch.setenv("HTP_INDEX_ENCODER__SEGMENTER", "sentencizer")
    monkeypatch.setenv("HTP_INDEX_CHUNK_SIZE", "256")
    result = CliRunner().invoke(app, ["ingest", str(bad_source), "--index", "idx", "--json"])
    assert result.exit_code == EXIT_PARTIAL == 3, result.output
    stats = json.loads(result.stdout)
    errors = {e["doc_id"]: e["error"] for e in stats["errors"]}
    assert set(errors) == set(EXPECTED_ERRORS)
    for doc_id, message in EXPECTED_ERRORS.items():
        assert message in errors[doc_id], (doc_id, errors[doc_id])
        # and one warning line in the log (the command logs to stderr)
        assert any(doc_id in line and message in line for line in result.stderr.splitlines()), doc_id

    good = {*DOCS, "utf16.txt", "long-sentence.txt", "placeholders.txt", "zero-width.txt", "corpus.jsonl#j1"}
    assert stats["added"] == len(good) and stats["failed"] == len(EXPECTED_ERRORS)
    index = open_index(tmp_path / "idx")
    nodes = index.store.all_nodes()
    assert {n.ref_doc_id for n in nodes} == good
    assert not any(name.startswith("subdir-loop") for name in {n.ref_doc_id for n in nodes})
    # the 20,000-word sentence is split into many nodes, each embedded to a finite vector
    assert sum(n.ref_doc_id == "long-sentence.txt" for n in nodes) > 20
    assert all(np.isfinite(v).all() for _, v in index.store.iter_embeddings())
    # controls are stripped, zero-width characters and literal placeholders stay text
    text = {n.ref_doc_id: n.get_content() for n in nodes}
    assert "\x07" not in text["zero-width.txt"] and "\x1b" not in text["zero-width.txt"]
    assert "\u200b" in text["zero-width.txt"]
    assert "<PST>" in text["placeholders.txt"] and "<B-PST>" in text["placeholders.txt"]
    assert text["utf16.txt"].startswith("the moon rose")
    # and the index answers queries
    assert index.search("the moon over the sea", top_k=3)


def test_the_encoder_truncates_an_unsplit_20000_word_sentence():
    """Called directly (no chunking), the encoder keeps the window: one finite vector each."""
    from tiny_decoder import tiny_encoder

    encoder = tiny_encoder(k="adaptive:8")
    vectors = encoder.encode_documents([LONG_SENTENCE, "the cat sat ."])
    assert vectors.shape[0] == 2 and np.isfinite(vectors).all()
    assert np.isfinite(encoder.encode_queries([LONG_SENTENCE])).all()


def test_a_jsonl_record_that_fails_keeps_its_previously_indexed_version(tmp_path, embedding):
    """A record whose ``_id`` reads but whose text is rejected fails under its own id, so the
    version indexed before stays (as for a folder file), rather than being deleted as gone."""
    from pipeline_helpers import settings_for

    from pipelines.ingest import ingest

    source = tmp_path / "corpus.jsonl"
    good = [{"_id": "a", "text": "the cat sat on the mat ."}, {"_id": "b", "text": "fish swam in the sea ."}]
    source.write_text("\n".join(json.dumps(r) for r in good), encoding="utf-8")
    settings = settings_for(embedding)
    assert ingest(source, tmp_path / "idx", settings, embedding=embedding).added == 2
    damaged = [{"_id": "a", "text": "\x01\x02\x03\x04" * 50}, good[1]]
    source.write_text("\n".join(json.dumps(r) for r in damaged), encoding="utf-8")
    second = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert second.failed == 1 and second.deleted == 0
    assert [(e["doc_id"], "corpus.jsonl:1" in e["error"]) for e in second.errors] == [("a", True)]


def test_a_jsonl_line_over_the_size_limit_keeps_its_previously_indexed_version(tmp_path, embedding):
    """A record grown past ``max_document_mb`` is refused under its ``_id`` (read from the
    start of the line, never the whole line), so its indexed version stays, and the next line
    is read as usual."""
    from pipeline_helpers import settings_for

    from pipelines.ingest import ingest

    source = tmp_path / "corpus.jsonl"
    good = [{"_id": "a", "text": "the cat sat on the mat ."}, {"_id": "b", "text": "fish swam in the sea ."}]
    source.write_text("\n".join(json.dumps(r) for r in good), encoding="utf-8")
    settings = settings_for(embedding).model_copy(update={"max_document_mb": 0.01})
    assert ingest(source, tmp_path / "idx", settings, embedding=embedding).added == 2
    grown = [{"_id": "a", "text": "the cat sat on the mat . " * 2000}, good[1]]
    source.write_text("\n".join(json.dumps(r) for r in grown), encoding="utf-8")
    second = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert second.failed == 1 and second.deleted == 0 and second.unchanged == 1
    [error] = second.errors
    assert error["doc_id"] == "a" and "line 1 is over the 0.01 MiB limit" in error["error"]
    assert "indexed version is kept" in error["error"]


@pytest.mark.parametrize("folder", [False, True])
def test_a_jsonl_file_caught_mid_rewrite_keeps_the_records_after_the_cut(tmp_path, embedding, folder):
    """A file cut inside a line whose ``_id`` still reads (a writer caught mid-rewrite) kept
    that record but deleted every record after the cut (7 of 10); a cut before the ``_id``
    already kept them all. Both keep them all now, until the file reads whole again."""
    from pipeline_helpers import settings_for

    from pipelines.ingest import ingest

    records = [{"_id": f"id{i}", "title": f"T{i}", "text": f"Record {i} mentions token v{i} here."} for i in range(1, 11)]
    whole = "".join(json.dumps(r) + "\n" for r in records)
    source = tmp_path / "src" / "corpus.jsonl"
    source.parent.mkdir()
    source.write_text(whole, encoding="utf-8")
    settings = settings_for(embedding)
    where = source.parent if folder else source
    assert ingest(where, tmp_path / "idx", settings, embedding=embedding).added == 10
    source.write_text("".join(json.dumps(r) + "\n" for r in records[:2]) + '{"_id": "id3", "title": "T3", "te',
                      encoding="utf-8")
    cut = ingest(where, tmp_path / "idx", settings, embedding=embedding)
    assert (cut.deleted, cut.unchanged, cut.failed) == (0, 2, 1)
    [error] = cut.errors
    assert error["doc_id"].endswith("id3") and "no record of corpus.jsonl is deleted until this line is fixed" in error["error"]
    source.write_text(whole.replace("v10", "v10 again"), encoding="utf-8")  # whole again, one record changed
    healed = ingest(where, tmp_path / "idx", settings, embedding=embedding)
    assert (healed.deleted, healed.unchanged, healed.updated, healed.failed) == (0, 9, 1, 0)
    source.write_text("".join(json.dumps(r) + "\n" for r in records[:9]), encoding="utf-8")
    assert ingest(where, tmp_path / "idx", settings, embedding=embedding).deleted == 1  # a record removed is


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"_id": "d1", "text": "long', "d1"),
        ('{"title": "t", "_id": 7, "text": "long', "7"),
        ('{"metadata": {"_id": "inner"}, "id": "outer", "text": "long', None),  # an _id may follow
        ('{"metadata": {"_id": "inner"}, "id": "outer", "text": "whole"}', "outer"),
        ('{"_id": "", "id": "y", "text": "whole"}', "y"),
        ('{"_id": "", "id": "y", "text": "long', None),
        ('{"_id": "a", "text": "t", "_id": "b', None),  # json keeps the last _id
        ('{"id": "x", "_id": "y", "text": "long', "y"),
        ('{"text": "long ... and the _id after it', None),
        ('{"_id": "d1\\u00e9", "text": "\u00e9\u00e9', "d1\u00e9"),
        ('["not", "an", "object"', None),
        ('{"_id": "cut', None),
        ('{"_id": true, "text": "long', None),
    ],
)
def test_record_id_in_prefix_reads_only_whole_top_level_members(line, expected):
    from pipelines.sources import record_id_in_prefix

    assert record_id_in_prefix(line.encode("utf-8")) == expected


def test_a_jsonl_line_over_the_limit_is_skipped_without_losing_the_next_line(tmp_path):
    from pipelines.sources import SourceDocument, SourceError, iter_jsonl

    path = tmp_path / "c.jsonl"
    huge = json.dumps({"text": "x " * 5000, "_id": "late"})
    path.write_text("\n".join([huge, json.dumps({"_id": "n", "text": "next one ."})]) + "\n", encoding="utf-8")
    items = list(iter_jsonl(path, max_bytes=1000))
    assert isinstance(items[0], SourceError) and items[0].doc_id == "c.jsonl:1"  # _id beyond the part read
    assert isinstance(items[1], SourceDocument) and items[1].doc_id == "n"


def test_a_file_named_like_a_jsonl_record_is_reported_and_the_counts_stay_true(tmp_path, embedding):
    """``c.jsonl#x.txt`` (a file) and record ``x.txt`` of ``c.jsonl`` share an id: one was
    silently dropped while both counted as added, and every later run re-embedded one of them
    as "updated"."""
    from pipeline_helpers import settings_for

    from pipelines.ingest import ingest

    source = tmp_path / "src"
    write_docs(source)
    (source / "c.jsonl").write_text(json.dumps({"_id": "x.txt", "text": "harmonicas play the blues ."}))
    (source / "c.jsonl#x.txt").write_text("accordions fill the hall .")
    settings = settings_for(embedding)
    first = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert first.added == len(DOCS) + 1 and first.failed == 1 and first.count == len(DOCS) + 1
    assert [e["doc_id"] for e in first.errors] == ["c.jsonl#x.txt"]
    assert "a file has the id of a JSONL record read before" in first.errors[0]["error"]
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    assert [hit["text"] for hit in index.search("harmonicas", 1, mode="sparse")] == ["harmonicas play the blues ."]
    again = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert (again.updated, again.unchanged, again.failed, again.nodes_embedded) == (0, len(DOCS) + 1, 1, 0)
