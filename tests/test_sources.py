"""Reading sources: stable ids, content hashes, and a clear error for every bad document."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.sources import (
    SourceDocument,
    SourceError,
    decode_text,
    errors_by_id,
    html_to_text,
    iter_folder,
    iter_jsonl,
    iter_source,
    iter_texts,
)


def by_id(items):
    return {item.doc_id: item for item in items}


def test_folder_ids_are_relative_paths_and_hashes_follow_content(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Alpha text.", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("# Beta\n\nBeta text.", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    first = by_id(iter_folder(tmp_path))
    assert sorted(first) == ["a.txt", "sub/b.md"]
    assert first["sub/b.md"].metadata["file_type"] == "md"
    (tmp_path / "a.txt").write_text("Alpha text, edited.", encoding="utf-8")
    second = by_id(iter_folder(tmp_path))
    assert second["a.txt"].content_hash != first["a.txt"].content_hash
    assert second["sub/b.md"].content_hash == first["sub/b.md"].content_hash


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("empty.txt", b"", "empty document"),
        ("blank.txt", b"  \n\t  \n", "empty document"),
        ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR", "binary"),
        ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "not valid UTF-8"),
        ("notes.docx", b"PK\x03\x04", "unsupported file type"),
        ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "PDF"),
    ],
)
def test_bad_files_become_clear_errors_and_the_rest_is_read(tmp_path, name, payload, message):
    (tmp_path / "good.txt").write_text("A good document.", encoding="utf-8")
    (tmp_path / name).write_bytes(payload)
    items = by_id(iter_folder(tmp_path))
    assert isinstance(items["good.txt"], SourceDocument)
    assert isinstance(items[name], SourceError) and message in items[name].error


def test_utf16_with_bom_is_decoded():
    assert decode_text("héllo wörld".encode("utf-16")) == "héllo wörld"
    assert decode_text("\ufeffhello".encode()) == "hello"


def test_files_over_the_size_limit_are_reported(tmp_path):
    (tmp_path / "big.txt").write_text("word " * 1000, encoding="utf-8")
    item = next(iter_folder(tmp_path, max_bytes=1000))
    assert isinstance(item, SourceError) and "limit" in item.error


def test_symlink_loops_and_links_outside_the_root_are_safe(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "doc.txt").write_text("Inside.", encoding="utf-8")
    (tmp_path / "secret.txt").write_text("Outside.", encoding="utf-8")
    os.symlink(root, root / "loop")  # a directory loop: not followed
    os.symlink(tmp_path / "secret.txt", root / "escape.txt")
    items = by_id(iter_folder(root))
    assert isinstance(items["doc.txt"], SourceDocument)
    assert isinstance(items["escape.txt"], SourceError) and "outside the source root" in items["escape.txt"].error
    assert [key for key in items if key.startswith("loop")] == ["loop"]  # reported, not followed
    assert isinstance(items["loop"], SourceError) and "a link to a folder" in items["loop"].error


def test_a_linked_file_is_read_and_named_by_its_link(tmp_path):
    """A link's document took its target's file_name and file_type (while its id and
    source_path are the link's), and a link note.txt to a page was parsed as HTML."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "real.html").write_text("<html><head><title>Kiwi</title></head><body><p>Fuzzy.</p></body></html>",
                                    encoding="utf-8")
    (root / "second.txt").write_text("Second text.", encoding="utf-8")
    os.symlink("real.html", root / "note.txt")
    os.symlink("second.txt", root / "link.md")
    items = by_id(iter_folder(root))
    assert items["note.txt"].metadata == {"file_name": "note.txt", "file_type": "txt", "source_path": "note.txt"}
    assert items["note.txt"].text.startswith("<html>")  # read as the text file it is named
    assert items["link.md"].metadata == {"file_name": "link.md", "file_type": "md", "source_path": "link.md"}
    assert items["real.html"].metadata["file_name"] == "real.html" and items["real.html"].text == "Kiwi\n\nFuzzy."


