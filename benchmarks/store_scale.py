"""Store costs against index size: open, +10 nodes, query latency, recall, disk, memory.

For each N (default 10k and 100k; ``--sizes 10000 100000 1000000``) an index of N nodes is
built through the public store API, as ingest builds one: batches of ``--batch`` nodes, one
persist each (so the merge policy runs as it does in production), 640-d clustered float32
vectors and real texts (sentences of SciFact abstracts when ../shared/data/scifact is there,
else synthetic words, and the results say which). Then, in a fresh process (nothing cached), it measures:

* open time; resident memory after open and peak;
* adding 10 nodes and persisting (a commit of ten nodes);
* p50/p95 of dense, keyword and hybrid queries (top 10; SciFact queries, or synthetic);
* dense recall@10 against exact search (faiss.knn over every vector the queries searched);
* disk use with three versions kept (after three small commits) against one.

The segment and node counts are those of the index as built, before the measurement's own
three commits (which add 30 nodes and up to three segments).

Results go to benchmarks/results/store_scale.{json,md}. Targets (issue 19, at 1M on 2 cores):
open <= 3 s, +10 nodes <= 1 s, keyword p50 <= 20 ms, hybrid p50 <= 30 ms, recall >= 0.95,
3 versions <= 1.2x one, peak RSS <= 1.5x vectors + 0.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
RESULTS = ROOT / "benchmarks" / "results"
SCIFACT_HELP = (f"Texts and queries come from BEIR SciFact (corpus.jsonl, queries.jsonl) at {SCIFACT}, the "
                "checkout's ../shared/data/scifact; without it, synthetic words (the results say which).")
DIM = 640
ENCODER = {"model": "synthetic", "dim": DIM}


def sentences() -> list[str]:
    """Real sentences to make texts of (SciFact when present)."""
    corpus = SCIFACT / "corpus.jsonl"
    if corpus.is_file():
        out = []
        for line in corpus.read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"]
            out.extend(s.strip() for s in text.split(". ") if len(s.split()) > 4)
        return out
    # Drawn as one array (rng.choice on a Python list converts it at every call: minutes).
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 30, size=50_000)
    words = np.char.add("term", rng.integers(0, 20_000, size=int(lengths.sum())).astype(str)).tolist()
    ends = np.cumsum(lengths).tolist()
    return [" ".join(words[end - n : end]) for n, end in zip(lengths.tolist(), ends, strict=True)]


def texts_used() -> str:
    """Which texts ``sentences`` and ``queries`` give, for the results to say."""
    if (SCIFACT / "corpus.jsonl").is_file():
        return "SciFact texts"
    return f"synthetic words (no SciFact at {SCIFACT})"


def queries(n: int) -> list[str]:
    """Query texts (SciFact queries when present)."""
    path = SCIFACT / "queries.jsonl"
    if path.is_file():
        return [json.loads(line)["text"] for line in path.read_text().splitlines()][:n]
    pool = sentences()
    return [pool[i * 7 % len(pool)] for i in range(n)]


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around random centres (of their width): clustered like real embeddings."""
    labels = rng.integers(0, len(centres), size=n)
    x = centres[labels] + spread * rng.standard_normal((n, centres.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(path: Path, n: int, batch: int, encoder: dict | None = None, params: dict | None = None) -> None:
    """An index of ``n`` nodes, ``batch`` nodes per persist, recorded as made by ``encoder``
    (a synthetic identity by default; the service benchmark records a real one so that the
    service loads that model to embed its queries), with ``params`` (`indexes.IndexParams`
    fields) where given."""
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode

    from indexes import FaissVectorStore

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((256, DIM)).astype(np.float32)
    pool = sentences()
    store = FaissVectorStore.create(path, dim=DIM, encoder=encoder or ENCODER, use_gpu=False, params=params)
    began = time.perf_counter()
    for start in range(0, n, batch):
        count = min(batch, n - start)
        x = clustered(rng, count, centres)
        picks = rng.integers(0, len(pool), size=(count, 8))
        nodes = [
            TextNode(
                id_=f"n{start + i}",
                text=" ".join(pool[j] for j in picks[i]),
                metadata={"doc_id": f"d{(start + i) // 4}"},
                relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=f"d{(start + i) // 4}")},
            )
            for i in range(count)
        ]
        store.add(nodes, embeddings=x)
        store.persist()
        print(f"  built {start + count:,}/{n:,} ({time.perf_counter() - began:.0f} s, "
              f"{store.segment_count} segments)", flush=True)
    np.save(path / "centres.npy", centres)


