"""Query latency by mode on one index, side by side: dense vs sparse (BM25) vs hybrid.

    .venv/bin/python benchmarks/hybrid_latency.py INDEX_DIR [--queries N]

The index should be a real one (e.g. the SciFact train corpus built by
``htp-index eval --pipeline --index-dir DIR``). For each query, the three modes run back to
back in a rotating order (so load on the machine hits all three alike), one query at a time,
as a RAG app sends them:

* end to end: :meth:`OpenIndex.search` (query encoding included: what a caller waits for);
* store only: :meth:`FaissVectorStore.query` with the query vector already computed.

Reports median and p90 milliseconds and the hybrid/dense ratio of medians, plus the size of
the keyword table in ``docstore.sqlite``. Writes ``benchmarks/results/hybrid_latency.{json,md}``
(``--out``: another folder), keeping the file's ``## Notes``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from htp_embed.threads import default_openmp_waiting  # noqa: E402

default_openmp_waiting()  # htp_embed's default, set before torch or faiss loads OpenMP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
MODES = ("dense", "sparse", "hybrid")


def keyword_table_bytes(index_dir: Path) -> dict[str, int]:
    """Bytes of the live version's segments and of their keyword postings."""
    from indexes import keywords, read_manifest

    manifest = read_manifest(index_dir)
    total = sum(r.bytes for s in manifest.segments for r in s.files.values())
    postings = sum(
        s.files[name].bytes for s in manifest.segments for name in keywords.KEYWORD_FILES
    )
    return {"segments_bytes": total, "keyword_postings_bytes": postings}


def summarise(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(1000 * statistics.median(ordered), 2),
            "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=f"Queries are BEIR SciFact's train queries, read from {SCIFACT} "
                                     "(the checkout's ../shared/data/scifact).")
    parser.add_argument("index_dir", type=Path, help="the index to query (a real one: see above)")
    parser.add_argument("--queries", type=int, default=200, help="SciFact train queries to time")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()
    if not (SCIFACT / "queries.jsonl").is_file():
        parser.error(f"SciFact not found: no {SCIFACT / 'queries.jsonl'} (BEIR SciFact expected in "
                     "../shared/data/scifact beside the checkout)")

    from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode
    from machine import cpu_model

    from pipelines.beir import load_beir
    from pipelines.query import open_index
    from pipelines.settings import load_settings

    index = open_index(args.index_dir, load_settings(encoder_show_progress=False))
    texts = load_beir(SCIFACT, "train").query_texts()[: args.queries]
    vectors = index.encoder.encode_queries(texts)
    index.search(texts[0], 10)  # warm up every path once
    end_to_end: dict[str, list[float]] = {m: [] for m in MODES}
    store_only: dict[str, list[float]] = {m: [] for m in MODES}
    store_modes = {"dense": VectorStoreQueryMode.DEFAULT, "sparse": VectorStoreQueryMode.SPARSE,
                   "hybrid": VectorStoreQueryMode.HYBRID}
    for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        order = MODES[i % 3:] + MODES[: i % 3]
        for mode in order:
            began = time.perf_counter()
            index.search(text, 10, mode=mode)
            end_to_end[mode].append(time.perf_counter() - began)
            query = VectorStoreQuery(query_embedding=vector.tolist(), query_str=text, similarity_top_k=10,
                                     mode=store_modes[mode])
            began = time.perf_counter()
            index.vector_store.query(query)
            store_only[mode].append(time.perf_counter() - began)
    rows = {
        "end_to_end": {m: summarise(v) for m, v in end_to_end.items()},
        "store_only": {m: summarise(v) for m, v in store_only.items()},
    }
    for part in rows.values():
        part["hybrid_over_dense"] = round(part["hybrid"]["median_ms"] / part["dense"]["median_ms"], 3)
    result = {
        "index": str(args.index_dir), "count": index.store.count, "index_kind": index.store.index_kind,
        "queries": len(texts), "encoder": index.embedding.model_name,
        "dtype": str(index.encoder.dtype), "machine": f"{cpu_model()}, {os.cpu_count()} cores, no GPU", **keyword_table_bytes(args.index_dir), **rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hybrid_latency.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Query latency by mode (one query at a time)", "",
        f"{result['count']} vectors ({result['index_kind']}), {len(texts)} SciFact train queries, "
        f"{result['encoder']} in {result['dtype']}, {result['machine']}. Modes interleaved per query.", "",
        "| path | dense ms (p50 / p90) | sparse ms | hybrid ms | hybrid / dense |", "|---|---|---|---|---|",
    ]
    for name, part in rows.items():
        cells = [f"{part[m]['median_ms']} / {part[m]['p90_ms']}" for m in MODES]
        lines.append(f"| {name.replace('_', ' ')} | {' | '.join(cells)} | {part['hybrid_over_dense']} |")
    lines += ["", f"segments: {result['segments_bytes'] / 2**20:.1f} MiB, of which keyword postings "
              f"{result['keyword_postings_bytes'] / 2**20:.1f} MiB."]
    from results_file import write_markdown

    write_markdown(args.out / "hybrid_latency.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
