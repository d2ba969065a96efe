"""Node text, metadata and ids beside the vectors, in SQLite.

The working copy lives in memory (queries never touch the disk); a version's
``docstore.sqlite`` is written with the sqlite3 backup API and read back the same way, so the
file is an ordinary SQLite database anyone can inspect.

Tables:

* ``nodes``: one row per live node: ``faiss_id`` (our stable int64 id, the row key),
  ``node_id`` (LlamaIndex's string id), ``ref_doc_id``, ``text``, ``metadata`` (the user
  metadata as JSON, what filters read), ``node_type`` and ``node_json`` (the node without text
  and embedding, as LlamaIndex serialises it, to rebuild it with its relationships).
* ``docs``: ``ref_doc_id -> hash``, so an ingestion pipeline can diff sources.
* ``state``: small key/value facts (the id counter, schema version).
* ``nodes_fts``: the keyword (BM25) index over node texts, kept in step by triggers
  (see `indexes.sparse`). Databases written before it existed lack it (schema version 1).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core.schema import BaseNode, MetadataMode
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from . import sparse
from .errors import IndexCorruptedError

SCHEMA_VERSION = "2"
"""2 added the keyword table; 1 had nodes, docs and state only."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    faiss_id   INTEGER PRIMARY KEY,
    node_id    TEXT NOT NULL UNIQUE,
    ref_doc_id TEXT,
    text       TEXT NOT NULL,
    metadata   TEXT NOT NULL,
    node_type  TEXT NOT NULL,
    node_json  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS nodes_ref_doc_id ON nodes(ref_doc_id);