def disk_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: per address space, so unlike ru_maxrss it
    does not inherit the building parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_version_bytes(path: Path) -> int:
    """Bytes of the files the live version names: what one version takes on disk."""
    from indexes import persist, read_manifest

    manifest = read_manifest(path)
    total = sum(r.bytes for seg in manifest.segments for r in seg.files.values())
    total += sum(seg.deletes.bytes for seg in manifest.segments if seg.deletes is not None)
    total += sum(d.bytes for d in manifest.docs)
    vdir = persist.version_dir(path, manifest.version)
    return total + sum(f.stat().st_size for f in vdir.iterdir())


def rss_mib() -> float:
    """Resident memory now."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(path: Path, n_queries: int) -> dict:
    """Run in a fresh process: everything the table reports for one index."""
    from llama_index.core.schema import TextNode
    from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode

    from indexes import FaissVectorStore

    rng = np.random.default_rng(2)
    centres = np.load(path / "centres.npy")
    one_version = live_version_bytes(path)
    rss_before = rss_mib()  # the imports (llama_index, faiss, numpy) are not the index's
    began = time.perf_counter()
    store = FaissVectorStore.open(path, use_gpu=False)
    open_s = time.perf_counter() - began
    rss_open = rss_mib()
    texts = queries(n_queries)
    xq = clustered(rng, len(texts), centres)
    lat: dict[str, list[float]] = {"dense": [], "sparse": [], "hybrid": []}
    modes = {"dense": VectorStoreQueryMode.DEFAULT, "sparse": VectorStoreQueryMode.SPARSE,
             "hybrid": VectorStoreQueryMode.HYBRID}
    dense_ids = []
    for text, vec in zip(texts, xq, strict=True):
        for name, mode in modes.items():  # interleaved, so noise hits every mode alike
            query = VectorStoreQuery(query_embedding=vec.tolist(), query_str=text,
                                     similarity_top_k=10, mode=mode)
            t = time.perf_counter()
            result = store.query(query)
            lat[name].append((time.perf_counter() - t) * 1000)
            if name == "dense":
                dense_ids.append(result.ids)
    # Counted before this measurement's own three commits below add 30 nodes (and segments).
    segments, count = store.segment_count, store.count
    persist_s = []
    added: set[str] = set()
    for round_ in range(3):
        x = clustered(rng, 10, centres)
        nodes = [TextNode(id_=f"extra{round_}_{i}", text=texts[i % len(texts)]) for i in range(10)]
        added.update(node.id_ for node in nodes)
        t = time.perf_counter()
        store.add(nodes, embeddings=x)
        store.persist()
        persist_s.append(time.perf_counter() - t)
    three_versions = disk_bytes(path)
    peak = peak_rss_mib()  # before the ground truth
    # exact ground truth over the vectors the queries searched: not the 30 added since
    truth = exact_top_ids(xq, _batches(store, skip=added), 10)
    recall = recall_at_k(dense_ids, truth, 10)
    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q))
    return {
        "open_s": open_s,
        "add10_persist_s": float(np.median(persist_s)),
        **{f"{m}_p50_ms": pct(v, 50) for m, v in lat.items()},
        **{f"{m}_p95_ms": pct(v, 95) for m, v in lat.items()},
        "recall_at_10": recall,
        "disk_one_version_bytes": one_version,
        "disk_three_versions_ratio": three_versions / one_version,
        "rss_after_open_mib": rss_open - rss_before,
        "peak_rss_mib": peak,
        "imports_rss_mib": rss_before,
        "vectors_mib": count * DIM * 4 / 2**20,
        "segments": segments,
        "count": count,
    }


def exact_top_ids(xq: np.ndarray, batches, k: int) -> list[list[str]]:
    """Exact top-``k`` node ids by inner product for each query, over ``batches`` of (ids,
    vectors) streamed so that no more than one batch is held: the ground truth for recall."""
    import faiss

    heap = faiss.ResultHeap(len(xq), k, keep_max=True)
    names: list[str] = []
    for node_ids, vectors in batches:
        base = len(names)
        names.extend(node_ids)
        d, i = faiss.knn(xq, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, np.where(i >= 0, i + base, -1))
    heap.finalize()
    return [[names[j] for j in row if j >= 0] for row in heap.I]


def recall_at_k(found: list[list[str]], truth: list[list[str]], k: int) -> float:
    """Mean share of each query's exact top ``k`` that the index found (a query whose truth
    holds fewer than ``k`` ids, in a small index, is scored on those)."""
    return float(np.mean([len(set(a) & set(b)) / max(1, min(k, len(b))) for a, b in zip(found, truth, strict=True)]))


def anon_rss_mib() -> float:
    """This process's anonymous resident memory (RssAnon): what the machine must hold, unlike
    the pages of mapped files (segments read for a merge), which the kernel can drop."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def compact(path: Path) -> dict:
    """Run in a fresh process: ``htp-index compact``'s work, its time and peak memory (resident,
    and anonymous sampled every 10 ms)."""
    import threading

    from pipelines.maintenance import compact_index

    anon_peak = [anon_rss_mib()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            anon_peak[0] = max(anon_peak[0], anon_rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    stats = compact_index(path)
    elapsed = time.perf_counter() - began
    done.set()
    sampler.join()
    return {"compact_s": elapsed, "compact_peak_rss_mib": peak_rss_mib(), "compact_peak_anon_mib": anon_peak[0],
            "compact_segments_before": stats.segments_before}


def _child(path: Path, *args: str) -> dict:
    child = subprocess.run(
        [sys.executable, __file__, *args[:1], str(path), *args[1:]],
        check=True, capture_output=True, text=True,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def _batches(store, size: int = 65_536, skip: set[str] = frozenset()):
    ids, vecs = [], []
    for node_id, vector in store.iter_embeddings(batch_size=4096):
        if node_id in skip:
            continue
        ids.append(node_id)
        vecs.append(vector)
        if len(ids) == size:
            yield ids, np.asarray(vecs, dtype=np.float32)
            ids, vecs = [], []
    if ids:
        yield ids, np.asarray(vecs, dtype=np.float32)


def table(rows: list[dict]) -> str:
    """The Markdown table of the results."""
    head = ("| nodes | state | segments | open | +10 nodes | dense p50/p95 | keyword p50/p95 | hybrid p50/p95 "
            "| recall@10 | disk 3 versions | RSS after open | peak RSS (vectors) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {r['count']:,} | {r['state']} | {r['segments']} | {r['open_s']:.2f} s | {r['add10_persist_s']:.2f} s "
        f"| {r['dense_p50_ms']:.1f} / {r['dense_p95_ms']:.1f} ms "
        f"| {r['sparse_p50_ms']:.1f} / {r['sparse_p95_ms']:.1f} ms "
        f"| {r['hybrid_p50_ms']:.1f} / {r['hybrid_p95_ms']:.1f} ms | {r['recall_at_10']:.3f} "
        f"| {r['disk_three_versions_ratio']:.2f}x | {r['rss_after_open_mib']:.0f} MiB "
        f"| {r['peak_rss_mib']:.0f} MiB ({r['vectors_mib']:.0f}) |"
        for r in rows
    ]
    notes = [
        f"- {r['size']:,}: `htp-index compact` of {r['compact_segments_before']} segments took "
        f"{r['compact_s']:.0f} s at a peak of {r['compact_peak_rss_mib']:.0f} MiB"
        + (f" resident, {r['compact_peak_anon_mib']:.0f} MiB of it anonymous (the rest: mapped segment files)."
           if "compact_peak_anon_mib" in r else ".")
        for r in rows if "compact_s" in r
    ]
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=SCIFACT_HELP)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000],
                        help="index sizes (nodes) to build and measure, one after the other")
    parser.add_argument("--batch", type=int, default=20_000, help="nodes per persist while building")
    parser.add_argument("--queries", type=int, default=200, help="queries of each mode timed per index")
    parser.add_argument("--workdir", type=Path, default=None, help="where indexes are built (temporary)")
    parser.add_argument("--keep-other-sizes", action="store_true",
                        help="keep rows of sizes not run this time from the existing results file")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compact-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.queries)))
        return
    if args.compact_only is not None:
        print(json.dumps(compact(args.compact_only)))
        return
    work = Path(tempfile.mkdtemp(prefix="store-scale-", dir=args.workdir))
    rows = []
    try:
        for n in args.sizes:
            path = work / f"n{n}"
            print(f"building {n:,} nodes in {path}", flush=True)
            build(path, n, args.batch)
            row = {"size": n, "state": "as ingested",
                   **_child(path, "--measure", "--queries", str(args.queries))}
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
            if row["segments"] > 1:
                compacted = _child(path, "--compact-only")
                measured = _child(path, "--measure", "--queries", str(args.queries))
                row = {"size": n, "state": "after compact", **compacted, **measured}
                rows.append(row)
                print(json.dumps(row, indent=1), flush=True)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "store_scale.json"
    if args.keep_other_sizes and previous.is_file():
        ran = {r["size"] for r in rows}
        kept = [r for r in json.loads(previous.read_text())["results"] if r["size"] not in ran]
        rows += kept
        rows.sort(key=lambda r: r["count"])
    meta = {"cpu": cpu_model(), "cores": os.cpu_count(), "dim": DIM, "batch": args.batch, "texts": texts_used()}
    (out / "store_scale.json").write_text(json.dumps({"machine": meta, "results": rows}, indent=2))
    md = (f"# Store costs against index size\n\n{meta['cpu']}, {meta['cores']} cores; {DIM}-d "
          f"clustered vectors, {meta['texts']}, built {args.batch:,} nodes per persist; measured in a "
          f"fresh process (`python benchmarks/store_scale.py --sizes ...`).\n\n" + table(rows))
    from results_file import write_markdown

    write_markdown(out / "store_scale.md", md)
    print(md)


if __name__ == "__main__":
    main()
