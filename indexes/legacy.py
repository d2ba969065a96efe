"""Reading a version of the format-1 layout (one full copy per version) to migrate it.

Format 1 kept every version as ``index.faiss`` (one FAISS index of every vector) and
``docstore.sqlite`` (every row, document hash and the FTS5 keyword table). Such a version is
read once, whole and checksummed as before, and handed to the store as pending rows; the
store's next persist writes them as segments (``htp-index migrate`` does it at once). Nothing
is ever written in this layout again.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from . import kinds
from .docstore import NodeRow, NodeStore
from .errors import IndexCorruptedError
from .spec import Manifest

INDEX_FILE = "index.faiss"
DOCSTORE_FILE = "docstore.sqlite"


@dataclass
class LoadedVersion:
    """Everything a format-1 version holds, in id order."""

    ids: np.ndarray
    vectors: np.ndarray
    rows: list[NodeRow]
    docs: dict[str, str]
    next_id: int


def load_version(vdir: Path, manifest: Manifest) -> LoadedVersion:
    """Read and check a format-1 version; raises `IndexCorruptedError` naming a bad file."""
    from .persist import MANIFEST_FILE, verify_files

    for name in (INDEX_FILE, DOCSTORE_FILE):
        if name not in manifest.files:
            raise IndexCorruptedError.for_file(vdir / MANIFEST_FILE, f"it does not list {name}")
    verify_files(vdir, manifest)
    index_path = vdir / INDEX_FILE
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise IndexCorruptedError.for_file(index_path, f"FAISS cannot read it ({exc})") from exc
    try:
        nodes = NodeStore.load(vdir / DOCSTORE_FILE)
        rows = list(nodes.iter_rows())
        docs = nodes.doc_hashes() if nodes.has_table("docs") else {}
        state_next = int(nodes.get_state("next_id") or 0) if nodes.has_table("state") else 0
    except sqlite3.DatabaseError as exc:
        raise IndexCorruptedError.for_file(vdir / DOCSTORE_FILE, f"SQLite: {exc}") from exc
    ids = np.fromiter((r.faiss_id for r in rows), dtype=np.int64, count=len(rows))
    stored = kinds.stored_ids(index)
    missing = np.setdiff1d(ids, stored)
    if missing.size:
        raise IndexCorruptedError.for_file(
            index_path, f"it disagrees with the docstore: {missing.size} rows have no vector"
        )
    vectors = index.reconstruct_batch(ids) if len(ids) else np.empty((0, index.d), np.float32)
    next_id = max(manifest.next_id, state_next, int(stored.max(initial=-1)) + 1, int(ids.max(initial=-1)) + 1)
    return LoadedVersion(ids=ids, vectors=vectors, rows=rows, docs=docs, next_id=next_id)
