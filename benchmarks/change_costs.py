"""Costs that must follow the change, not the index: deleting documents one by one while
tombstones pile up, the first filtered query after a write, and a keyword query under a
broad filter.

    python benchmarks/change_costs.py [--rows 200000] [--segments 8] [--rounds 12]

Each is timed side by side in one process against the step it replaced (that step restored
for the run by patching it in, the two alternating), on an index built as ``store_scale.py``
builds one (SciFact sentences as texts, four nodes per document, ``doc_id`` metadata):

* **delete**: ingest deletes a changed or removed document with one ``store.delete`` each.
  ``before``: every call re-sorted all of a segment's tombstones (``np.setdiff1d`` and
  ``np.union1d``). Two copies of the index take the same deletions, chunk by chunk.
* **filter after a write**: a write empties the store's filter cache, and a new version
  starts with none. ``before``: each segment's rows were scanned again, texts and all
  (``ORDER BY faiss_id`` kept SQLite off the metadata index, and no answer was kept by the
  segment). Both a filter asked before (a tenant's) and a new one (one document's).
* **keyword query, broad filter**: ``doc_id != ...`` allows nearly every row. ``before``:
  each segment looked up every allowed id of the whole index.
* **keyword query over tombstones**: after the deletions, keyword queries on the index whose
  statistics leave deleted rows out (``this code``: their postings counted per query token,
  once per version) against statistics over every row, deleted or not (``before``).

Results: benchmarks/results/change_costs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters
from machine import cpu_model
from store_scale import DIM, SCIFACT_HELP, build, sentences, texts_used

from indexes import FaissVectorStore, segments
from indexes.live import LiveSegment

RESULTS = Path(__file__).resolve().parent / "results"
NEW_DELETE, NEW_SELECT, NEW_MASK = LiveSegment.delete, segments.SegmentReader.select, LiveSegment.keyword_mask
NEW_TOMBSTONES = LiveSegment.keyword_tombstones


def delete_before(self: LiveSegment, faiss_ids: np.ndarray) -> int:
    """``LiveSegment.delete`` as it was: the whole tombstone list re-sorted at each call."""
    held = self.reader.holds(faiss_ids)
    if len(held) == 0:
        return 0
    fresh = np.setdiff1d(held, self.deleted)
    if len(fresh) == 0:
        return 0
    self.deleted = np.union1d(self.deleted, fresh)
    self.changed = True
    self._kw_mask = None
    self.view._dead.update(int(i) for i in fresh)
    self.view._dead_arr = None
    self.view._replica_stale = True
    return len(fresh)


def select_before(self, where, params, *, key=None, node_ids=None, ref_doc_ids=None) -> np.ndarray:
    """A segment's filter as it was read: the table in id order, nothing kept."""
    sql = f"SELECT faiss_id FROM nodes WHERE ({where}) ORDER BY faiss_id"
    with self.rows_lock:
        return np.fromiter((row[0] for row in self.rows._conn.execute(sql, list(params))), dtype=np.int64)


def keyword_mask_before(self: LiveSegment, allowed: np.ndarray | None) -> np.ndarray | None:
    """``LiveSegment.keyword_mask`` as it was: every allowed id of the index looked up."""
    if allowed is None:
        return NEW_MASK(self, None)
    mask = np.zeros(self.reader.record.rows, dtype=bool)
    mask[self.reader.positions(allowed)] = True
    if len(self.deleted):
        mask[self.reader.positions(self.deleted)] = False
    return mask


def use(variant: str) -> None:
    before = variant == "before"
    LiveSegment.delete = delete_before if before else NEW_DELETE
    segments.SegmentReader.select = select_before if before else NEW_SELECT
    LiveSegment.keyword_mask = keyword_mask_before if before else NEW_MASK
    LiveSegment.keyword_tombstones = (lambda self: None) if before else NEW_TOMBSTONES


def forget_kept_answers(store: FaissVectorStore) -> None:
    """What a write does to the store's cache (and what `before` had no other cache for)."""
    store._filter_cache.clear()


