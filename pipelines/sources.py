"""Where documents come from: a folder, a BEIR-style JSONL file, or texts passed in.

Every document gets a stable id (its path relative to the source root, or its ``_id``) and a
content hash, so the index can be diffed against the source. A document that cannot be read
becomes a :class:`SourceError` with a message saying what is wrong; it never stops the run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from itertools import groupby
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISFIFO, S_ISLNK, S_ISREG, S_ISSOCK
from typing import Any

from indexes.text import count_controls, drop_controls, has_visible_text, lone_surrogate_at
from pipelines.errors import DocumentRejected, OptionConflictError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES | {".jsonl"}
DEFAULT_MAX_BYTES = 20 * 2**20


#: A file as the disk describes it: size, mtime_ns, ctime_ns, inode. A file whose stat is what
#: the last run recorded may be taken as unchanged without reading it (`pipelines.file_stats`).
FileStat = tuple[int, int, int, int]
#: ``(file id, stat) -> {doc id: content hash}`` of the file's documents where they may be taken
#: as indexed without reading the file, else None (read it).
KnownFiles = Callable[[str, FileStat], Mapping[str, str] | None]


def file_stat(found: os.stat_result) -> FileStat:
    """The :data:`FileStat` of a stat result."""
    return (found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino)


@dataclass(frozen=True)
class SourceDocument:
    """One document read from a source, ready to diff and split."""

    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the folder's file it was read from (its id) and that file's stat before it was read
    file: tuple[str, FileStat] | None = field(default=None, compare=False)

    @property
    def content_hash(self) -> str:
        """sha256 over the text and metadata: either changing re-embeds the document."""
        payload = json.dumps([self.text, self.metadata], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SourceError:
    """A document that could not be read, and why.

    ``covers``: a prefix of document ids the error stands for, when the documents behind it
    cannot be told apart (a folder that could not be listed, a JSONL line whose ``_id`` could
    not be read); every indexed document whose id starts with it keeps its version ("" covers
    the whole source)."""

    doc_id: str
    error: str
    covers: str | None = None


@dataclass(frozen=True)
class SourceUnchanged:
    """A document of a file whose stat is the one recorded when the file was last read and
    indexed: taken as indexed with ``content_hash``, the file not read (an unchanged folder of
    PDFs was parsed whole on every scheduled run)."""

    doc_id: str
    content_hash: str
    file: tuple[str, FileStat]


SourceItem = SourceDocument | SourceError | SourceUnchanged


def decode_text(data: bytes) -> str:
    """Decode UTF-8 (with or without BOM) or BOM-marked UTF-16; refuse binary and other encodings.

    Guessing an 8-bit encoding would silently index mojibake, so anything else is rejected with
    a message that says how to fix it.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise DocumentRejected(f"invalid UTF-16 text: {exc}") from exc
    if b"\x00" in data[:8192]:
        raise DocumentRejected("binary content (NUL bytes); not a text document")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentRejected(
            f"not valid UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from exc


class _TextExtractor(HTMLParser):
    """Visible text of an HTML page (script and style dropped, block tags become newlines)."""

    _SKIP = {"script", "style", "noscript", "template"}
    _BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "section", "article",
              "td", "th", "dt", "dd", "blockquote", "pre", "table", "ul", "ol", "dl", "header", "footer",
              "nav", "aside", "main", "figure", "figcaption", "caption", "hr",
              # shown as blocks too (HTML's rendering section); without them a minified FAQ of
              # <details><summary> read "Shipping questionFreeshipping answerReturns..."
              "details", "summary", "address", "center", "form", "fieldset", "legend", "option",
              "optgroup", "dialog", "menu", "search", "hgroup", "tbody", "thead", "tfoot"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[str, bool]] = []  # (text, inside <pre>: its spacing is kept)
        self.title = ""
        self._skipping = 0
        self._preformatted = 0
        self._in_title = False
        self._titled = False  # the page's first <title> only (an <svg>'s has its own)

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag == "title" and not self._titled:
            self._in_title = True
        elif tag in self._BLOCK:
            self.parts.append(("\n", False))
            if tag == "pre":
                self._preformatted += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag == "title" and self._in_title:
            self._in_title = False
            self._titled = True
        elif tag in self._BLOCK:
            if tag == "pre" and self._preformatted:
                self._preformatted -= 1
            self.parts.append(("\n", False))

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skipping:
            self.parts.append((data, self._preformatted > 0))


