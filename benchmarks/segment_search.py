"""What one query costs per segment: how segments are written and searched, side by side.

A query visits every segment of an index, so whatever a segment costs is paid once per
segment: at 100k nodes as ingested (5 segments of 20k), a hybrid query's store work was 4.2 ms
against 2.4 ms for the same index compacted to one segment, and an index ingested 1,500 nodes
a commit held nine flat (exact) segments of 15,000 rows at 135k nodes. Three rules cut that
work; this benchmark compares each with the behaviour it replaced.

* **Writing** (`indexes.ann.wants_ivf`): once an index holds ``auto_ivf_rows`` rows, every
  segment of ``auto_ivf_segment_rows`` rows is IVF, not only those of ``auto_ivf_rows``. Each
  ``--indexes SIZE:BATCH`` is built as ``store_scale.py`` builds it (``BATCH`` nodes per
  persist, so the merge policy runs; SciFact sentences, clustered 640-d vectors) with the
  defaults, and, where that made any segment IVF that the old rule kept flat, again with
  ``auto_ivf_segment_rows = auto_ivf_rows`` (the old rule). Dense recall@10 against exact
  search is measured on each build.
* **Searching**, in one process, interleaved query by query in rotating order (the rules are
  module constants, so every variant runs the same code):
  - keywords: a segment holding at most ``SCAN_POSTINGS`` postings of the query's tokens is
    scanned in one pass instead of pruned by MaxScore (``0`` = never scan, the old rule;
    ``inf`` = always scan). A second table times both on one segment at a time against the
    postings a query holds there: where the constant comes from;
  - dense: an IVF segment probes enough lists to hold ``PROBED_ROWS_PER_HIT * k`` rows (``0``
    = the stored nprobe alone, the old rule, which searched a short answer a second time).

Keyword hits must be identical in every variant (the scan is exact); dense and hybrid overlap
with the old rules is reported (a wider probe finds more true neighbours, so it may differ).
Built indexes are kept in ``--workdir`` for the next run. Results:
benchmarks/results/segment_search.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model
from results_file import write_markdown
from store_scale import SCIFACT_HELP, _batches, build, clustered, queries, texts_used

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "before (prune only, stored nprobe)": {"scan": 0.0, "probe": 0},
    "keyword scan rule": {"scan": None, "probe": 0},
    "both rules (default)": {"scan": None, "probe": None},
    "always scan, probe for k": {"scan": float("inf"), "probe": None},
}

#: What each timed call asks the store: (search mode, k).
MODES = {"dense": ("dense", 5), "keyword": ("sparse", 5), "keyword100": ("sparse", 100), "hybrid": ("hybrid", 5)}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure(path: Path, n_queries: int, crossover: bool = True) -> dict:
    from indexes import FaissVectorStore, keywords, kinds

    defaults = {"scan": keywords.SCAN_POSTINGS, "probe": kinds.PROBED_ROWS_PER_HIT}

    def use(variant: dict) -> None:
        keywords.SCAN_POSTINGS = defaults["scan"] if variant["scan"] is None else variant["scan"]
        kinds.PROBED_ROWS_PER_HIT = defaults["probe"] if variant["probe"] is None else variant["probe"]

    store = FaissVectorStore.open(path, use_gpu=False)
    texts = queries(n_queries)
    vectors = clustered(np.random.default_rng(2), len(texts), np.load(path / "centres.npy"))
    lat = {name: {m: [] for m in ("dense", "keyword", "keyword100", "hybrid")} for name in VARIANTS}
    answers: dict[str, dict[str, list]] = {name: {"keyword": [], "keyword100": [], "dense": [], "hybrid": []}
                                           for name in VARIANTS}
    warm = min(20, len(texts) // 5)
    for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        names = list(VARIANTS)
        names = names[i % len(names):] + names[: i % len(names)]  # the first to touch a list pays its page faults
        for name in names:  # interleaved: noise hits every variant alike
            use(VARIANTS[name])
            for mode, (search_mode, k) in MODES.items():
                began = time.perf_counter()
                found = store.retrieve(search_mode, k, embedding=vector, text=text)
                took = (time.perf_counter() - began) * 1000
                if i >= warm:
                    lat[name][mode].append(took)
                answers[name][mode].append([(row.node_id, round(score, 9)) for row, score in found])
    use({"scan": None, "probe": None})
    base = answers[next(iter(VARIANTS))]
    summary = store.segment_summary()
    out = {"nodes": store.count, "segments": store.segment_count,
           "flat_rows": sum(s["rows"] for s in summary if "IVF" not in s["structure"]),
           "segment_structures": [(s["rows"], s["structure"]) for s in summary], "queries": len(texts) - warm,
           "recall_at_10": dense_recall(store, vectors[warm:]),
           "variants": {}, "one_segment": one_segment(store, texts[warm:]) if crossover else []}
    for name in VARIANTS:
        row = {f"{m}_p50_ms": statistics.median(v) for m, v in lat[name].items()}
        row |= {f"{m}_p95_ms": pct(v, 95) for m, v in lat[name].items()}
        for mode in ("keyword", "keyword100"):
            row[f"{mode}_identical"] = answers[name][mode] == base[mode]
        for mode in ("dense", "hybrid"):
            row[f"{mode}_overlap"] = float(np.mean([
                len({n for n, _ in a} & {n for n, _ in b}) / max(len(b), 1)
                for a, b in zip(answers[name][mode], base[mode], strict=True)
            ]))
        out["variants"][name] = row
    return out


def dense_recall(store, vectors: np.ndarray) -> float:
    """Dense recall@10 with the default rules against exact search over every stored vector."""
    import faiss

    found = [[node_id for node_id, _ in hits] for hits in store.search(vectors, 10)]
    heap = faiss.ResultHeap(len(vectors), 10, keep_max=True)
    names: list[str] = []
    for node_ids, block in _batches(store):
        base = len(names)
        names.extend(node_ids)
        scores, positions = faiss.knn(np.ascontiguousarray(vectors, dtype=np.float32), block, 10,
                                      metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(positions >= 0, positions + base, -1))
    heap.finalize()
    truth = [{names[j] for j in row if j >= 0} for row in heap.I]
    return float(np.mean([len(set(a) & b) / 10 for a, b in zip(found, truth, strict=True)]))


def time_both(segment, terms: list, avgdl: float, k: int) -> tuple[float, float]:
    """ms of MaxScore (its bounds included) and of the scan on one segment, best of two each."""
    from indexes import keywords

    def prune() -> None:
        bounded = keywords._bounded(segment, terms, avgdl)
        keywords._maxscore_segment(0, segment, bounded, None, avgdl, keywords._TopK(k))

    def scan() -> None:
        keywords._scan_segment(0, segment, terms, None, avgdl, keywords._TopK(k))

    best = {}
    for name, search in (("prune", prune), ("scan", scan)) * 2:
        began = time.perf_counter()
        search()
        best[name] = min(best.get(name, np.inf), (time.perf_counter() - began) * 1000)
    return best["prune"], best["scan"]


def one_segment(store, texts: list[str], bins: int = 5) -> list[dict]:
    """MaxScore and the scan on the largest segment alone (a fresh top k, the best of two runs
    each), by the postings the query's tokens hold there, in quantile bins."""
    from indexes import keywords

    segment = max(store._segments, key=lambda s: s.live).reader.keywords
    timed = []
    for k in (10, 100):
        for text in texts:
            stats = keywords._stats([segment], text)
            terms = keywords._segment_terms(segment, stats, stats.ids[0]) if stats else []
            if not terms:
                continue
            timed.append((k, sum(t.end - t.start for t in terms), *time_both(segment, terms, stats.avgdl, k)))
    table = np.array(timed)
    out = []
    for k in (10, 100):
        part = table[table[:, 0] == k]
        edges = np.quantile(part[:, 1], np.linspace(0, 1, bins + 1))
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            chosen = part[(part[:, 1] >= low) & (part[:, 1] <= high)]
            out.append({"rows": segment.rows, "k": k, "postings_from": int(low), "postings_to": int(high),
                        "prune_ms": float(np.median(chosen[:, 2])), "scan_ms": float(np.median(chosen[:, 3])),
                        "scan_vs_prune": float(np.median(chosen[:, 3] / chosen[:, 2]))})
    return out


