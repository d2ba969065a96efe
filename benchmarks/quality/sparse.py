"""The keyword side: SQLite FTS5 (as the store runs it) against bm25s, on the development split.

    .venv/bin/python benchmarks/quality/sparse.py

SciFact ``train`` (809 judged queries) over the full corpus (5,183 abstracts). Scores
FTS5 with and without Porter stemming, with and without stop words dropped from the query,
and bm25s (Lucene BM25, stemmed, English stop words), with index build time, query latency
and the size the keyword table adds to ``docstore.sqlite``. No encoder is involved.
Writes ``benchmarks/results/quality/sparse.{json,md}``.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time

from common import RESULTS, SCIFACT, SPLIT, _write_json
from llama_index.core.schema import TextNode

from indexes import sparse
from indexes.docstore import NodeRow, NodeStore
from pipelines.evaluation import bm25_run, prepare_dataset, score_run


def fts_run(store: NodeStore, dataset, *, stop_words: bool) -> tuple[dict, float]:
    saved = sparse.STOP_WORDS
    if not stop_words:
        sparse.STOP_WORDS = frozenset()
    run = {}
    began = time.perf_counter()
    try:
        for qid, text in zip(dataset.query_ids(), dataset.query_texts(), strict=True):
            hits = store.sparse_search(text, 100)
            run[qid] = {doc_ids[i]: s for i, s in hits}
    finally:
        sparse.STOP_WORDS = saved
    return run, (time.perf_counter() - began) / len(dataset.queries)


def build(dataset, tokenizer: str) -> tuple[NodeStore, float, int]:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    saved = sparse.SCHEMA
    sparse.SCHEMA = saved.replace(sparse.TOKENIZER, tokenizer)
    try:
        store = NodeStore(conn)
    finally:
        sparse.SCHEMA = saved
    began = time.perf_counter()
    rows = [NodeRow.from_node(TextNode(id_=d, text=t), i) for i, (d, t) in
            enumerate(zip(dataset.doc_ids(), dataset.doc_texts(), strict=True))]
    store.replace(rows)
    seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.sqlite")
        store.save(path)
        size = os.path.getsize(path)
    return store, seconds, size


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # no options: --help describes the run
    dataset = prepare_dataset(SCIFACT, SPLIT)
    doc_ids = dataset.doc_ids()
    rows = []
    began = time.perf_counter()
    lexical = bm25_run(dataset, 100)
    means, _ = score_run(dataset.qrels, lexical)
    rows.append({"label": "bm25s (Lucene, stemmed, stop words)", **means,
                 "seconds_total": round(time.perf_counter() - began, 2)})
    for tokenizer in ("porter unicode61 remove_diacritics 2", "unicode61 remove_diacritics 2"):
        store, build_s, size = build(dataset, tokenizer)
        for stop_words in (True, False):
            run, per_query = fts_run(store, dataset, stop_words=stop_words)
            means, _ = score_run(dataset.qrels, run)
            rows.append({"label": f"fts5 [{tokenizer}] stop words {'dropped' if stop_words else 'kept'}",
                         **means, "build_s": round(build_s, 2), "query_ms": round(1000 * per_query, 2),
                         "docstore_bytes": size})
    # The same texts without the keyword table, to size what it adds.
    plain = sqlite3.connect(":memory:", check_same_thread=False)
    plain.executescript(
        "CREATE TABLE nodes (faiss_id INTEGER PRIMARY KEY, node_id TEXT NOT NULL UNIQUE, ref_doc_id TEXT, "
        "text TEXT NOT NULL, metadata TEXT NOT NULL, node_type TEXT NOT NULL, node_json TEXT NOT NULL);")
    plain.executemany("INSERT INTO nodes VALUES (?,?,?,?,?,?,?)",
                      [(i, d, d, t, "{}", "1", "{}") for i, (d, t) in
                       enumerate(zip(doc_ids, dataset.doc_texts(), strict=True))])
    plain.commit()
    with tempfile.TemporaryDirectory() as tmp:
        target = sqlite3.connect(os.path.join(tmp, "p.sqlite"))
        plain.backup(target)
        target.close()
        without_fts = os.path.getsize(os.path.join(tmp, "p.sqlite"))
    for row in rows:
        print(f"{row['label']:62s} ndcg@10={100 * row['ndcg@10']:.2f} r@100={100 * row['recall@100']:.2f} "
              f"{row.get('query_ms', '')} ms/query")
    result = {"dataset": dataset.name, "split": SPLIT, "queries": len(dataset.queries),
              "docs": len(doc_ids), "docstore_bytes_without_keywords": without_fts, "rows": rows}
    _write_json(RESULTS / "sparse.json", result)
    lines = ["# Keyword side: FTS5 vs bm25s (SciFact train, full corpus)", "",
             f"{len(dataset.queries)} queries, {len(doc_ids)} documents. Docstore without the keyword "
             f"table: {without_fts / 2**20:.1f} MiB.", "",
             "| retriever | NDCG@10 | Recall@100 | MRR@10 | query ms | build s | docstore MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        size = row.get("docstore_bytes")
        lines.append(f"| {row['label']} | {100 * row['ndcg@10']:.1f} | {100 * row['recall@100']:.1f} | "
                     f"{100 * row['mrr@10']:.1f} | {row.get('query_ms', '-')} | {row.get('build_s', '-')} | "
                     f"{f'{size / 2**20:.1f}' if size else '-'} |")
    (RESULTS / "sparse.md").write_text("\n".join(lines) + "\n")