def html_to_text(html: str) -> tuple[str, str]:
    """(visible text, title) of an HTML document. Runs of spaces and blank lines are collapsed,
    as a browser shows them, but inside ``<pre>`` (code) the lines and their indentation are
    kept, as a browser keeps them."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines: list[str] = []
    for preformatted, run in groupby(parser.parts, key=lambda part: part[1]):
        text = "".join(chunk for chunk, _ in run)
        lines.extend(_pre_lines(text) if preformatted else _flowed_lines(text))
    return "\n".join(lines), parser.title.strip()


def _flowed_lines(text: str) -> list[str]:
    return [line for line in (" ".join(line.split()) for line in text.splitlines()) if line]


def _pre_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


#: Bump when a reader gives other text for the same bytes: unchanged files are otherwise taken
#: from the last run's record without being read (`pipelines.file_stats`), and kept the old
#: reader's text (2: soft hyphens dropped, PDF ligatures spelled out, <pre> kept; 3: separator
#: controls read as line breaks, <details>/<summary>/<option> and other HTML blocks as blocks;
#: 4: a linked file read by its link's suffix and named by it in file_name and file_type).
READERS_REVISION = 4

# Typeset PDFs (LaTeX above all) draw "fi", "ffi", "st" as one ligature glyph, which pypdf
# extracts as U+FB00-FB06: the model and the reader see "ﬁnancial", not "financial".
_LIGATURES = {cp: unicodedata.normalize("NFKC", chr(cp)) for cp in range(0xFB00, 0xFB07)}


def pdf_to_text(path: Path) -> str:
    """Text of a PDF's pages, through pypdf, its Latin ligatures spelled out."""
    try:
        from pypdf import PdfReader
    except ImportError as exc:  # pragma: no cover - pypdf is a dependency
        raise DocumentRejected("PDF support needs pypdf: pip install pypdf") from exc
    try:
        reader = PdfReader(str(path))
        return "\n\n".join((page.extract_text() or "") for page in reader.pages).translate(_LIGATURES)
    except Exception as exc:  # pypdf raises many types for broken files
        raise DocumentRejected(f"unreadable PDF: {exc}") from exc


def clean_text(text: str) -> str:
    """``text`` without control characters (tabs and line breaks kept) and soft hyphens, or a
    rejection. A soft hyphen (HTML's ``&shy;``) is a line-breaking hint, invisible in the text,
    but it cut "docu\u00admentation" in two for the model and the keyword index alike.

    Controls carry no meaning for retrieval and break tokenizers' and terminals' output; a
    text that is mostly controls is a binary file that escaped the NUL check. Zero-width
    characters are kept (ZWJ/ZWNJ matter in emoji and Indic scripts), but a text made only of
    invisible characters counts as empty.
    """
    sample = text[:8192]
    controls = count_controls(sample)
    if controls > 0.1 * len(sample):
        raise DocumentRejected(f"binary content ({controls} control characters in the first {len(sample)}); "
                               "not a text document")
    return drop_controls(text)


def require_text(text: str) -> str:
    """``text`` as ingest indexes it (`clean_text`), or `DocumentRejected`: empty, invisible
    only, binary, or holding a lone surrogate."""
    text = clean_text(text)
    if not has_visible_text(text):
        raise DocumentRejected("empty document (no visible text after reading)")
    require_encodable(text, "text")
    return text


def require_encodable(value: str, what: str) -> None:
    """Refuse a string holding a lone surrogate (half of a UTF-16 pair: JSON text cut inside an
    emoji by JavaScript, or a file name that is not UTF-8): no UTF-8 file, hash or database
    can hold it, and it used to stop the whole run."""
    at = lone_surrogate_at(value)
    if at is not None:
        raise DocumentRejected(
            f"{what} holds {value[at]!r} at character {at}, half of a UTF-16 surrogate pair (text "
            "cut inside an emoji, or a name that is not UTF-8); repair it"
        )


