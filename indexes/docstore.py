"""Node text, metadata and ids, in SQLite: a segment's rows on disk, or the rows not yet written.

Three uses of one table layout:

* a segment's ``nodes.sqlite`` (see `indexes.segments`), written once and then opened
  read-only and ``immutable``: SQLite reads only the pages a lookup touches, so opening an
  index reads no text, and a query reads the rows of the hits it returns;
* the in-memory rows a writer has added but not yet written as a segment;
* ``docstore.sqlite`` of the format-1 layout (one full copy per version), read once to migrate.

Tables:

* ``nodes``: one row per node: ``faiss_id`` (our stable int64 id, the row key),
  ``node_id`` (LlamaIndex's string id), ``ref_doc_id``, ``text``, ``metadata`` (the user
  metadata as JSON, what filters read), ``node_type`` and ``node_json`` (the node without text
  and embedding, as LlamaIndex serialises it, to rebuild it with its relationships).
* ``docs`` and ``state``: only in format-1 files (document hashes now live in the index's
  document log, `indexes.doclog`, and the id counter in the manifest).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .durable import fsync_path
from .errors import IndexPathTooLongError

if TYPE_CHECKING:  # imported where a node is made or read: a query reads rows, not nodes
    from llama_index.core.schema import BaseNode

#: A covering index of each segment's metadata column: a metadata filter reads it instead of
#: the table, whose rows carry the node texts too (a 50,000-row segment: 10.6 vs 86 ms for
#: ``json_extract(metadata, ...) = ?``, for +1.4% of the file). Built once the rows are in.
_METADATA_INDEX = "CREATE INDEX IF NOT EXISTS nodes_metadata ON nodes(metadata)"

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
        from llama_index.core.schema import MetadataMode
        from llama_index.core.vector_stores.utils import node_to_metadata_dict

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
        from llama_index.core.vector_stores.utils import metadata_dict_to_node

        return metadata_dict_to_node(
            {"_node_content": self.node_json, "_node_type": self.node_type}, text=self.text
        )


class NodeStore:
    """SQLite table of nodes; not thread-safe on its own (the store locks)."""

    def __init__(self, conn: sqlite3.Connection, *, writable: bool = True) -> None:
        self._conn = conn
        self._writable = writable
        if writable:
            self._conn.executescript(_SCHEMA)
            self._conn.commit()

    @classmethod
    def in_memory(cls) -> NodeStore:
        """An empty store in memory."""
        return cls(sqlite3.connect(":memory:", check_same_thread=False))

    @classmethod
    def open_readonly(cls, path: Path) -> NodeStore:
        """A segment's rows, read in place: ``immutable`` tells SQLite the file never changes,
        so it takes no locks and reads only the pages a lookup needs. The file stays readable
        through this handle even after a later version's clean-up unlinks it."""
        return cls(sqlite3.connect(_uri(path, "mode=ro&immutable=1"), uri=True, check_same_thread=False),
                   writable=False)

    @staticmethod
    def write_file(path: Path, rows: Iterable[NodeRow]) -> None:
        """Write ``rows`` (in the order given) as a new database file and fsync it."""
        conn = _new_file(path)
        try:
            conn.executemany(
                "INSERT INTO nodes(faiss_id, node_id, ref_doc_id, text, metadata, node_type, "
                "node_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (r.faiss_id, r.node_id, r.ref_doc_id, r.text, r.metadata, r.node_type, r.node_json)
                    for r in rows
                ),
            )
            conn.execute(_METADATA_INDEX)
            conn.commit()
        finally:
            conn.close()
        fsync_path(path)

    @staticmethod
    def copy_files(path: Path, sources: Sequence[tuple[Path, np.ndarray]]) -> np.ndarray | None:
        """Write the rows of ``sources`` (each a segment's rows file and the faiss ids to leave
        out), in that order, as a new database file, copied by SQLite itself, and fsync it;
        returns the faiss ids written, in order.

        A merge's rows stream through Python at ~15 us a row (21 s of a 1M-row compaction);
        SQLite's ``INSERT ... SELECT`` from the attached file measured ~2x faster. None, with
        nothing left at ``path``, when a source file is no longer there to attach: a later
        version's clean-up may unlink a segment this process still reads through an open
        handle, and the caller then streams the rows from that handle instead.
        """
        if not all(Path(source).is_file() for source, _ in sources):
            return None
        conn = _new_file(path)
        try:
            conn.execute("CREATE TEMP TABLE skipped (faiss_id INTEGER PRIMARY KEY)")
            for source, skip in sources:
                try:
                    conn.execute("ATTACH DATABASE ? AS source",
                                 (f"{Path(source).resolve().as_uri()}?mode=ro&immutable=1",))
                except sqlite3.OperationalError:  # unlinked since the check above
                    conn.close()
                    Path(path).unlink(missing_ok=True)
                    return None
                conn.executemany("INSERT INTO temp.skipped VALUES (?)", ((int(i),) for i in skip))
                conn.execute(
                    "INSERT INTO main.nodes SELECT faiss_id, node_id, ref_doc_id, text, metadata, "
                    "node_type, node_json FROM source.nodes WHERE faiss_id NOT IN "
                    "(SELECT faiss_id FROM temp.skipped) ORDER BY faiss_id"
                )
                conn.execute("DELETE FROM temp.skipped")
                conn.commit()
                conn.execute("DETACH DATABASE source")
            conn.execute(_METADATA_INDEX)
            conn.commit()
            written = np.fromiter(
                (row[0] for row in conn.execute("SELECT faiss_id FROM main.nodes ORDER BY faiss_id")), np.int64
            )
        finally:
            conn.close()
        fsync_path(path)
        return written

    def iter_rows(self, batch: int = 4096, lock: Any = None) -> Iterator[NodeRow]:
        """Every row in faiss id order, read in batches (each under ``lock`` when given)."""
        after = -1
        while True:
            with lock if lock is not None else contextlib.nullcontext():
                page = [
                    NodeRow(*row)
                    for row in self._conn.execute(
                        "SELECT faiss_id, node_id, ref_doc_id, text, metadata, node_type, "
                        "node_json FROM nodes WHERE faiss_id > ? ORDER BY faiss_id LIMIT ?",
                        (after, batch),
                    ).fetchall()
                ]
            if not page:
                return
            yield from page
            after = page[-1].faiss_id

    def has_table(self, name: str) -> bool:
        """Whether the database has table ``name``."""
        row = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    @classmethod
    def load(cls, path: Path) -> NodeStore:
        """Copy the database at `path` into memory (a format-1 docstore, read to migrate it)."""
        source = sqlite3.connect(_uri(path, "mode=ro"), uri=True)
        try:
            memory = sqlite3.connect(":memory:", check_same_thread=False)
            source.backup(memory)
        finally:
            source.close()
        return cls(memory)

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
        """Faiss ids (ascending) of the rows matching a SQL condition and optional id
        restrictions. Sorted here, not by SQL: ``ORDER BY faiss_id`` made SQLite walk the
        table in id order, texts and all, rather than the narrow metadata index."""
        sql = f"SELECT faiss_id FROM nodes WHERE ({where})"
        args = list(params)
        if node_ids is not None:
            sql += " AND node_id IN (SELECT value FROM json_each(?))"
            args.append(json.dumps(list(node_ids)))
        if ref_doc_ids is not None:
            sql += " AND ref_doc_id IN (SELECT value FROM json_each(?))"
            args.append(json.dumps(list(ref_doc_ids)))
        cur = self._conn.execute(sql, args)
        return np.sort(np.fromiter((row[0] for row in cur), dtype=np.int64))

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


