"""A filtered dense search (a tenant's share of the index) against an unfiltered one.

    python benchmarks/filtered_search.py [--rows 100000] [--segments 4] [--queries 200]

A RAG app that serves several tenants filters every query (``tenant == "t1"``). The store
selects the allowed ids once per filter (cached by the filter), then each segment searches
inside them: an IVF segment with a FAISS ``IDSelectorBatch`` over its allowed ids. Each
segment searched a filter's rows with the probe calibrated for all rows, though the probed
lists hold only the filter's share of candidates; the probe now grows by the inverse of that
share, and a filter the grown probe would scan more rows than it allows is searched exactly.
Two variants side by side in one process, queries alternating: ``this code`` and ``stored
probe`` (the step before: the calibrated probe whatever the filter).

The index: ``--segments`` IVF segments of clustered unit vectors (64-d); a tenant is a quarter
of the rows, a shard a tenth (both in turn). Recall@k is against exact search over the
allowed rows. Results: benchmarks/results/filtered_search.{json,md}.
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
from results_file import write_markdown
from store_scale import clustered

from indexes import FaissVectorStore, kinds, vectors

RESULTS = Path(__file__).resolve().parent / "results"
DIM, CLUSTERS, TENANTS, SHARDS = 64, 128, 4, 10
VARIANTS = ("this code", "stored probe")
_PROBES_FOR, _ROWS_PROBED = kinds.probes_for, vectors.VectorIndex._rows_probed


def _use(variant: str) -> None:
    """The code of ``variant``: the index has no tombstones, so a searchable share below 1
    comes from the filter alone, which the step before did not pass on."""
    if variant == "this code":
        kinds.probes_for, vectors.VectorIndex._rows_probed = _PROBES_FOR, _ROWS_PROBED
    else:
        kinds.probes_for = lambda ivf, k, searchable=1.0: _PROBES_FOR(ivf, k, 1.0)
        vectors.VectorIndex._rows_probed = lambda self, k, searchable: 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the index")
    parser.add_argument("--segments", type=int, default=4, help="segments they are written as")
    parser.add_argument("--queries", type=int, default=200, help="queries per setting")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, DIM)).astype(np.float32)
    x, queries = (clustered(np.random.default_rng(seed), n, centres, spread=0.5) for seed, n in ((1, args.rows), (2, args.queries)))
    tenant, shard = np.arange(args.rows) % TENANTS, np.arange(args.rows) % SHARDS
    one_tenant = MetadataFilters(filters=[MetadataFilter(key="tenant", value="t1", operator=FilterOperator.EQ)])
    one_shard = MetadataFilters(filters=[MetadataFilter(key="shard", value=3, operator=FilterOperator.EQ)])
    searches = (("all rows", None, np.ones(args.rows, bool)), ("one tenant (1/4)", one_tenant, tenant == 1),
                ("one shard (1/10)", one_shard, shard == 3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = FaissVectorStore.create(Path(tmp) / "idx", dim=DIM, encoder={"model": "synthetic"})
        step = args.rows // args.segments
        for start in range(0, args.rows, step):
            store.add([TextNode(id_=f"n{i}", text="t", metadata={"tenant": f"t{tenant[i]}", "shard": int(shard[i])}, embedding=x[i].tolist())
                       for i in range(start, min(start + step, args.rows))])
            store.persist()
        structures = sorted({s["structure"] for s in store.segment_summary()})
        for label, filters, allowed in searches:
            candidates = np.flatnonzero(allowed)
            for k in (10, 100):
                found = {name: ([], []) for name in VARIANTS}
                for qi, query in enumerate(queries):
                    exact = set(candidates[np.argsort(-(x[candidates] @ query))[:k]].tolist())
                    for name in (list(VARIANTS) if qi % 2 == 0 else list(VARIANTS)[::-1]):
                        _use(name)
                        began = time.perf_counter()
                        hits = store.search(query[None, :], k, filters=filters)[0]
                        found[name][0].append(time.perf_counter() - began)
                        found[name][1].append(len({int(h[0][1:]) for h in hits} & exact) / len(exact))
                _use("this code")
                for name, (times, recalls) in found.items():
                    row = {"search": label, "k": k, "variant": name, "p50_ms": round(1000 * statistics.median(times), 2),
                           "recall": round(float(np.mean(recalls)), 3)}
                    rows.append(row)
                    print(row, flush=True)
    result = {"cpu": cpu_model(), "rows": args.rows, "segments": args.segments, "structures": structures, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "filtered_search.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Filtered dense search ({result['cpu']})", "",
             f"{args.rows:,} clustered 64-d rows in {args.segments} segments ({', '.join(structures)}); a tenant "
             f"is 1/4 of the rows, a shard 1/10; {args.queries} queries, the variants alternating query by query.", "",
             "| search | k | " + " | ".join(f"{name}: p50 | recall" for name in VARIANTS) + " |",
             "|---|---|" + "---|---|" * len(VARIANTS)]
    for label, _, _ in searches:
        for k in (10, 100):
            cells = [next(f"{r['p50_ms']:.2f} ms | {r['recall']:.3f}" for r in rows
                          if (r["search"], r["k"], r["variant"]) == (label, k, name)) for name in VARIANTS]
            lines.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    write_markdown(args.out / "filtered_search.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