def printable_id(doc_id: str) -> str:
    """``doc_id`` as UTF-8 can hold it (a name that is not UTF-8 shows its bytes as U+FFFD)."""
    return doc_id.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def require_regular_file(found: os.stat_result) -> None:
    """Refuse what is not a regular file before it is opened: opening a named pipe waits for a
    writer that may never come (a scheduled ingest held its lock for good), and a device or
    socket is no document."""
    if S_ISREG(found.st_mode):
        return
    kinds = ((S_ISFIFO, "a named pipe"), (S_ISSOCK, "a socket"), (S_ISCHR, "a character device"),
             (S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(found.st_mode)), "not a regular file")
    raise DocumentRejected(f"{kind}, not a regular file: not read")


def read_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES, *, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """Text and metadata of one file, by its suffix. ``name``: the name the document is known
    by where ``path`` is what it resolves to (a link's own name): its suffix picks the reader
    and it gives ``file_name`` and ``file_type``, as the link's path gives the id and the
    support check (a link ``note.txt`` to ``real.html`` was parsed as HTML and stored as
    ``real.html``, type ``html``)."""
    found = path.stat()
    require_regular_file(found)
    size = found.st_size
    if size > max_bytes:
        raise DocumentRejected(
            f"file is {size:,} bytes, over the {max_bytes / 2**20:.3g} MiB limit ({max_bytes:,} bytes; "
            "raise max_document_mb to index it)"
        )
    named = Path(name) if name is not None else path
    suffix = named.suffix.lower()
    metadata: dict[str, Any] = {"file_name": named.name, "file_type": suffix.lstrip(".")}
    if suffix in PDF_SUFFIXES:
        return require_text(pdf_to_text(path)), metadata
    text = decode_text(path.read_bytes())
    if suffix in HTML_SUFFIXES:
        text, title = html_to_text(text)
        if title:
            # Searchable, as a JSONL record's title is: metadata reaches neither side.
            metadata["title"] = title
            text = f"{title}\n\n{text}" if text.strip() else title
    return require_text(text), metadata


def iter_folder(root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, known: KnownFiles | None = None,
                exclude: Sequence[str] = ()) -> Iterator[SourceItem]:
    """Every supported file below ``root`` (recursively, sorted), as documents or errors.

    Symbolic links to directories are not followed (no loops) and are reported; links to
    files are read only when they resolve inside ``root``. Unsupported suffixes are reported,
    not silently skipped, unless they are hidden files. A folder that cannot be listed is
    reported and its indexed documents are kept (``covers``); a folder holding an htp-index
    index (e.g. ``--index`` inside the source) is not read.

    Ids are unique across the folder: a JSONL record's id is ``<file>#<_id>``, which a file
    named so (``c.jsonl#x.txt``) also has. The first document read keeps the id and the
    other is reported; before, the index silently held one of them while the run counted
    both as added, and every later run re-embedded the loser as "updated".

    ``known``: files it vouches for unchanged are not read; their documents come as
    :class:`SourceUnchanged`.
    """
    read: dict[str, str] = {}
    for item in _folder_items(root.resolve(), max_bytes, known, tuple(exclude)):
        if isinstance(item, SourceDocument | SourceUnchanged):
            origin = "a file" if item.file is not None and item.file[0] == item.doc_id else "a JSONL record"
            if item.doc_id in read:
                yield SourceError(item.doc_id, f"{origin} has the id of {read[item.doc_id]} read before "
                                  "(a file's path and a JSONL record's <file>#<_id> can coincide); the "
                                  "first one is kept: rename the file or change the record's _id")
                continue
            read[item.doc_id] = origin
        yield item