#: The longest absolute path (bytes) of a database file SQLite's unix VFS opens: its limit is 512
#: with room kept for a journal's suffix (measured with SQLite 3.40: 504 opens, 505 does not).
SQLITE_MAX_PATH_BYTES = 504


def _uri(path: Path, query: str) -> str:
    """The ``file:`` URI SQLite opens ``path`` by, or `IndexPathTooLongError` when the path is
    longer than SQLite takes: it said only "unable to open database file"."""
    resolved = Path(path).resolve()
    size = len(os.fsencode(str(resolved)))
    if size > SQLITE_MAX_PATH_BYTES:
        index_dir = resolved.parents[2] if len(resolved.parents) > 2 else resolved.parent
        room = SQLITE_MAX_PATH_BYTES - (size - len(os.fsencode(str(index_dir))))
        raise IndexPathTooLongError(
            f"{resolved} is {size} bytes long, and SQLite opens files by paths of at most "
            f"{SQLITE_MAX_PATH_BYTES} bytes: move or copy the index to a folder whose absolute path is at "
            f"most {room} bytes (UTF-8; a CJK character takes 3)")
    return f"{resolved.as_uri()}?{query}"


def _new_file(path: Path) -> sqlite3.Connection:
    """A new rows database at ``path``, written once: no journal, synced as a whole after."""
    conn = sqlite3.connect(_uri(path, "mode=rwc"), uri=True)
    conn.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
    conn.executescript(_SCHEMA)
    return conn