def eq(key: str, value: str, operator: FilterOperator = FilterOperator.EQ) -> MetadataFilters:
    return MetadataFilters(filters=[MetadataFilter(key=key, value=value, operator=operator)])


def measure_deletes(path: Path, share: float, chunk: int) -> tuple[list[dict], FaissVectorStore]:
    """ms per document deleted, chunk by chunk, the two variants on copies of the index."""
    copies = {}
    for variant in ("this code", "before"):
        shutil.copytree(path, path.parent / variant.replace(" ", "_"))
        copies[variant] = FaissVectorStore.open(path.parent / variant.replace(" ", "_"))
    docs = sorted({f"d{i // 4}" for i in range(copies["before"].count)})
    doomed = np.random.default_rng(7).permutation(docs)[: int(share * len(docs))]
    rows = []
    for start in range(0, len(doomed), chunk):
        part = doomed[start:start + chunk]
        order = ("this code", "before") if (start // chunk) % 2 == 0 else ("before", "this code")
        for variant in order:
            use(variant)
            store = copies[variant]
            began = time.perf_counter()
            for doc in part:
                store.delete(str(doc))
            spent = time.perf_counter() - began
            held = sum(len(s.deleted) for s in store._segments)
            rows.append({"variant": variant, "deleted_docs": start + len(part), "tombstones": held,
                         "chunk_docs": len(part), "ms_per_delete": round(1000 * spent / len(part), 3)})
            print(rows[-1], flush=True)
    use("this code")
    return rows, copies["this code"]


def deletion_seconds(deletes: list[dict]) -> dict[str, float]:
    """Seconds all deletions took per variant: each chunk's ms per delete times its own size (the
    last chunk is smaller; rows written before ``chunk_docs`` was recorded give it by difference)."""
    totals = {"this code": 0.0, "before": 0.0}
    done = dict.fromkeys(totals, 0)
    for row in deletes:
        size = row.get("chunk_docs", row["deleted_docs"] - done[row["variant"]])
        done[row["variant"]] = row["deleted_docs"]
        totals[row["variant"]] += row["ms_per_delete"] * size / 1000
    return totals


def measure_keywords_over_tombstones(store: FaissVectorStore, queries: list[str]) -> list[dict]:
    """Keyword query latency on a store holding tombstones, the two statistics alternating:
    the first pass (each query token's deleted postings counted) and later ones (kept)."""
    times: dict[tuple[str, str], list[float]] = {}
    for rep, label in ((0, "first time for its tokens"), (1, "tokens seen before")):
        for qi, text in enumerate(queries):
            for variant in (("this code", "before") if (qi + rep) % 2 == 0 else ("before", "this code")):
                use(variant)
                began = time.perf_counter()
                store.retrieve("sparse", 10, text=text)
                times.setdefault((label, variant), []).append(time.perf_counter() - began)
    use("this code")
    return [{"query": f"keyword query, 30% deleted ({label})", "variant": variant,
             "p50_ms": round(1000 * statistics.median(t), 2), "max_ms": round(1000 * max(t), 2)}
            for (label, variant), t in times.items()]


def measure_filters(path: Path, rounds: int) -> list[dict]:
    """The first filtered dense query after a write, and a keyword query under a broad filter."""
    store = FaissVectorStore.open(path)
    centres = np.load(path / "centres.npy")
    rng = np.random.default_rng(3)
    docs = store.count // 4
    tenant = eq("doc_id", "d1001")
    broad = eq("doc_id", "d1001", FilterOperator.NE)
    query = (centres[0] / np.linalg.norm(centres[0]))[None, :].astype(np.float32)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        store.add([TextNode(id_=f"w{r}", text="a written node", metadata={"doc_id": "d1001"},
                            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id="d1001")})],
                  embeddings=query)
        new_filter = eq("doc_id", f"d{int(rng.integers(docs))}")
        for variant in (("this code", "before") if r % 2 == 0 else ("before", "this code")):
            use(variant)
            for label, filters in (("asked before, after a write", tenant), ("a new filter", new_filter)):
                forget_kept_answers(store)
                began = time.perf_counter()
                store.search(query, 10, filters=filters)
                times.setdefault((label, variant), []).append(time.perf_counter() - began)
            store.retrieve("sparse", 10, text="cell protein expression", filters=broad)  # the allowed ids cached
            began = time.perf_counter()
            store.retrieve("sparse", 10, text="cell protein expression", filters=broad)
            times.setdefault(("keyword query, broad filter (cached)", variant), []).append(time.perf_counter() - began)
    use("this code")
    return [{"query": label, "variant": variant, "p50_ms": round(1000 * statistics.median(t), 2),
             "max_ms": round(1000 * max(t), 2)} for (label, variant), t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=SCIFACT_HELP)
    parser.add_argument("--rows", type=int, default=200_000, help="nodes of the index")
    parser.add_argument("--segments", type=int, default=8, help="segments they are written as")
    parser.add_argument("--rounds", type=int, default=12, help="writes, each followed by the filtered queries")
    parser.add_argument("--delete-share", type=float, default=0.3, help="share of the documents deleted")
    parser.add_argument("--chunk", type=int, default=1000, help="deletions timed together")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)  # before the run: a bad --out fails now, not after it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index"
        build(path, args.rows, args.rows // args.segments)
        shutil.copy(path / "centres.npy", Path(tmp) / "centres.npy")
        structures = sorted({s["structure"] for s in FaissVectorStore.open(path).segment_summary()})
        filters = measure_filters(path, args.rounds)
        deletes, deleted_store = measure_deletes(path, args.delete_share, args.chunk)
        pool = sentences()
        filters += measure_keywords_over_tombstones(deleted_store, [pool[(37 * i) % len(pool)] for i in range(60)])
    result = {"cpu": cpu_model(), "rows": args.rows, "segments": args.segments, "dim": DIM, "texts": texts_used(),
              "structures": structures, "filters": filters, "deletes": deletes}
    (args.out / "change_costs.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Costs that follow the change ({result['cpu']})", "",
             f"{args.rows:,} nodes in {args.segments} segments ({', '.join(structures)}), {DIM}-d, {result['texts']}; the two "
             "variants alternating in one process.", "",
             f"Queries ({args.rounds} writes of one node, each followed by the filtered ones; 60 keyword "
             "queries over the index after the deletions below):", "",
             "| query | this code p50 / max | before p50 / max | before / this |", "|---|---|---|---|"]
    for label in dict.fromkeys(row["query"] for row in filters):
        this, before = (next(r for r in filters if (r["query"], r["variant"]) == (label, v))
                        for v in ("this code", "before"))
        lines.append(f"| {label} | {this['p50_ms']:.2f} / {this['max_ms']:.2f} ms | {before['p50_ms']:.2f} / "
                     f"{before['max_ms']:.2f} ms | {before['p50_ms'] / max(this['p50_ms'], 1e-9):.1f}x |")
    lines += ["", f"Deleting {args.delete_share:.0%} of the documents one `store.delete` each, {args.chunk} a chunk:",
              "", "| documents deleted | tombstones | this code ms / delete | before ms / delete |", "|---|---|---|---|"]
    for row in (r for r in deletes if r["variant"] == "this code"):
        other = next(r for r in deletes if r["variant"] == "before" and r["deleted_docs"] == row["deleted_docs"])
        lines.append(f"| {row['deleted_docs']:,} | {row['tombstones']:,} | {row['ms_per_delete']:.3f} | "
                     f"{other['ms_per_delete']:.3f} |")
    totals = deletion_seconds(deletes)
    lines += ["", f"All deletions: this code {totals['this code']:.3g} s, before {totals['before']:.3g} s."]
    from results_file import write_markdown

    write_markdown(args.out / "change_costs.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
