"""Keyword engines side by side: FTS5 (today), `indexes.keywords` (1 and N segments), tantivy.

Synthetic SciFact-like documents (6-10 sentences drawn at random from the SciFact abstracts,
~1.2 kB each, as ``../shared/docs/SCALE.md`` describes) and SciFact claims as queries. For each
size: build seconds, disk bytes, open ms, top-10 p50/p95 ms (one thread) and top-10 overlap
with FTS5. Then quality on SciFact (queries with qrels/train.tsv over the full corpus): NDCG@10
and Recall@100 of FTS5 and of the new engine, which should be equal.

Run niced on a shared machine::

    nice -n 10 .venv/bin/python benchmarks/keyword_engines.py --sizes 100000 300000

tantivy is optional (``pip install tantivy==0.27.0``); it is skipped when absent.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexes import keywords, sparse  # noqa: E402

SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
RESULTS = ROOT / "benchmarks" / "results"


def load_corpus() -> tuple[list[str], list[str]]:
    """SciFact (ids, title + " " + text)."""
    ids, texts = [], []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            ids.append(str(doc["_id"]))
            texts.append(f"{doc['title']} {doc['text']}")
    return ids, texts


def load_queries() -> dict[str, str]:
    """SciFact claims by query id."""
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as handle:
        return {str(q["_id"]): q["text"] for q in map(json.loads, handle)}


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """n documents of 6-10 SciFact sentences each (sentence mix, realistic term statistics)."""
    _, texts = load_corpus()
    sentences = [
        s.strip() for text in texts for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 20
    ]
    rng = random.Random(seed)
    return [" ".join(rng.choices(sentences, k=rng.randint(6, 10))) for _ in range(n)]


def folder_bytes(path: Path) -> int:
    """Bytes of every file under path."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def latencies(run: Callable[[str], list[int]], queries: Sequence[str]) -> tuple[dict, list]:
    """p50/p95 ms of top-10 queries (after 5 warm-up queries) and each query's row ids."""
    for q in queries[:5]:
        run(q)
    times, hits = [], []
    for q in queries:
        start = time.perf_counter()
        rows = run(q)
        times.append((time.perf_counter() - start) * 1000)
        hits.append(rows)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "queries": len(queries),
    }, hits


def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean top-10 overlap of b with a over the queries both answered."""
    values = [len(set(x) & set(y)) / max(1, len(x)) for x, y in zip(a, b, strict=False) if x]
    return round(float(np.mean(values)), 4) if values else float("nan")


# ------------------------------------------------------------------------------- engines


def fts5_build(folder: Path, texts: Sequence[str]) -> Path:
    """FTS5's own table over the texts folded as the engine folds them (contentless here: the
    index alone, as the node texts live beside)."""
    path = folder / "fts.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(
        f"CREATE VIRTUAL TABLE {sparse.FTS_TABLE} USING fts5(text, content='', "
        f"tokenize='{sparse.TOKENIZER}')"
    )
    with conn:
        conn.executemany(
            f"INSERT INTO {sparse.FTS_TABLE}(rowid, text) VALUES (?, ?)",
            ((row, sparse.fold_text(text)) for row, text in enumerate(texts)),
        )
    conn.execute(f"INSERT INTO {sparse.FTS_TABLE}({sparse.FTS_TABLE}) VALUES ('optimize')")
    conn.commit()
    conn.close()
    return path


def fts5_open(path: Path) -> sqlite3.Connection:
    """Read-only, pages on demand."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    conn.execute(f"SELECT count(*) FROM {sparse.FTS_TABLE}_config").fetchone()
    return conn


def ours_build(folder: Path, texts: Sequence[str], n_segments: int) -> list[Path]:
    """Segment folders of (about) equal size, written by `indexes.keywords`."""
    bounds = np.linspace(0, len(texts), n_segments + 1).astype(int)
    paths = []
    for i in range(n_segments):
        path = folder / f"seg{i:03d}"
        path.mkdir()
        keywords.write_keyword_index(path, texts[bounds[i] : bounds[i + 1]])
        paths.append(path)
    return paths


def ours_runner(paths: Sequence[Path]) -> Callable[[str], list[int]]:
    """Query function mapping (segment, row) back to global rows."""
    segments = [keywords.KeywordSegment.open(p) for p in paths]
    bases = np.concatenate([[0], np.cumsum([s.rows for s in segments])])
    live: list[np.ndarray | None] = [None] * len(segments)

    def run(query: str) -> list[int]:
        return [int(bases[s]) + r for s, r, _ in keywords.search(segments, live, query, 10)]

    return run