def excluded(relative: str, is_folder: bool, patterns: Sequence[str]) -> bool:
    """Whether the path ``relative`` (to the source root, with '/') matches one of the settings'
    ``exclude`` patterns, read as .gitignore reads them (without its negations)."""
    name = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        folders_only, anchored = pattern.endswith("/"), "/" in pattern.rstrip("/")
        if folders_only and not is_folder:
            continue
        if fnmatch.fnmatchcase(relative if anchored else name, pattern.strip("/")):
            return True
    return False


def _folder_items(root: Path, max_bytes: int, known: KnownFiles | None,
                  exclude: tuple[str, ...] = ()) -> Iterator[SourceItem]:
    """:func:`iter_folder`'s items before ids are made unique."""
    try:
        yield from _walk_items(root, max_bytes, known, exclude)
    except RecursionError:  # Python 3.11's os.walk recurses: ~1,000 nested folders end it
        raise OSError(f"{root} nests folders deeper than can be walked (about 1,000 levels); leave the "
                      "deepest out with the exclude setting") from None


def _walk_items(root: Path, max_bytes: int, known: KnownFiles | None,
                exclude: tuple[str, ...]) -> Iterator[SourceItem]:
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append, followlinks=False):
        yield from _unlisted_folders(root, unlisted)
        here = Path(dirpath)
        kept_dirs = []
        for name in sorted(dirnames):
            if name.startswith(".") or excluded((here / name).relative_to(root).as_posix(), True, exclude):
                continue
            if _is_index(here / name):
                log.info("%s holds an htp-index index: left out of the source", here / name)
                continue
            if (here / name).is_symlink():
                yield _folder_link_error(root, here / name)
                continue
            kept_dirs.append(name)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            doc_id = path.relative_to(root).as_posix()
            if excluded(doc_id, False, exclude):
                continue
            try:
                require_encodable(doc_id, "the file's path")
            except DocumentRejected as exc:
                yield SourceError(printable_id(doc_id), str(exc))
                continue
            suffix = path.suffix.lower()
            if suffix not in SUPPORTED_SUFFIXES:
                yield SourceError(doc_id, _unsupported(suffix))
                continue
            try:
                # One lstat for a plain file: its folders were walked without following links
                # from the resolved root, so it is where it says (resolving every path cost a
                # syscall per folder level, most of what planning an unchanged folder costs).
                found = os.lstat(path)
                if S_ISLNK(found.st_mode):
                    try:
                        resolved = path.resolve(strict=True)
                    except RuntimeError as exc:  # pathlib reports a symlink loop this way
                        raise DocumentRejected(f"symbolic link loop ({exc})") from exc
                    if not resolved.is_relative_to(root):
                        raise DocumentRejected(f"links outside the source root (to {printable_id(str(resolved))})")
                    found = resolved.stat()  # of the target, as reading follows the link
                else:
                    resolved = path
                require_regular_file(found)
                stat = file_stat(found)
                vouched = known(doc_id, stat) if known is not None else None
                if vouched is not None:
                    for known_id, content_hash in vouched.items():
                        yield SourceUnchanged(known_id, content_hash, (doc_id, stat))
                    continue
                if suffix == ".jsonl":  # a collection: its records are the documents
                    yield from iter_jsonl(resolved, id_prefix=doc_id + "#", max_bytes=max_bytes, file=(doc_id, stat))
                    continue
                text, metadata = read_file(resolved, max_bytes, name=name)
            except (DocumentRejected, OSError) as exc:
                yield SourceError(doc_id, str(exc), covers=doc_id + "#" if suffix == ".jsonl" else None)
                continue
            yield SourceDocument(doc_id, text, {**metadata, "source_path": doc_id}, file=(doc_id, stat))
    yield from _unlisted_folders(root, unlisted)


def _unlisted_folders(root: Path, errors: list[OSError]) -> Iterator[SourceError]:
    """One error per folder ``os.walk`` could not list, covering the documents under it (it
    skips such a folder without a word, and the plan then deleted its documents as gone)."""
    while errors:
        exc = errors.pop(0)
        folder = Path(exc.filename) if exc.filename else root
        relative = folder.relative_to(root).as_posix() if folder != root else ""
        yield SourceError(
            printable_id(relative or "."),
            f"could not list this folder ({exc.strerror or exc}); the indexed documents under it are kept",
            covers=f"{relative}/" if relative else "",
        )


