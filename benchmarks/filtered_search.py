"""A filtered dense search (a tenant's share of the index) against an unfiltered one.

    python benchmarks/filtered_search.py [--rows 100000] [--segments 4] [--queries 200]

A RAG app that serves several tenants filters every query (``tenant == "t1"``). The store
selects the allowed ids once per filter (cached by the filter), then each segment searches
inside them: an IVF segment with a FAISS ``IDSelectorBatch`` over its allowed ids. Each
segment's ids used to be put through ``np.unique`` on every search although the store hands
them over sorted (``vectors._ascending_unique`` now checks that instead). Two variants side by
side in one process, queries alternating: ``this code`` and ``np.unique`` (the step before).

The index: ``--segments`` IVF segments of clustered unit vectors (64-d), four tenants in turn.
Recall@k is against exact search over the tenant's rows. Results:
benchmarks/results/filtered_search.{json,md}.
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
from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters
from machine import cpu_model
from store_scale import clustered

from indexes import FaissVectorStore, vectors

RESULTS = Path(__file__).resolve().parent / "results"
DIM, CLUSTERS, TENANTS = 64, 128, 4
VARIANTS = {"this code": vectors._ascending_unique, "np.unique": np.unique}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the index")
    parser.add_argument("--segments", type=int, default=4, help="segments they are written as")
    parser.add_argument("--queries", type=int, default=200, help="queries per setting")
    args = parser.parse_args()
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, DIM)).astype(np.float32)
    x, queries = (clustered(np.random.default_rng(seed), n, centres, spread=0.5) for seed, n in ((1, args.rows), (2, args.queries)))
    tenant = np.arange(args.rows) % TENANTS
    one_tenant = MetadataFilters(filters=[MetadataFilter(key="tenant", value="t1", operator=FilterOperator.EQ)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = FaissVectorStore.create(Path(tmp) / "idx", dim=DIM, encoder={"model": "synthetic"})
        step = args.rows // args.segments
        for start in range(0, args.rows, step):
            store.add([TextNode(id_=f"n{i}", text="t", metadata={"tenant": f"t{tenant[i]}"}, embedding=x[i].tolist())
                       for i in range(start, min(start + step, args.rows))])
            store.persist()
        structures = sorted({s["structure"] for s in store.segment_summary()})
        for label, filters, allowed in (("all rows", None, np.ones(args.rows, bool)),
                                        ("one tenant (1/4)", one_tenant, tenant == 1)):
            candidates = np.flatnonzero(allowed)
            for k in (10, 100):
                found = {name: ([], []) for name in VARIANTS}
                for qi, query in enumerate(queries):
                    exact = set(candidates[np.argsort(-(x[candidates] @ query))[:k]].tolist())
                    for name in (list(VARIANTS) if qi % 2 == 0 else list(VARIANTS)[::-1]):
                        vectors._ascending_unique = VARIANTS[name]
                        began = time.perf_counter()
                        hits = store.search(query[None, :], k, filters=filters)[0]
                        found[name][0].append(time.perf_counter() - began)
                        found[name][1].append(len({int(h[0][1:]) for h in hits} & exact) / k)
                vectors._ascending_unique = VARIANTS["this code"]
                for name, (times, recalls) in found.items():
                    row = {"search": label, "k": k, "variant": name, "p50_ms": round(1000 * statistics.median(times), 2),
                           "recall": round(float(np.mean(recalls)), 3)}
                    rows.append(row)
                    print(row, flush=True)
    result = {"cpu": cpu_model(), "rows": args.rows, "segments": args.segments, "structures": structures, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "filtered_search.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Filtered dense search ({result['cpu']})", "",
             f"{args.rows:,} clustered 64-d rows in {args.segments} segments ({', '.join(structures)}), four tenants in "
             f"turn; {args.queries} queries, the variants alternating query by query.", "",
             "| search | k | " + " | ".join(f"{name}: p50 | recall" for name in VARIANTS) + " |",
             "|---|---|" + "---|---|" * len(VARIANTS)]
    for label in ("all rows", "one tenant (1/4)"):
        for k in (10, 100):
            cells = [next(f"{r['p50_ms']:.2f} ms | {r['recall']:.3f}" for r in rows
                          if (r["search"], r["k"], r["variant"]) == (label, k, name)) for name in VARIANTS]
            lines.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    (RESULTS / "filtered_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