def tantivy_engine(folder: Path, texts: Sequence[str]) -> tuple[object, float] | None:
    """A tantivy index with the analyser closest to FTS5's (simple split, ascii fold,
    lowercase, English Snowball stemmer); None when tantivy is not installed."""
    try:
        import tantivy
    except ImportError:
        return None
    analyzer = (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.ascii_fold())
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("text", stored=False, tokenizer_name="fts5like")
    builder.add_integer_field("row", stored=True, indexed=False, fast=True)
    schema = builder.build()
    start = time.perf_counter()
    index = tantivy.Index(schema, path=str(folder))
    index.register_tokenizer("fts5like", analyzer)
    writer = index.writer(heap_size=256_000_000, num_threads=1)
    for i, text in enumerate(texts):
        writer.add_document(tantivy.Document(text=text, row=i))
    writer.commit()
    writer.wait_merging_threads()
    return analyzer, time.perf_counter() - start


def tantivy_runner(folder: Path, analyzer: object) -> Callable[[str], list[int]]:
    """Open the index (registering the analyser again) and answer OR queries of terms."""
    import tantivy

    index = tantivy.Index.open(str(folder))
    index.register_tokenizer("fts5like", analyzer)
    index.reload()
    searcher = index.searcher()

    def run(query: str) -> list[int]:
        terms = sparse.query_terms(query)
        if not terms:
            return []
        parsed = index.parse_query(" OR ".join(terms), ["text"])
        hits = searcher.search(parsed, 10, count=False).hits
        return [searcher.doc(address)["row"][0] for _, address in hits]

    return run


# ------------------------------------------------------------------------------- figures


def bench_size(n: int, queries: list[str], n_segments: int, fts_queries: int) -> dict:
    """Every engine on n synthetic documents."""
    texts = synthetic_docs(n)
    out: dict = {"docs": n, "mean_doc_chars": round(float(np.mean([len(t) for t in texts])))}
    with tempfile.TemporaryDirectory(prefix="kwbench-") as tmp:
        root = Path(tmp)
        (root / "fts").mkdir()
        start = time.perf_counter()
        fts_path = fts5_build(root / "fts", texts)
        build = time.perf_counter() - start
        start = time.perf_counter()
        conn = fts5_open(fts_path)
        open_ms = (time.perf_counter() - start) * 1000
        figures, fts_hits = latencies(
            lambda q: [r for r, _ in sparse.search(conn, q, 10)], queries[:fts_queries]
        )
        out["fts5"] = {
            **figures,
            "build_s": round(build, 2),
            "disk_bytes": folder_bytes(root / "fts"),
            "open_ms": round(open_ms, 3),
        }
        conn.close()
        print(n, "fts5", out["fts5"], flush=True)
        for label, count in (("ours_1seg", 1), (f"ours_{n_segments}seg", n_segments)):
            folder = root / label
            folder.mkdir()
            start = time.perf_counter()
            paths = ours_build(folder, texts, count)
            build = time.perf_counter() - start
            start = time.perf_counter()
            run = ours_runner(paths)
            open_ms = (time.perf_counter() - start) * 1000
            figures, hits = latencies(run, queries)
            out[label] = {
                **figures,
                "build_s": round(build, 2),
                "docs_per_s": round(n / build),
                "disk_bytes": folder_bytes(folder),
                "open_ms": round(open_ms, 3),
                "overlap_fts5": overlap(fts_hits, hits[:fts_queries]),
            }
            print(n, label, out[label], flush=True)
        folder = root / "tantivy"
        folder.mkdir()
        made = tantivy_engine(folder, texts)
        if made is None:
            out["tantivy"] = {"skipped": "tantivy not installed"}
        else:
            analyzer, build = made
            start = time.perf_counter()
            run = tantivy_runner(folder, analyzer)
            open_ms = (time.perf_counter() - start) * 1000
            figures, hits = latencies(run, queries)
            out["tantivy"] = {
                **figures,
                "build_s": round(build, 2),
                "disk_bytes": folder_bytes(folder),
                "open_ms": round(open_ms, 3),
                "overlap_fts5": overlap(fts_hits, hits[:fts_queries]),
            }
        print(n, "tantivy", out["tantivy"], flush=True)
    return out