def _folder_link_error(root: Path, link: Path) -> SourceError:
    relative = link.relative_to(root).as_posix()
    return SourceError(
        printable_id(relative),
        f"a link to a folder (to {printable_id(os.readlink(link))}) is not followed: its documents are not read; "
        "copy it here, or ingest the folder it points to into an index of its own (into this one, "
        "it would replace this source: documents missing from a source are deleted)",
        covers=f"{relative}/",
    )


def _is_index(folder: Path) -> bool:
    """Whether ``folder`` holds an htp-index index: a ``CURRENT`` pointer naming a version
    folder that exists. A file named CURRENT beside a ``versions`` folder (an API's docs) was
    enough, and the folder's documents left the index without a word; a folder that cannot be
    searched raised PermissionError there and stopped the whole ingest."""
    from indexes import persist
    from indexes.errors import IndexCorruptedError

    try:
        version = persist.current_version(folder) if (folder / persist.CURRENT_FILE).is_file() else None
        return version is not None and persist.version_dir(folder, version).is_dir()
    except (OSError, IndexCorruptedError):
        return False


def _record_field(record: dict[str, Any], key: str) -> str:
    """A record's ``title`` or ``text``: a string (or absent / null). A list or an object was
    indexed as its Python repr ("['First', 'Second']"), a number or a boolean as "5" or "True"."""
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DocumentRejected(f'"{key}" is a JSON {_json_kind(value)}, not a string')
    return value.strip()


def _json_kind(value: Any) -> str:
    return ("boolean" if isinstance(value, bool) else "number" if isinstance(value, int | float)
            else "array" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__)


def iter_jsonl(path: Path, *, id_prefix: str = "", max_bytes: int = DEFAULT_MAX_BYTES,
               file: tuple[str, FileStat] | None = None) -> Iterator[SourceItem]:
    """BEIR-style records ``{"_id", "title", "text", ...}``; one bad line is one error.

    A line is read up to ``max_bytes``: a longer one is never held whole. Its record is refused
    under its ``_id`` when that lies within the part read (:func:`record_id_in_prefix`), so the
    version indexed before is kept, as for any other document that fails."""
    try:
        yield from _jsonl_records(path, id_prefix, max_bytes, file)
    except OSError as exc:  # cannot be opened (a dangling link, permissions) or read (a share)
        yield SourceError(id_prefix.removesuffix("#") or path.name, f"could not read this file ({exc}); "
                          "none of its indexed records is deleted", covers=id_prefix)


