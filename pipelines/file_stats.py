"""Which files of a folder source a scheduled ingest need not read again.

Every run used to read, decode and parse every file of the folder to hash it: planning an
unchanged folder cost as much as its size (5,183 small text files: 0.6 s; a folder of PDFs is
parsed page by page). Like git's index for a working tree, each run records, per file, the
stat it had when it was read (size, mtime, ctime, inode) and the content hashes of the
documents it gave. A later run takes a file as unchanged without opening it when

* its stat is exactly the recorded one (ctime moves on any write or rename, and cannot be set
  back as mtime can; not so for a write through a shared memory map into a page already
  dirty, which Linux does not time-stamp, nor on filesystems without ctime or with cached
  attributes such as NFS: ``trust_file_stats = false`` there),
* it had not been touched for ``RACY_NS`` when it was recorded (a write in the same clock tick
  as the read could leave the stat unchanged: git's "racy" rule), and
* the index holds every one of its documents with exactly the recorded hash (a failed run, a
  rebuild or another writer invalidates the record by itself).

The record lives in the cache directory, keyed by the index, the source folder, the size limit
and the versions of this package and of the PDF reader; losing it only means the next run
reads everything. A file that gave an error is never recorded. ``trust_file_stats = false``
reads every file every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from htp_embed.packaged_models import default_cache_dir
from pipelines.sources import (
    READERS_REVISION,
    FileStat,
    KnownFiles,
    SourceError,
    SourceItem,
    SourceUnchanged,
)

log = logging.getLogger(__name__)

#: A file touched less than this before the run that read it is read again next time.
RACY_NS = 2_000_000_000
FORMAT = 1
#: A record no run has written for this long is removed when another is saved: its index was
#: moved or deleted, its size limit changed, or an upgrade renamed it (records are keyed by
#: all of these, so the folder only grew). Every run of a live index rewrites its own; one
#: idle for longer only reads its files once again.
STALE_AFTER_S = 90 * 24 * 3600


def _readers_version() -> str:
    """The readers' revision, this package's version and that of the PDF reader: any may read a
    file otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    found = [f"readers {READERS_REVISION}"]
    for name in ("htp-index", "pypdf"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} unknown")
    return ", ".join(found)


@dataclass
class FileRecords:
    """The files a run read (or took as unchanged), to record once its documents are indexed:
    plain data that crosses task boundaries with the plan."""

    path: str  # the record file in the cache directory
    started_ns: int  # wall clock when the run began to look at the folder
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file id -> entry
    broken: set[str] = field(default_factory=set)  # file ids an error was reported under

    def observe(self, items: Iterable[SourceItem], previous: Mapping[str, dict[str, Any]]) -> Iterator[SourceItem]:
        """``items`` as they are, noting each document's file, stat and hash on the way."""
        for item in items:
            if isinstance(item, SourceError):
                # the file it came from, whatever '#' its path holds: every prefix before a '#'
                # (splitting at the first '#' named "C" for "C#/notes.jsonl#3", and that file was
                # then recorded without its failing record, which the next run deleted)
                self.broken.add(item.doc_id)
                self.broken.update(item.doc_id[:at] for at, char in enumerate(item.doc_id) if char == "#")
                if item.covers:
                    self.broken.add(item.covers.rstrip("#/"))
            elif item.file is not None:
                file_id, stat = item.file
                seen = (previous[file_id]["seen_ns"] if isinstance(item, SourceUnchanged) and file_id in previous
                        else self.started_ns)
                entry = self.files.setdefault(file_id, {"stat": list(stat), "seen_ns": seen, "docs": {}})
                entry["docs"][item.doc_id] = item.content_hash
            yield item

    def save(self, indexed: Mapping[str, str]) -> int:
        """Record the files whose documents the index now holds with the hashes read; returns
        how many. Files not seen this run are forgotten (gone from the folder)."""
        kept = {
            file_id: entry for file_id, entry in self.files.items()
            if file_id not in self.broken and entry["docs"]
            and all(indexed.get(doc_id) == content_hash for doc_id, content_hash in entry["docs"].items())
        }
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "files": kept}))
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache: every file is read next time
            log.debug("cannot record file stats in %s: %s", path, exc)
        _remove_stale(path.parent, time.time())
        return len(kept)


def _remove_stale(folder: Path, now: float) -> None:
    """Remove the records (and temporary files of crashed saves) in ``folder`` that no run has
    written for `STALE_AFTER_S` (best effort: the cache is a cache)."""
    for pattern in ("*.json", ".*.tmp"):
        for record in folder.glob(pattern):
            with suppress(OSError):
                if now - record.stat().st_mtime > STALE_AFTER_S:
                    record.unlink()


class FileStatsCache:
    """The recorded files of one index and folder source (see the module docstring)."""

    def __init__(self, path: Path, entries: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.entries = entries
        self.records = FileRecords(str(path), time.time_ns())

    @classmethod
    def for_source(cls, index_dir: Path, source: Path, max_bytes: int, cache_dir: Path | None = None) -> FileStatsCache:
        """The record of ``index_dir`` and the folder ``source`` (empty when there is none yet,
        or it cannot be read)."""
        identity = "\n".join((str(Path(index_dir).resolve()), str(Path(source).expanduser().resolve()),
                              str(max_bytes), _readers_version(), str(FORMAT)))
        name = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        path = Path(cache_dir or default_cache_dir()) / "file-stats" / f"{name}.json"
        try:
            data = json.loads(path.read_text())
            entries = data["files"] if data.get("format") == FORMAT and isinstance(data.get("files"), dict) else {}
        except (OSError, ValueError, AttributeError):
            entries = {}
        return cls(path, entries)

    def known(self, indexed: Mapping[str, str]) -> KnownFiles:
        """The :data:`KnownFiles` callback for a run against an index holding ``indexed``."""

        def vouch(file_id: str, stat: FileStat) -> Mapping[str, str] | None:
            entry = self.entries.get(file_id)
            if not isinstance(entry, dict) or tuple(entry.get("stat", ())) != tuple(stat):
                return None
            if max(stat[1], stat[2]) >= int(entry.get("seen_ns", 0)) - RACY_NS:
                return None  # touched too close to the read that recorded it
            docs = entry.get("docs")
            if not isinstance(docs, dict) or not docs or any(indexed.get(d) != h for d, h in docs.items()):
                return None
            return docs

        return vouch

    def observe(self, items: Iterable[SourceItem]) -> Iterator[SourceItem]:
        """``items``, noted in :attr:`records` on the way."""
        return self.records.observe(items, self.entries)