CREATE TABLE IF NOT EXISTS docs (
    ref_doc_id TEXT PRIMARY KEY,
    hash       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class NodeRow:
    """One node as stored: everything but its vector."""

    faiss_id: int
    node_id: str
    ref_doc_id: str | None
    text: str
    metadata: str
    node_type: str
    node_json: str

    @classmethod
    def from_node(cls, node: BaseNode, faiss_id: int) -> NodeRow:
        """Serialise `node` (its embedding is not kept here)."""
        try:
            metadata = json.dumps(node.metadata, ensure_ascii=False, allow_nan=False, default=str)
        except ValueError as exc:
            raise ValueError(f"metadata of node {node.node_id!r} is not valid JSON: {exc}") from exc
        packed = node_to_metadata_dict(node, remove_text=True, flat_metadata=False)
        return cls(
            faiss_id=int(faiss_id),
            node_id=node.node_id,
            ref_doc_id=node.ref_doc_id,
            text=node.get_content(metadata_mode=MetadataMode.NONE),
            metadata=metadata,
            node_type=packed["_node_type"],
            node_json=packed["_node_content"],
        )

    def to_node(self) -> BaseNode:
        """The LlamaIndex node, relationships included, without embedding."""
        return metadata_dict_to_node(
            {"_node_content": self.node_json, "_node_type": self.node_type}, text=self.text
        )


class NodeStore:
    """SQLite table of nodes and documents; not thread-safe on its own (the store locks)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        new = not sparse.has_table(conn) and not self._has_nodes_table()
        self._conn.executescript(_SCHEMA)
        if new:
            sparse.create(conn, populate=False)
        self._conn.execute(
            "INSERT OR IGNORE INTO state(key, value) VALUES ('schema_version', ?)",
            (SCHEMA_VERSION if new else "1",),
        )
        self._conn.commit()

    def _has_nodes_table(self) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'nodes'"
        ).fetchone()
        return row is not None

    @classmethod
    def in_memory(cls) -> NodeStore:
        """An empty store in memory (with the keyword table)."""
        return cls(sqlite3.connect(":memory:", check_same_thread=False))

    # --------------------------------------------------------------- keywords

    @property
    def has_sparse(self) -> bool:
        """Whether node texts are indexed for keyword search (not in schema-1 databases)."""
        return sparse.has_table(self._conn)

    def add_sparse(self) -> None:
        """Create and fill the keyword table of a database written before it existed."""
        if not self.has_sparse:
            sparse.create(self._conn, populate=True)
            self.set_state("schema_version", SCHEMA_VERSION)

    def check_sparse(self, where: Path) -> int | None:
        """Keyword rows after FTS5's integrity check (None without the table)."""
        if not self.has_sparse:
            return None
        try:
            sparse.integrity_check(self._conn)
        except sqlite3.DatabaseError as exc:
            raise IndexCorruptedError.for_file(where, f"its keyword index is out of step ({exc})") from exc
        return sparse.row_count(self._conn)

    def sparse_search(
        self, text: str, k: int, allowed: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """Top-``k`` (faiss id, BM25 score) for ``text`` among ``allowed`` ids (all if None)."""
        return sparse.search(self._conn, text, k, allowed)

    @classmethod
    def load(cls, path: Path) -> NodeStore:
        """Copy the database at `path` into memory (the file is not kept open)."""
        source = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            memory = sqlite3.connect(":memory:", check_same_thread=False)
            source.backup(memory)
        finally:
            source.close()
        return cls(memory)

    def save(self, path: Path) -> None:
        """Write a consistent copy to `path` (a new file) and fsync it."""
        target = sqlite3.connect(str(path))
        try:
            self._conn.commit()
            self._conn.backup(target)
        finally:
            target.close()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- nodes

    def count(self) -> int:
        """Live nodes."""
        return int(self._conn.execute("SELECT count(*) FROM nodes").fetchone()[0])

    def replace(self, rows: Sequence[NodeRow]) -> list[int]:
        """Insert `rows`, replacing nodes with the same node_id; returns replaced faiss ids."""
        old = self.faiss_ids_for_nodes([r.node_id for r in rows])
        with self._conn:
            if old:
                self._delete_faiss_ids(list(old.values()))
            self._conn.executemany(
                "INSERT INTO nodes(faiss_id, node_id, ref_doc_id, text, metadata, node_type, "
                "node_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.faiss_id,
                        r.node_id,
                        r.ref_doc_id,
                        r.text,
                        r.metadata,
                        r.node_type,
                        r.node_json,
                    )
                    for r in rows
                ],
            )
        return list(old.values())

    def faiss_ids_for_nodes(self, node_ids: Iterable[str]) -> dict[str, int]:
        """node_id -> faiss id for those of `node_ids` that exist."""
        ids = list(node_ids)
        if not ids:
            return {}
        cur = self._conn.execute(
            "SELECT node_id, faiss_id FROM nodes WHERE node_id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids),),
        )
        return dict(cur.fetchall())

    def faiss_ids_for_ref_doc(self, ref_doc_id: str) -> list[int]:
        """Faiss ids of the nodes of one source document."""
        cur = self._conn.execute("SELECT faiss_id FROM nodes WHERE ref_doc_id = ?", (ref_doc_id,))
        return [row[0] for row in cur.fetchall()]

    def node_ids_for_ref_doc(self, ref_doc_id: str) -> list[str]:
        """Node ids of one source document, in insertion (faiss id) order."""
        cur = self._conn.execute(
            "SELECT node_id FROM nodes WHERE ref_doc_id = ? ORDER BY faiss_id", (ref_doc_id,)
        )
        return [row[0] for row in cur.fetchall()]

    def delete_faiss_ids(self, faiss_ids: Sequence[int]) -> None:
        """Remove the rows of `faiss_ids`."""
        with self._conn:
            self._delete_faiss_ids(faiss_ids)

    def _delete_faiss_ids(self, faiss_ids: Sequence[int]) -> None:
        self._conn.execute(
            "DELETE FROM nodes WHERE faiss_id IN (SELECT value FROM json_each(?))",
            (json.dumps([int(i) for i in faiss_ids]),),
        )

    def clear(self) -> None:
        """Remove every node and document row (the id counter stays)."""
        with self._conn:
            self._conn.execute("DELETE FROM nodes")
            self._conn.execute("DELETE FROM docs")

    def rows(self, faiss_ids: Sequence[int]) -> dict[int, NodeRow]:
        """Rows by faiss id, for those of `faiss_ids` that exist."""
        if len(faiss_ids) == 0:
            return {}
        cur = self._conn.execute(
            "SELECT faiss_id, node_id, ref_doc_id, text, metadata, node_type, node_json "
            "FROM nodes WHERE faiss_id IN (SELECT value FROM json_each(?))",
            (json.dumps([int(i) for i in faiss_ids]),),
        )
        return {row[0]: NodeRow(*row) for row in cur.fetchall()}

    def rows_by_node_id(self, node_ids: Sequence[str]) -> list[NodeRow]:
        """Rows of `node_ids`, in the order given, skipping unknown ids."""
        found = self.faiss_ids_for_nodes(node_ids)
        by_id = self.rows(list(found.values()))
        return [by_id[found[n]] for n in node_ids if n in found]

    def select_faiss_ids(
        self,
        where: str = "1",
        params: Sequence[Any] = (),
        *,
        node_ids: Sequence[str] | None = None,
        ref_doc_ids: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Faiss ids of the rows matching a SQL condition and optional id restrictions."""
        sql = f"SELECT faiss_id FROM nodes WHERE ({where})"
        args = list(params)
        if node_ids is not None:
            sql += " AND node_id IN (SELECT value FROM json_each(?))"
            args.append(json.dumps(list(node_ids)))
        if ref_doc_ids is not None:
            sql += " AND ref_doc_id IN (SELECT value FROM json_each(?))"
            args.append(json.dumps(list(ref_doc_ids)))
        cur = self._conn.execute(sql + " ORDER BY faiss_id", args)
        return np.fromiter((row[0] for row in cur), dtype=np.int64)

    def page_ids(self, after: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` (faiss_id, node_id) pairs with faiss id above `after`, ascending."""
        cur = self._conn.execute(
            "SELECT faiss_id, node_id FROM nodes WHERE faiss_id > ? ORDER BY faiss_id LIMIT ?",
            (after, limit),
        )
        return [(int(a), str(b)) for a, b in cur.fetchall()]

    def max_faiss_id(self) -> int:
        """Largest faiss id held (-1 when empty)."""
        value = self._conn.execute("SELECT max(faiss_id) FROM nodes").fetchone()[0]
        return -1 if value is None else int(value)

    # ------------------------------------------------------------- documents

    def set_doc_hash(self, ref_doc_id: str, doc_hash: str) -> None:
        """Record the content hash of a source document."""
        with self._conn:
            self._conn.execute(
                "INSERT INTO docs(ref_doc_id, hash) VALUES (?, ?) "
                "ON CONFLICT(ref_doc_id) DO UPDATE SET hash = excluded.hash",
                (ref_doc_id, doc_hash),
            )

    def doc_hashes(self) -> dict[str, str]:
        """Every recorded source document and its hash."""
        return dict(self._conn.execute("SELECT ref_doc_id, hash FROM docs").fetchall())

    def delete_doc(self, ref_doc_id: str) -> None:
        """Forget a source document's hash."""
        with self._conn:
            self._conn.execute("DELETE FROM docs WHERE ref_doc_id = ?", (ref_doc_id,))

    # ----------------------------------------------------------------- state

    def get_state(self, key: str) -> str | None:
        """A value from the state table."""
        row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        """Set a value in the state table."""
        with self._conn:
            self._conn.execute(
                "INSERT INTO state(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def close(self) -> None:
        """Release the in-memory database."""
        self._conn.close()