def _jsonl_records(path: Path, id_prefix: str, max_bytes: int, file: tuple[str, FileStat] | None) -> Iterator[SourceItem]:
    # The first valid record of an _id is its document, as eval's corpus reader takes it; a
    # record refused for its content does not claim the _id (the valid one after it was
    # dropped as its "duplicate", and the error named the refused one "kept"), while a line
    # not read whole (over the limit, not parsed) does: what it holds cannot be judged.
    seen: set[str] = set()  # ids claimed: by a document, or by a line not read whole
    claimed_at: dict[str, str] = {}  # id -> where the line that claimed it is
    kept: set[str] = set()  # ids given as a document
    lines = 0
    with path.open("rb") as handle:
        if handle.read(2) in (b"\xff\xfe", b"\xfe\xff"):  # read by lines of bytes, UTF-16 is cut apart
            yield SourceError(id_prefix.removesuffix("#") or path.name, "a JSONL file must be UTF-8 (JSON Lines "
                              "is), this one is UTF-16; convert it, e.g. iconv -f utf-16 -t utf-8; none of "
                              "its indexed records is deleted", covers=id_prefix)
            return
        handle.seek(0)
        for number, raw in enumerate(iter(lambda: handle.readline(max_bytes + 1), b""), start=1):
            where = f"{path.name}:{number}"
            if not raw.strip():
                continue
            lines += 1
            if len(raw) > max_bytes:
                _skip_rest_of_line(handle, raw)
                limit = f"line {number} is over the {max_bytes / 2**20:.3g} MiB limit ({max_bytes:,} bytes)"
                doc_id = record_id_in_prefix(raw)
                if doc_id is None or id_prefix + doc_id in seen:
                    yield SourceError(id_prefix + where, f"{limit}; no record of {path.name} is deleted until "
                                      "it is shortened", covers=id_prefix)
                else:
                    seen.add(id_prefix + doc_id)
                    claimed_at[id_prefix + doc_id] = where
                    yield SourceError(id_prefix + doc_id, f"{limit}; its indexed version is kept")
                continue
            try:
                record = json.loads(decode_text(raw))
            except (DocumentRejected, json.JSONDecodeError) as exc:
                # A line cut short (the file rewritten while it was read) or damaged: filed under
                # its _id when the start of the line still gives it, else under its line number,
                # and covering every record of this file either way, so no indexed record is
                # deleted as gone: a file caught mid-rewrite ends at the cut, and the records
                # after it were deleted when the cut line still gave its _id.
                recovered = record_id_in_prefix(raw)
                if recovered is not None and id_prefix + recovered not in seen:
                    seen.add(id_prefix + recovered)
                    claimed_at[id_prefix + recovered] = where
                    yield SourceError(id_prefix + recovered, f"malformed record at {where}: {exc}; its indexed "
                                      f"version is kept, and no record of {path.name} is deleted until this "
                                      "line is fixed", covers=id_prefix)
                else:
                    yield SourceError(id_prefix + where, f"malformed record: {exc}; no record of "
                                      f"{path.name} is deleted until this line is fixed", covers=id_prefix)
                continue
            try:
                if not isinstance(record, dict):
                    raise DocumentRejected("a JSONL line must be an object")
                doc_id = _record_id(record)
            except DocumentRejected as exc:
                yield SourceError(id_prefix + where, f"malformed record: {exc}")
                continue
            full_id = id_prefix + doc_id
            if full_id in seen:
                first = claimed_at[full_id]
                kept_one = (f"the record at {first} is kept" if full_id in kept else
                            f"the line at {first} was refused, so its indexed version is kept")
                yield SourceError(full_id, f"duplicate _id (again at {where}); {kept_one}")
                continue
            # From here on a failure is the record's, under its own id: the plan then keeps
            # the version indexed before instead of deleting it as gone from the source (unless
            # a valid record of that _id follows).
            try:
                title, body = _record_field(record, "title"), _record_field(record, "text")
                text = require_text(f"{title}\n\n{body}" if title and body else title or body)
                metadata = _record_metadata(record.get("metadata"), title)
            except DocumentRejected as exc:
                yield SourceError(full_id, f"malformed record at {where}: {exc}")
                continue
            seen.add(full_id)
            claimed_at[full_id] = where
            kept.add(full_id)
            yield SourceDocument(full_id, text, metadata, file=file)
    if not lines and id_prefix:
        # An emptied file in a folder (truncated before a rewrite) gave no item at all, and
        # ingest deleted every record it had held without a word; an empty .txt beside it was
        # reported and kept. (An emptied .jsonl source of its own is refused as empty.)
        yield SourceError(id_prefix.removesuffix("#"), "empty JSONL file (no record in it): its indexed "
                          "records are kept until it holds records again or is removed", covers=id_prefix)


def errors_by_id(errors: Iterable[SourceError]) -> dict[str, str]:
    """The errors' messages by document id, those of one id joined: a dict built over them kept
    the last only (two refused records of one _id showed one error)."""
    joined: dict[str, str] = {}
    for error in errors:
        joined[error.doc_id] = f"{joined[error.doc_id]} | {error.error}" if error.doc_id in joined else error.error
    return joined


def _record_id(record: dict[str, Any]) -> str:
    """A record's ``_id`` (else ``id``): text or a whole number; null, empty or other types are
    refused (a null id used to become the document "None")."""
    value = record.get("_id")
    if value is None or (isinstance(value, str) and not value.strip()):
        value = record.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DocumentRejected('record has no "_id" (text or a whole number)')
    doc_id = str(value).strip()
    if not doc_id:
        raise DocumentRejected('record has no "_id" (text or a whole number)')
    require_encodable(doc_id, "the _id")
    return doc_id