def test_only_a_real_index_inside_the_source_is_left_out(tmp_path):
    # A file named CURRENT beside a versions/ folder (an API's docs) made the folder "an index":
    # skipped without a word, so its indexed documents were deleted as gone
    root = tmp_path / "root"
    (root / "api" / "versions").mkdir(parents=True)
    (root / "api" / "CURRENT").write_text("v2\n", encoding="utf-8")
    (root / "api" / "versions" / "v1.md").write_text("Version one.", encoding="utf-8")
    (root / "api" / "guide.md").write_text("The guide.", encoding="utf-8")
    (root / "idx" / "versions" / "v000003").mkdir(parents=True)  # an index's layout
    (root / "idx" / "CURRENT").write_text("v000003\n", encoding="ascii")
    (root / "idx" / "versions" / "v000003" / "manifest.json").write_text("{}", encoding="ascii")
    ids = set(by_id(iter_folder(root)))
    assert {"api/CURRENT", "api/versions/v1.md", "api/guide.md"} <= ids
    assert not any(doc_id.startswith("idx/") for doc_id in ids)


def test_a_folder_whose_pointer_cannot_be_read_is_listed_or_reported_not_fatal(tmp_path, monkeypatch):
    # (root/sub/CURRENT).is_file() raised PermissionError in a folder that cannot be searched,
    # outside any handler: the whole ingest stopped (exit 1) instead of reporting the folder
    from pathlib import Path

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("A.", encoding="utf-8")
    (root / "b.txt").write_text("B.", encoding="utf-8")
    real = Path.is_file

    def denied(path):
        if path.name == "CURRENT":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "is_file", denied)
    assert {"sub/a.txt", "b.txt"} <= set(by_id(iter_folder(root)))


def test_a_single_file_source_is_read_only_if_a_folder_would_read_it(tmp_path):
    # a .csv named alone was indexed as text, where a folder reports it as unsupported
    (tmp_path / "data.csv").write_text("name,fruit\nann,apple\n", encoding="utf-8")
    (tmp_path / "notes.MD").write_text("# Notes\n\nApples.", encoding="utf-8")
    refused = list(iter_source(tmp_path / "data.csv"))
    assert isinstance(refused[0], SourceError) and "unsupported file type '.csv'" in refused[0].error
    assert isinstance(list(iter_source(tmp_path / "notes.MD"))[0], SourceDocument)


