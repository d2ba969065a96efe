"""Dense recall on an IVF segment as its rows are deleted, before compaction.

    python benchmarks/tombstone_recall.py [--rows 40000] [--queries 200]

A segment too large for the merge policy's inline rewrite (over ``max_inline_rows``) keeps its
deleted rows as tombstones until ``htp-index compact`` (smaller ones keep up to 20%). An IVF
search walks past them, so the probed lists hold only their live share of candidates: the
probe calibrated for recall@10 on all rows falls short. ``kinds.probes_for`` grows the probe by
the inverse of the live share, and the selector that skips tombstones is built once per set of
tombstones (``VectorIndex._live_selector``), not at every search. Three variants, side by side
in one process (queries rotating between them), at several deleted shares and at k = 10 and
100 (the dense depth of a hybrid query):

* ``this code``: live-share probe, selector kept;
* ``calibrated probe``: the stored probe alone, selector kept;
* ``code before``: the stored probe alone, selector built at every search.

Recall is against exact search over the live rows (their top min(k, live rows)).

The segment is one ``auto`` IVF segment of clustered unit vectors (128 clusters, 64-d); rows
are deleted at random. Results: benchmarks/results/tombstone_recall.{json,md} (``--out``: another
folder); the file's ``## Notes`` are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from llama_index.core.schema import TextNode
from machine import cpu_model
from results_file import write_markdown
from store_scale import clustered

from indexes import FaissVectorStore, MergePolicy, kinds
from indexes.vectors import VectorIndex

RESULTS = Path(__file__).resolve().parent / "results"
DIM, CLUSTERS = 64, 128
DELETED = (0.0, 0.5, 0.8, 0.9, 0.98)
RULES = ("this code", "calibrated probe", "code before")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40_000, help="rows of the segment")
    parser.add_argument("--queries", type=int, default=200, help="queries per setting")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, DIM)).astype(np.float32)
    x, queries = (clustered(np.random.default_rng(seed), n, centres, spread=0.5) for seed, n in ((1, args.rows), (2, args.queries)))
    share_rule = kinds.probes_for

    kept_selector = VectorIndex._live_selector

    def calibrated(ivf, k, searchable=1.0):  # the rule before: the live share ignored
        return share_rule(ivf, k)

    def built_each_time(self):  # as before: a new selector over every tombstone at each search
        self._dead_selector = None
        return kept_selector(self)

    variants = {"this code": (share_rule, kept_selector), "calibrated probe": (calibrated, kept_selector),
                "code before": (calibrated, built_each_time)}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = FaissVectorStore.create(Path(tmp) / "idx", dim=DIM, encoder={"model": "synthetic"},
                                        merge_policy=MergePolicy(max_deleted_fraction=1.0))  # keep tombstones
        store.add([TextNode(id_=f"n{i}", text="t", embedding=x[i].tolist()) for i in range(args.rows)])
        store.persist()
        structure = store.segment_summary()[0]["structure"]
        live = np.ones(args.rows, bool)
        order = np.random.default_rng(3).permutation(args.rows)
        for deleted in DELETED:
            kill = order[int(live.size - live.sum()) : int(deleted * args.rows)]
            if len(kill):
                store.delete_nodes([f"n{i}" for i in kill])
                store.persist()
                live[kill] = False
            candidates = np.flatnonzero(live)
            for k in (10, 100):
                found = {rule: ([], []) for rule in RULES}
                for qi, query in enumerate(queries):
                    exact = set(candidates[np.argsort(-(x[candidates] @ query))[:k]].tolist())
                    for rule in RULES[qi % 3:] + RULES[: qi % 3]:
                        kinds.probes_for, VectorIndex._live_selector = variants[rule]
                        began = time.perf_counter()
                        hits = store.search(query[None, :], k)[0]
                        found[rule][0].append(time.perf_counter() - began)
                        found[rule][1].append(len({int(h[0][1:]) for h in hits} & exact) / len(exact))
                kinds.probes_for, VectorIndex._live_selector = variants["this code"]
                for rule, (times, recalls) in found.items():
                    row = {"deleted": deleted, "k": k, "rule": rule, "recall_mean": round(float(np.mean(recalls)), 3),
                           "recall_min": round(float(np.min(recalls)), 2),
                           "p50_ms": round(1000 * statistics.median(times), 2)}
                    rows.append(row)
                    print(row, flush=True)
    result = {"cpu": cpu_model(), "rows": args.rows, "queries": args.queries, "structure": structure, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tombstone_recall.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Dense recall on an IVF segment with tombstones ({result['cpu']})", "",
             f"One {structure} segment of {args.rows:,} clustered 64-d rows, rows deleted at random and not "
             f"compacted; {args.queries} queries, the variants rotating query by query; recall "
             "against exact search over the live rows.", "",
             "| deleted | k | " + " | ".join(f"{rule}: recall mean / min | p50" for rule in RULES) + " |",
             "|---|---|" + "---|---|" * len(RULES)]
    for deleted in DELETED:
        for k in (10, 100):
            cells = []
            for rule in RULES:
                r = next(r for r in rows if (r["deleted"], r["k"], r["rule"]) == (deleted, k, rule))
                cells.append(f"{r['recall_mean']:.3f} / {r['recall_min']:.2f} | {r['p50_ms']:.2f} ms")
            lines.append(f"| {deleted:.0%} | {k} | " + " | ".join(cells) + " |")
    write_markdown(args.out / "tombstone_recall.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