#: Metadata keys htp-index sets on every node (`chunking.to_llama_document`): a record's own
#: value under one would be overwritten without a word, and a filter on it find nothing.
RESERVED_METADATA_KEYS = ("doc_id",)


def _record_metadata(metadata: Any, title: str) -> dict[str, Any]:
    """The record's metadata that filters can read, with its title: scalars and lists of
    scalars (tags); an object inside is kept as its JSON text rather than dropped without a
    word. Refused (the record alone): a reserved key, a ``title`` other than the record's own,
    NaN or an infinity (no JSON, so the docstore failed the whole ingest on one record), text
    that cannot be stored."""
    kept: dict[str, Any] = {}
    for key, value in (metadata.items() if isinstance(metadata, dict) else ()):
        if key in RESERVED_METADATA_KEYS:
            raise DocumentRejected(f"metadata key {key!r} is reserved: htp-index sets it to the "
                                   "document's id on every node; rename it")
        if _scalar(value) or (isinstance(value, list) and all(_scalar(item) for item in value)):
            kept[str(key)] = value
        else:
            kept[str(key)] = json.dumps(value, ensure_ascii=False, sort_keys=True)
    if title:
        if kept.get("title", title) != title:
            raise DocumentRejected("metadata \"title\" differs from the record's \"title\", which "
                                   "would replace it; give the title once")
        kept["title"] = title
    try:
        stored = json.dumps(kept, ensure_ascii=False, allow_nan=False)
    except ValueError:
        bad = next(key for key, value in kept.items() if not _finite(value))
        raise DocumentRejected(f"metadata {bad!r} holds NaN or an infinity, which JSON cannot "
                               "store; write null or a number") from None
    require_encodable(stored, "the metadata")
    return kept