def markdown(rows: list[dict], n_queries: int) -> str:
    lines = [
        f"# Per-segment query costs: how segments are written and searched ({cpu_model()})",
        "",
        f"Store work of one query through `retrieve` (top 5; keyword also top 100, the hybrid's "
        f"candidate depth), {n_queries} queries ({texts_used()}), search variants interleaved query by query in "
        "one process; p50 / p95 in ms. Indexes built as `store_scale.py` builds them, with nodes per "
        "commit as given; `old IVF rule`: built with `auto_ivf_segment_rows = auto_ivf_rows` (segments "
        "below 16,384 rows stay flat in any index).",
        "",
        "| nodes (per commit) | build | segments (flat rows) | recall@10 | search variant | dense | keyword "
        "| keyword top 100 | hybrid | hybrid p50: before / this | keyword identical | dense / hybrid overlap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first: dict[tuple, float] = {}
    # per index, the old rule's build first: its first row is the behaviour before all three rules
    for r in sorted(rows, key=lambda r: (r["nodes"], r["batch"], r["build"] != "old IVF rule")):
        key = (r["nodes"], r["batch"])
        for name, v in r["variants"].items():
            first.setdefault(key, v["hybrid_p50_ms"])
            lines.append(
                f"| {r['nodes']:,} ({r['batch']:,}) | {r['build']} | {r['segments']} ({r['flat_rows']:,}) "
                f"| {r['recall_at_10']:.3f} | {name} "
                f"| {v['dense_p50_ms']:.2f} / {v['dense_p95_ms']:.2f} "
                f"| {v['keyword_p50_ms']:.2f} / {v['keyword_p95_ms']:.2f} "
                f"| {v['keyword100_p50_ms']:.2f} / {v['keyword100_p95_ms']:.2f} "
                f"| {v['hybrid_p50_ms']:.2f} / {v['hybrid_p95_ms']:.2f} "
                f"| {first[key] / v['hybrid_p50_ms']:.2f}x "
                f"| {'yes' if v['keyword_identical'] and v['keyword100_identical'] else 'NO'} "
                f"| {v['dense_overlap']:.3f} / {v['hybrid_overlap']:.3f} |"
            )
    lines += [
        "",
        "One segment alone (its largest), MaxScore against the scan, by the postings the query's "
        "tokens hold in it (quantile bins; median ms):",
        "",
        "| segment rows | k | postings | MaxScore | scan | scan / MaxScore |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for b in r["one_segment"]:
            lines.append(f"| {b['rows']:,} | {b['k']} | {b['postings_from']:,}-{b['postings_to']:,} "
                         f"| {b['prune_ms']:.3f} | {b['scan_ms']:.3f} | {b['scan_vs_prune']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from indexes import IndexParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=SCIFACT_HELP)
    parser.add_argument("--indexes", nargs="+", default=["100000:20000", "135000:1500"],
                        help="indexes to build and measure, as NODES:NODES_PER_COMMIT")
    parser.add_argument("--queries", type=int, default=300, help="SciFact queries per index (the first min(20, N/5) warm up)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "htp-index-benchmarks",
                        help="where indexes are built, and found again by the next run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()
    old_rule = {"auto_ivf_segment_rows": IndexParams().auto_ivf_rows}
    rows = []
    for spec in args.indexes:
        size, batch = (int(part) for part in spec.split(":"))
        builds = {"defaults": None, "old IVF rule": old_rule}
        for build_name, params in builds.items():
            path = args.workdir / f"segment_search_{size}_{batch}{'_old_ivf_rule' if params else ''}"
            if params and not any("IVF" in structure and count < old_rule["auto_ivf_segment_rows"]
                                  for count, structure in rows[-1]["segment_structures"]):
                break  # the old rule would write the same segments: nothing to compare
            if not (path / "centres.npy").is_file():
                print(f"building {size:,} nodes, {batch:,} per commit, {build_name}, in {path}", flush=True)
                build(path, size, batch, params=params)
            # the keyword crossover once per index: both builds hold the same postings
            row = {"batch": batch, "build": build_name, **measure(path, args.queries, crossover=params is None)}
            rows.append(row)
            for name, v in row["variants"].items():
                print(f"{size:,}/{batch:,} {build_name} ({row['segments']} segments, {row['flat_rows']:,} flat rows) "
                      f"{name}: hybrid p50 {v['hybrid_p50_ms']:.2f} ms, keyword {v['keyword_p50_ms']:.2f}, "
                      f"dense {v['dense_p50_ms']:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "segment_search.json").write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2))
    text = markdown(rows, rows[0]["queries"] if rows else 0)
    write_markdown(args.out / "segment_search.md", text)
    print(text)


if __name__ == "__main__":
    main()