def test_exclude_patterns_leave_files_and_folders_out_as_gitignore_reads_them(tmp_path):
    # a docs folder's images and README (no suffix) were reported as failed on every run
    root = tmp_path / "root"
    for path in ("a.md", "fig.png", "README", "drafts/b.md", "sub/drafts/c.md", "sub/d.md", "build/e.md",
                 "notes/f.md", "notes/g.txt"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("Some text.", encoding="utf-8")
    read = lambda *patterns: sorted(by_id(iter_folder(root, exclude=patterns)))  # noqa: E731
    every = read()
    assert {"fig.png", "README"} <= set(every)
    assert read("*.png", "README") == sorted(set(every) - {"fig.png", "README"})
    assert read("drafts/") == sorted(set(every) - {"drafts/b.md", "sub/drafts/c.md"})  # a name, any depth
    assert read("/drafts") == sorted(set(every) - {"drafts/b.md"})  # anchored at the root
    assert read("notes/*.md", "build") == sorted(set(every) - {"notes/f.md", "build/e.md"})
    assert read("*.md/") == every  # folders only: no folder is named so


def _within(seconds, read):
    """``read()``'s result, or a failure if it has not returned in ``seconds`` (a named pipe
    blocks its reader until a writer comes: the test must fail, not hang)."""
    import threading

    done: list = []
    worker = threading.Thread(target=lambda: done.append(read()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert done, f"still reading after {seconds} s: a named pipe was opened"
    return done[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_not_opened(tmp_path):
    """A FIFO named like a document (``pipe.txt``, ``feed.jsonl``) was opened and read: the
    scan waited for a writer for good, holding the index's lock, and no run ever ended."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("A document.", encoding="utf-8")
    os.mkfifo(root / "pipe.txt")
    os.mkfifo(root / "feed.jsonl")
    os.symlink(root / "pipe.txt", root / "link.md")
    items = _within(10, lambda: by_id(iter_folder(root)))
    assert isinstance(items["a.txt"], SourceDocument)
    for name in ("pipe.txt", "feed.jsonl", "link.md"):
        assert isinstance(items[name], SourceError) and "a named pipe, not a regular file" in items[name].error
    assert items["feed.jsonl"].covers == "feed.jsonl#"  # its indexed records are kept
    for name in ("pipe.txt", "feed.jsonl"):  # the source itself: refused before anything is opened
        with pytest.raises(FileNotFoundError, match="neither a folder nor a regular file"):
            iter_source(root / name)


def test_html_keeps_visible_text_and_title():
    text, title = html_to_text(
        "<html><head><title>T</title><style>p{}</style></head>"
        "<body><p>Hello <b>world</b></p><script>x()</script><p>Bye</p></body></html>"
    )
    assert title == "T" and text == "Hello world\nBye"


def test_html_keeps_the_lines_and_indentation_of_code_in_pre():
    """Whitespace was collapsed everywhere, so a code block lost its indentation."""
    text, _ = html_to_text("<p>Call   it\n  so:</p><pre>\ndef f(x):\n    return  <b>x</b>\n\n</pre><p>Done</p>")
    assert text == "Call it\nso:\ndef f(x):\n    return  x\nDone"


def one_page_pdf(text: bytes, to_unicode: dict[int, int]) -> bytes:
    """A PDF drawing ``text`` in Helvetica, whose ToUnicode map reads printable ASCII as itself
    and each byte in ``to_unicode`` as that code point (as a LaTeX PDF maps its ligatures)."""
    chars = "".join(f"<{byte:02X}> <{cp:04X}>\n" for byte, cp in to_unicode.items())
    cmap = (f"/CIDInit /ProcSet findresource begin 12 dict begin begincmap /CMapName /Adobe-Identity-UCS def "
            f"/CMapType 2 def 1 begincodespacerange <00> <FF> endcodespacerange {len(to_unicode)} beginbfchar\n"
            f"{chars}endbfchar 1 beginbfrange <20> <7E> <0020> endbfrange endcmap CMapName currentdict "
            "/defineresource pop end end").encode()
    content = b"BT /F1 12 Tf 72 720 Td (" + text + b") Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /ToUnicode 6 0 R >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(cmap), cmap),
    ]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def test_a_pdfs_ligatures_and_a_soft_hyphen_are_read_as_the_words_they_draw(tmp_path):
    """pypdf gives a LaTeX PDF's "fi" and "ffi" as U+FB01 and U+FB03, and HTML's &shy; is a
    U+00AD inside the word: the model and the keyword index saw "\ufb01nancial" and "docu", "mentation"."""
    (tmp_path / "report.pdf").write_bytes(one_page_pdf(b"The \x01nancial report of the o\x02ce", {1: 0xFB01, 2: 0xFB03}))
    (tmp_path / "page.html").write_text("<p>The docu&shy;mentation of the tele\u00adscope</p>", encoding="utf-8")
    read = by_id(iter_folder(tmp_path))
    assert read["report.pdf"].text == "The financial report of the office"
    assert read["page.html"].text == "The documentation of the telescope"


def test_jsonl_records_bad_lines_and_duplicates(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"_id": "d1", "title": "Title one", "text": "Body one."}),
        "{not json",
        json.dumps({"title": "no id"}),
        json.dumps({"_id": "d2", "title": "", "text": ""}),
        json.dumps({"_id": "d1", "text": "duplicate"}),
        json.dumps(["a", "list"]),
        json.dumps({"_id": "d3", "text": "Body three.", "metadata": {"year": 2020, "nested": {"x": 1}}}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(iter_jsonl(path))
    docs = [i for i in items if isinstance(i, SourceDocument)]
    errors = [i for i in items if isinstance(i, SourceError)]
    assert [d.doc_id for d in docs] == ["d1", "d3"]
    assert docs[0].text == "Title one\n\nBody one." and docs[0].metadata["title"] == "Title one"
    assert docs[1].metadata == {"year": 2020, "nested": '{"x": 1}'}  # an object is kept as its JSON
    assert len(errors) == 5
    assert any("duplicate _id" in e.error for e in errors)
    assert any("corpus.jsonl:2" in e.doc_id for e in errors)
    # a line whose _id cannot be read covers every record of the file (none deleted as gone)
    assert [e.covers for e in errors if e.doc_id == "corpus.jsonl:2"] == [""]


def test_a_jsonl_text_or_title_that_is_not_a_string_is_refused_by_name(tmp_path):
    """A list, an object, a number or a boolean was indexed as its Python repr ("['First',
    'Second']", "True") with no report."""
    path = tmp_path / "corpus.jsonl"
    records = [{"_id": "list", "text": ["First.", "Second."]}, {"_id": "object", "text": {"body": "x"}},
               {"_id": "flag", "text": True}, {"_id": "count", "title": 5, "text": "Body."},
               {"_id": "fine", "title": None, "text": "Body."}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    items = by_id(iter_jsonl(path))
    assert isinstance(items["fine"], SourceDocument) and items["fine"].text == "Body."
    for doc_id, kind in [("list", '"text" is a JSON array'), ("object", '"text" is a JSON object'),
                         ("flag", '"text" is a JSON boolean'), ("count", '"title" is a JSON number')]:
        assert isinstance(items[doc_id], SourceError) and kind in items[doc_id].error


def test_jsonl_metadata_that_cannot_be_kept_as_written_refuses_its_record_alone(tmp_path):
    """NaN/Infinity (Python's JSON reads them) failed the docstore's strict JSON, so the whole
    ingest stopped on one record; a metadata "doc_id" or a second "title" was overwritten."""
    path = tmp_path / "corpus.jsonl"
    lines = ['{"_id": "nan", "text": "Body.", "metadata": {"score": NaN}}',
             '{"_id": "inf", "text": "Body.", "metadata": {"scores": [1, -Infinity]}}',
             '{"_id": "mine", "text": "Body.", "metadata": {"doc_id": "my-id"}}',
             '{"_id": "titles", "title": "One", "text": "Body.", "metadata": {"title": "Two"}}',
             '{"_id": "same", "title": "One", "text": "Body.", "metadata": {"title": "One", "n": 1.5}}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = by_id(iter_jsonl(path))
    assert isinstance(items["same"], SourceDocument)
    assert items["same"].metadata == {"title": "One", "n": 1.5}
    for doc_id, said in [("nan", "'score' holds NaN"), ("inf", "'scores' holds NaN or an infinity"),
                         ("mine", "'doc_id' is reserved"), ("titles", 'differs from the record')]:
        assert isinstance(items[doc_id], SourceError) and said in items[doc_id].error, doc_id


def test_a_utf16_jsonl_file_is_refused_whole_and_none_of_its_records_deleted(tmp_path):
    """Read line by line as bytes, a UTF-16 file gave one "truncated data" or "NUL bytes" error
    per line, though README says UTF-16 with a BOM is read (it is, for a text file)."""
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(json.dumps({"_id": "d1", "text": "Body one."}).encode("utf-16") + "\n".encode("utf-16-le"))
    items = list(iter_jsonl(path, id_prefix="corpus.jsonl#"))
    assert len(items) == 1 and isinstance(items[0], SourceError)
    assert "must be UTF-8" in items[0].error and items[0].covers == "corpus.jsonl#"


def test_texts_through_the_api():
    items = list(iter_texts({"x": "Some text.", "y": "  "}))
    assert isinstance(items[0], SourceDocument) and items[0].doc_id == "x"
    assert isinstance(items[1], SourceError)
    assert [i.doc_id for i in iter_texts(["a", "b"])] == ["text-0", "text-1"]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_source(tmp_path / "nope")


def test_a_folder_nested_past_what_can_be_walked_is_a_clear_error(tmp_path, monkeypatch):
    # ~1,100 nested folders ended the ingest with a bare "maximum recursion depth exceeded"
    import pipelines.sources as sources

    def too_deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")
        yield  # a generator, as os.walk is

    monkeypatch.setattr(sources.os, "walk", too_deep)
    with pytest.raises(OSError, match="nests folders deeper than can be walked"):
        list(iter_folder(tmp_path))


# Trial of long and odd documents (stop 49): readers glued words across separators.
def test_separator_controls_are_read_as_breaks_not_deleted(tmp_path):
    """NEL and the file/group/record/unit separators were deleted with the other controls, so
    "zqxone\\x85zqxtwo" was one word neither half of which keyword search found."""
    from indexes.sparse import query_terms
    from indexes.text import count_controls, drop_controls

    assert drop_controls("one\x85two\x1cthree\x1dfour\x1efive\x1fsix\x00seven\x07") == "one\ntwo\nthree\nfour\nfive sixseven"
    assert count_controls("a\x85b\x1fc") == 2  # still controls to the binary check
    (tmp_path / "ctl.txt").write_text("First zqxnelone\x85zqxneltwo pair. Unit zqxusone\x1fzqxustwo.", encoding="utf-8")
    [doc] = [d for d in iter_source(tmp_path) if isinstance(d, SourceDocument)]
    assert {"zqxnelone", "zqxneltwo", "zqxusone", "zqxustwo"} <= set(query_terms(doc.text))


def test_html_blocks_beyond_paragraphs_keep_their_words_apart():
    """<details>/<summary>, <address>, <center>, <form>/<fieldset>/<legend>, <option> ran their
    texts together: a minified FAQ read "Shipping questionFreeshipping answerReturns..."."""
    text, _ = html_to_text("<html><body><details><summary>Shipping question</summary>Free shipping</details>"
                           "<details><summary>Returns</summary>Thirty days</details><address>Main Street</address>"
                           "<center>Welcome</center><form><fieldset><legend>Login</legend>Username</fieldset></form>"
                           "<select><option>Red</option><option>Blue</option></select></body></html>")
    assert text.split("\n") == ["Shipping question", "Free shipping", "Returns", "Thirty days", "Main Street",
                                "Welcome", "Login", "Username", "Red", "Blue"]


def test_the_first_valid_record_of_an_id_is_kept_and_a_refused_one_keeps_its_error(tmp_path):
    """An empty record before a valid one of the same _id took the _id: the valid one was
    dropped as its duplicate, under an error saying "the first one is kept", and the run's
    errors (one per id) showed only that one."""
    path = tmp_path / "x.jsonl"
    rows = [{"_id": "q", "text": ""}, {"_id": "q", "text": "Second q is valid."},
            {"_id": "q", "text": "Third q repeats it."}, {"_id": "z", "text": ""}, {"_id": "z", "title": 5}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    items = list(iter_jsonl(path))
    assert [(d.doc_id, d.text) for d in items if isinstance(d, SourceDocument)] == [("q", "Second q is valid.")]
    errors = errors_by_id(i for i in items if isinstance(i, SourceError))
    assert "x.jsonl:1: empty document" in errors["q"]
    assert "duplicate _id (again at x.jsonl:3); the record at x.jsonl:2 is kept" in errors["q"]
    assert "x.jsonl:4: empty document" in errors["z"] and '"title" is a JSON number' in errors["z"]


def test_a_duplicate_of_a_line_not_read_whole_says_the_indexed_version_is_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"_id": "q", "text": "cut\n' + json.dumps({"_id": "q", "text": "Later q."}) + "\n",
                    encoding="utf-8")
    errors = [i.error for i in iter_jsonl(path) if isinstance(i, SourceError)]
    assert "duplicate _id (again at x.jsonl:2); the line at x.jsonl:1 was refused, so its indexed version is kept" in errors


def test_spaces_around_an_id_are_dropped_and_make_one_document(tmp_path):
    """README says so: a hit's doc_id is the trimmed _id, and "w " repeats "w"."""
    path = tmp_path / "x.jsonl"
    path.write_text('{"_id": " w ", "text": "Spaced."}\n{"_id": "w", "text": "Plain."}\n', encoding="utf-8")
    items = list(iter_jsonl(path))
    assert [(i.doc_id, i.text) for i in items if isinstance(i, SourceDocument)] == [("w", "Spaced.")]
    assert [i.doc_id for i in items if isinstance(i, SourceError)] == ["w"]
