"""How much memory oneDNN's compiled kernels keep, and what bounding their caches costs.

    python benchmarks/kernel_cache.py [--docs 800] [--queries 1500] [--capacities library 256 512]

On the CPU every Linear call of a new input shape (rows = texts x positions) has oneDNN
compile and cache a kernel, in two caches of 1,024 entries each by default (oneDNN's own,
``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, and PyTorch's ideep layer, ``LRU_CACHE_CAPACITY``). One
entry keeps ~0.7 MiB; a query of a length not seen before pays ~1.5 ms per projection shape
to compile. Documents come in hundreds of shapes and queries in dozens, so a long ingest or a
service grows by hundreds of MiB up to the caches' bound.

Each capacity runs in its own process (the caches read their size once): SciFact abstracts
embedded as documents in chunks of 64 (seconds, RSS growth), then one query at a time (p50 /
p95 ms, RSS growth): SciFact claims, and two claims joined for longer ones, so that lengths
vary as a service's do. ``library`` leaves both variables unset (the libraries' own 1,024); a
number sets both. Settings alternate, ``--rounds`` times. Writes
``benchmarks/results/kernel_cache.{json,md}`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def child(docs: int, queries: int) -> dict:
    """In a fresh process: documents, then queries, with the caches as the environment says."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from encoder_speed import load_texts
    from machine import resident_mib
    from store_scale import queries as query_texts

    from htp_embed import HTPEncoder

    encoder = HTPEncoder(batch_size=8, show_progress=False)
    abstracts, _ = load_texts(docs)
    claims = query_texts(queries)
    texts = [c if i % 3 else f"{c} {claims[(i * 7) % len(claims)]}" for i, c in enumerate(claims)]
    encoder.encode_queries(["warm up"])
    encoder.encode_documents(abstracts[:2])
    start = resident_mib()
    began = time.perf_counter()
    for i in range(0, len(abstracts), 64):
        encoder.encode_documents(abstracts[i : i + 64])
    doc_seconds = time.perf_counter() - began
    after_docs = resident_mib()
    latencies = []
    for text in texts:
        began = time.perf_counter()
        encoder.encode_queries([text])
        latencies.append((time.perf_counter() - began) * 1000)
    after_queries = resident_mib()
    lengths = {len(layout) for layout in encoder.layouts(texts, is_query=True)}
    return {
        "doc_seconds": doc_seconds, "doc_rss_growth_mib": after_docs - start,
        "query_p50_ms": statistics.median(latencies),
        "query_p95_ms": statistics.quantiles(latencies, n=20)[18],
        "query_rss_growth_mib": after_queries - after_docs, "total_rss_growth_mib": after_queries - start,
        "rss_end_mib": after_queries, "distinct_query_lengths": len(lengths), "queries": len(texts),
        "environment": {name: os.environ.get(name) for name in CACHE_VARIABLES},
    }


def run_setting(capacity: str, docs: int, queries: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    if capacity != "library":
        env.update({name: capacity for name in CACHE_VARIABLES})
    out = subprocess.run([sys.executable, __file__, "--child", "--docs", str(docs), "--queries", str(queries)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=800, help="SciFact abstracts embedded as documents")
    parser.add_argument("--queries", type=int, default=1500, help="queries embedded one at a time")
    parser.add_argument("--capacities", nargs="+", default=["library", "256", "512"],
                        help="cache capacities to compare: 'library' (unset: 1,024) or a number of entries")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, the settings' order reversed each round")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for kernel_cache.{json,md}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.docs, args.queries)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_model

    runs: dict[str, list[dict]] = {c: [] for c in args.capacities}
    for round_ in range(args.rounds):
        order = args.capacities if round_ % 2 == 0 else args.capacities[::-1]
        for capacity in order:
            result = run_setting(capacity, args.docs, args.queries)
            runs[capacity].append(result)
            print(f"round {round_ + 1} {capacity:>8}: documents {result['doc_seconds']:.1f} s "
                  f"(+{result['doc_rss_growth_mib']:.0f} MiB), queries p50 {result['query_p50_ms']:.1f} ms "
                  f"p95 {result['query_p95_ms']:.1f} ms (+{result['query_rss_growth_mib']:.0f} MiB), "
                  f"RSS at the end {result['rss_end_mib']:.0f} MiB", flush=True)
    summary = {c: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "environment"}
               for c, rs in runs.items()}
    record = {"cpu": cpu_model(), "cores": os.cpu_count(), "docs": args.docs, "queries": args.queries,
              "rounds": args.rounds, "summary": summary, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_cache.json").write_text(json.dumps(record, indent=2) + "\n")
    base = summary[args.capacities[0]]
    lines = [f"# oneDNN kernel caches: memory and speed ({record['cpu']}, {record['cores']} cores)", "",
             f"{args.docs} SciFact abstracts as documents (chunks of 64), then {int(base['queries'])} queries one at a time "
             f"(claims, every third joined with another: {int(base['distinct_query_lengths'])} distinct lengths); "
             f"each setting in its own process, medians of {args.rounds} round(s); ratios against "
             f"`{args.capacities[0]}`.", "",
             "| cache capacity | documents s | vs first | RSS growth, documents | query p50 / p95 ms | "
             "RSS growth, queries | RSS growth, total |",
             "|---|---|---|---|---|---|---|"]
    for capacity, s in summary.items():
        lines.append(f"| {capacity} | {s['doc_seconds']:.1f} | {s['doc_seconds'] / base['doc_seconds']:.2f} | "
                     f"{s['doc_rss_growth_mib']:.0f} MiB | {s['query_p50_ms']:.1f} / {s['query_p95_ms']:.1f} | "
                     f"{s['query_rss_growth_mib']:.0f} MiB | {s['total_rss_growth_mib']:.0f} MiB |")
    from results_file import write_markdown

    write_markdown(args.out / "kernel_cache.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
