"""The document-hash map (``ref_doc_id -> content hash``) as a log of small immutable files.

Ingest diffs a source against this map, so it must survive every commit, but rewriting the
whole map at each commit would cost as much as the index. Instead a commit that changes it
writes one *delta* (hashes set, documents forgotten) under ``docs/``, and the manifest lists
the files to replay in order: a *base* (the whole map) and the deltas after it. Once the
deltas are many, a commit writes a new base instead (amortised like an LSM tree), so opening
an index never replays more than `MAX_DELTAS` files. The map is read only when asked for:
queries never touch it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from .durable import fsync_path
from .errors import IndexCorruptedError
from .spec import NamedFile

DOCS_DIR = "docs"
MAX_DELTAS = 16


def replay(root: Path, files: list[NamedFile]) -> dict[str, str]:
    """The map the log ``files`` describe. Each file is checked against its record first: a
    new base is written from this map, and damage copied into it would pass `verify`."""
    from .persist import check_file  # persist imports this module

    docs: dict[str, str] = {}
    for record in files:
        path = Path(root) / record.path
        check_file(path, record)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise IndexCorruptedError.for_file(path, "the file is missing") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexCorruptedError.unreadable(path, f"it is not valid JSON ({exc})", exc) from exc
        if entry.get("base"):
            docs = {}
        docs.update(entry.get("set", {}))
        for doc_id in entry.get("delete", []):
            docs.pop(doc_id, None)
    return docs


def write_entry(
    root: Path, version: int, *, base: bool, set_: dict[str, str], delete: list[str]
) -> NamedFile:
    """Write one log file durably (temporary name, fsync, rename) and describe it."""
    from .persist import file_record  # persist imports this module

    folder = Path(root) / DOCS_DIR
    folder.mkdir(exist_ok=True)
    kind = "base" if base else "delta"
    final = folder / f"v{version:06d}-{kind}-{secrets.token_hex(3)}.json"
    tmp = folder / f".{final.name}.tmp"
    body = {"base": base, "set": set_, "delete": sorted(delete)}
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh, ensure_ascii=False, separators=(",", ":"))
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, final)
    fsync_path(folder)  # the new name must reach the disk before a manifest names it
    record = file_record(final)
    return NamedFile(path=f"{DOCS_DIR}/{final.name}", sha256=record.sha256, bytes=record.bytes)