def _finite(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return not any(isinstance(v, float) and not math.isfinite(v) for v in values)


def _skip_rest_of_line(handle: Any, read: bytes) -> None:
    """Read past the end of a line of which ``read`` was the start, a chunk at a time."""
    while not read.endswith(b"\n"):
        read = handle.readline(2**20)
        if not read:
            return


def record_id_in_prefix(prefix: bytes) -> str | None:
    """The id a JSON object starting ``prefix`` (a line cut short, or not parsed) is indexed
    under, as :func:`_record_id` would give it, read from its top-level members one by one (a
    key ``_id`` inside a value is never taken); None when that cannot be known: no ``_id``
    before the cut (an ``id`` counts only when the whole object was read, as a later ``_id``
    would win), an ``_id`` given twice, or an empty one before the cut."""
    text = prefix.decode("utf-8-sig", errors="ignore")
    decoder = json.JSONDecoder()
    found: dict[str, list[Any]] = {"_id": [], "id": []}
    whole = False
    at = _skip_space(text, 0)
    if text[at : at + 1] != "{":
        return None
    at += 1
    while True:
        at = _skip_space(text, at)
        if text[at : at + 1] == "}" and not found["_id"] and not found["id"]:
            whole = True
            break
        if text[at : at + 1] != '"':
            break
        try:
            key, at = json.decoder.scanstring(text, at + 1)
        except json.JSONDecodeError:
            break
        if key in found:
            found[key].append(None)  # seen, whether or not its value lies within the prefix
        try:
            at = _skip_space(text, at)
            if text[at : at + 1] != ":":
                break
            value, at = decoder.raw_decode(text, _skip_space(text, at + 1))
        except json.JSONDecodeError:  # the member the line was cut in (or a malformed one)
            break
        if key in found:
            found[key][-1] = value
        at = _skip_space(text, at)
        if text[at : at + 1] == "}":
            whole = True
            break
        if text[at : at + 1] != ",":
            break
        at += 1
    if not whole and (len(found["_id"]) > 1 or len(found["id"]) > 1):
        return None  # json keeps the last of a repeated key, which may lie past the cut
    record = {key: values[-1] for key, values in found.items() if values}
    usable_id = _usable(record.get("_id"))
    if usable_id is not None:
        return usable_id
    if not whole:
        return None  # an _id may still follow
    return _usable(record.get("id"))


def _usable(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text or None


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def iter_texts(texts: Iterable[str] | Mapping[str, str]) -> Iterator[SourceItem]:
    """Texts passed through the API: a mapping id -> text, or a list (ids 'text-0', …)."""
    items = texts.items() if isinstance(texts, Mapping) else ((f"text-{i}", t) for i, t in enumerate(texts))
    for doc_id, text in items:
        if not isinstance(text, str):
            yield SourceError(str(doc_id), f"not a text but a {type(text).__name__}")
            continue
        try:
            yield SourceDocument(str(doc_id), require_text(text))
        except DocumentRejected as exc:
            yield SourceError(str(doc_id), str(exc))


def source_kind(source: Any) -> str:
    """``folder``, ``jsonl``, ``file`` (one document), ``texts``, or ``missing``: the one
    decision both reading a source and planning its deletions use."""
    if not isinstance(source, str | Path):
        return "texts"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "jsonl" if path.suffix.lower() == ".jsonl" else "file"
    return "missing"


def iter_source(source: str | Path | Iterable[str] | Mapping[str, str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                known: KnownFiles | None = None, exclude: Sequence[str] = ()) -> Iterator[SourceItem]:
    """Dispatch on the kind of source: folder, .jsonl file, single file, or texts. ``known``
    and ``exclude`` (a folder's files only): see :func:`iter_folder`."""
    kind = source_kind(source)
    if kind == "texts":
        return iter_texts(source)  # type: ignore[arg-type]
    path = Path(source).expanduser()  # type: ignore[arg-type]
    if kind == "folder":
        return iter_folder(path, max_bytes=max_bytes, known=known, exclude=exclude)
    if kind == "jsonl":
        return iter_jsonl(path, max_bytes=max_bytes)
    if kind == "file":
        return iter_folder_single(path, max_bytes=max_bytes)
    raise _not_readable(path)


def require_source(source: Any) -> None:
    """Raise what reading ``source`` would for a path that is not there, or a single file of a
    type no folder's ingest reads (bad usage), before an ingest creates the index folder: a
    mistyped source left a new, empty index folder with its lock, and a refused file an empty
    index bound to the encoder that happened to be asked."""
    kind = source_kind(source)
    if kind == "missing":
        raise _not_readable(Path(source).expanduser())
    if kind == "file" and Path(source).suffix.lower() not in SUPPORTED_SUFFIXES:
        raise OptionConflictError(f"source {source}: {_unsupported(Path(source).suffix.lower())}")


def _not_readable(path: Path) -> FileNotFoundError:
    if path.exists():  # a named pipe, socket or device: reading it could wait for good
        return FileNotFoundError(f"source {path} is neither a folder nor a regular file")
    return FileNotFoundError(f"source {path} does not exist (expected a folder or a .jsonl file)")


def _unsupported(suffix: str) -> str:
    return f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}"


def iter_folder_single(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[SourceItem]:
    """A single file as a source: its id is its file name. Its type is checked as a folder's
    files are (a .csv or .docx named alone was read as plain text)."""
    try:
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DocumentRejected(_unsupported(path.suffix.lower()))
        text, metadata = read_file(path, max_bytes)
        yield SourceDocument(path.name, text, {**metadata, "source_path": path.name})
    except (DocumentRejected, OSError) as exc:
        yield SourceError(path.name, str(exc))


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def single_document(source: Any) -> bool:
    """Whether ``source`` names one document file (not a folder, not a JSONL collection):
    ingesting it adds or updates that document and deletes none of the index's others."""
    return source_kind(source) == "file"


def source_label(source: Any) -> str:
    """A short description of a source for logs and run statistics."""
    if isinstance(source, str | Path):
        return str(Path(source).expanduser().resolve())
    return f"{len(source)} texts" if hasattr(source, "__len__") else "texts"