def quality() -> dict:
    """NDCG@10 and Recall@100 on SciFact (train qrels) for FTS5 and the new engine."""
    import pytrec_eval

    ids, texts = load_corpus()
    queries = load_queries()
    qrels: dict[str, dict[str, int]] = {}
    with open(SCIFACT / "qrels" / "train.tsv", encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            qid, doc, score = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, {})[doc] = int(score)
    conn = sqlite3.connect(":memory:")
    conn.execute(
        f"CREATE VIRTUAL TABLE {sparse.FTS_TABLE} USING fts5(text, tokenize='{sparse.TOKENIZER}')"
    )
    conn.executemany(f"INSERT INTO {sparse.FTS_TABLE}(rowid, text) VALUES (?, ?)", enumerate(texts))
    segment = keywords.KeywordSegment.from_texts(texts)
    runs: dict[str, dict[str, dict[str, float]]] = {"fts5": {}, "ours": {}}
    for qid in qrels:
        text = queries[qid]
        runs["fts5"][qid] = {ids[r]: s for r, s in sparse.search(conn, text, 100)}
        runs["ours"][qid] = {ids[r]: s for _, r, s in keywords.search([segment], [None], text, 100)}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    out: dict = {"queries": len(qrels), "docs": len(texts)}
    for name, run in runs.items():
        measures = evaluator.evaluate(run)
        out[name] = {
            "ndcg@10": round(float(np.mean([m["ndcg_cut_10"] for m in measures.values()])), 4),
            "recall@100": round(float(np.mean([m["recall_100"] for m in measures.values()])), 4),
        }
    print("quality", out, flush=True)
    return out


def markdown(results: dict) -> str:
    """A short table of the figures."""
    lines = [
        "# Keyword engines (top-10, one query thread)",
        "",
        f"CPU: {results['cpu']} ({results['cores']} cores, niced, shared machine). "
        f"{results['queries']} SciFact queries; synthetic 6-10 sentence documents. "
        "FTS5 latency over the first "
        f"{results['fts_queries']} queries.",
        "",
        "| docs | engine | p50 ms | p95 ms | build s | disk MB | open ms | top-10 overlap FTS5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in results["sizes"]:
        for engine, f in size.items():
            if not isinstance(f, dict) or "p50_ms" not in f:
                continue
            lines.append(
                f"| {size['docs']:,} | {engine} | {f['p50_ms']} | {f['p95_ms']} | "
                f"{f['build_s']} | {f['disk_bytes'] / 1e6:.0f} | {f['open_ms']} | "
                f"{f.get('overlap_fts5', '-')} |"
            )
    if "quality" in results:
        q = results["quality"]
        lines += [
            "",
            f"SciFact quality ({q['queries']} train queries, {q['docs']} docs):",
            "",
            "| engine | NDCG@10 | Recall@100 |",
            "|---|---|---|",
            *(
                f"| {name} | {q[name]['ndcg@10']} | {q[name]['recall@100']} |"
                for name in ("fts5", "ours")
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the sizes and write JSON + Markdown results."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=f"Reads BEIR SciFact (corpus.jsonl, queries.jsonl, qrels/train.tsv) at {SCIFACT}, the "
        "checkout's ../shared/data/scifact.",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000],
                        help="corpus sizes (documents) to build and query")
    parser.add_argument("--queries", type=int, default=200, help="SciFact claims timed per engine")
    parser.add_argument("--segments", type=int, default=10, help="segments of our engine's N-segment index")
    parser.add_argument("--fts-queries", type=int, default=200, help="of those, timed on FTS5 (slow at 1M)")
    parser.add_argument("--no-quality", action="store_true", help="skip the NDCG/recall check on SciFact")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder keyword_engines.{json,md} are written to")
    args = parser.parse_args()
    missing = [name for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv") if not (SCIFACT / name).is_file()]
    if missing:  # its documents, queries and quality check are all SciFact's: no stand-in
        parser.error(f"SciFact not found: {SCIFACT} lacks {', '.join(missing)} (BEIR SciFact expected "
                     "in ../shared/data/scifact beside the checkout)")
    queries = list(load_queries().values())[: args.queries]
    results: dict = {
        "cpu": cpu_model(),
        "cores": len(__import__("os").sched_getaffinity(0)),
        "queries": len(queries),
        "fts_queries": min(args.fts_queries, len(queries)),
        "sqlite": sqlite3.sqlite_version,
        "sizes": [],
    }
    if not args.no_quality:
        results["quality"] = quality()
    for n in args.sizes:
        results["sizes"].append(bench_size(n, queries, args.segments, args.fts_queries))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "keyword_engines.json").write_text(json.dumps(results, indent=2) + "\n")
        from results_file import write_markdown

        write_markdown(args.out / "keyword_engines.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
