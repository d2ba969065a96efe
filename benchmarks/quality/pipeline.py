"""The product's retrieval quality on the development split, every mode side by side.

    nice -n 5 .venv/bin/python benchmarks/quality/pipeline.py --work /tmp/htp-quality

SciFact ``train`` (809 judged queries) over the full corpus (5,183 abstracts), through
``htp-index eval --pipeline``'s code path (ingest with the product's settings, then the
retriever). Two indexes are built from one embedding pass:

* ``raw``: ingested with ``correction = "none"`` (what the product did before);
* ``center``: a copy upgraded with ``rebuild --keep-vectors``, which fits the default
  correction from the same stored vectors exactly as a first ingest fits it.

Then dense (raw and corrected), sparse and hybrid are scored on the same queries, hybrid over a
range of ``alpha`` and both fusions. The queries are encoded once (both indexes share the
encoder) and each run is the store's own ``query``, what ``OpenIndex.search_many`` runs after
encoding (``tests/test_hybrid_pipeline.py`` checks ``eval --pipeline`` equals the retriever); the references BM25 (bm25s) and all-MiniLM-L6-v2 run on
the same corpus and queries through the research harness. The queries are split in two fixed
halves: settings are chosen on half A, and half B shows whether the choice holds on queries
that did not choose it. Writes ``benchmarks/results/quality/pipeline.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

from common import RESULTS, SCIFACT, SPLIT, _write_json
from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode

from pipelines.eval_pipeline import pipeline_run, ranked_documents
from pipelines.evaluation import evaluate, prepare_dataset, score_run
from pipelines.query import open_index
from pipelines.rebuild import rebuild
from pipelines.settings import load_settings

ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="where the two indexes are kept")
    parser.add_argument("--max-docs", type=int, default=None, help="use at most this many documents (a quick run)")
    args = parser.parse_args()
    began = time.perf_counter()
    dataset = prepare_dataset(SCIFACT, SPLIT, max_docs=args.max_docs)
    qids = dataset.query_ids()
    half_a = set(random.Random(7).sample(sorted(qids), len(qids) // 2))
    halves = {"all": set(qids), "A": half_a, "B": set(qids) - half_a}
    rows: list[dict] = []

    def add(label: str, run: dict, **extra) -> dict:
        ranked = [sorted(docs.values(), reverse=True) for docs in run.values() if len(docs) >= 10]
        spread = {"top1_mean": round(sum(r[0] for r in ranked) / len(ranked), 4),
                  "top10_mean": round(sum(r[9] for r in ranked) / len(ranked), 4)} if ranked else {}
        row = {"label": label, **extra, "scores": spread}
        for name, keep in halves.items():
            means, _ = score_run({q: v for q, v in dataset.qrels.items() if q in keep},
                                 {q: v for q, v in run.items() if q in keep})
            row[name] = {m: round(100 * v, 2) for m, v in means.items()}
        rows.append(row)
        print(f"{label:44s} all={row['all']['ndcg@10']:.2f} A={row['A']['ndcg@10']:.2f} "
              f"B={row['B']['ndcg@10']:.2f} R@100={row['all']['recall@100']:.2f}", flush=True)
        return row

    for reference in ("bm25", "minilm"):
        result = evaluate(dataset, SPLIT, reference, per_query=True)
        run_rows = result["per_query"]
        row = {"label": f"reference: {reference}"}
        for name, keep in halves.items():
            row[name] = {m: round(100 * sum(run_rows[q][m] for q in keep) / len(keep), 2)
                         for m in ("ndcg@10", "recall@10", "recall@100", "mrr@10")}
        rows.append(row)
        print(f"{row['label']:44s} all={row['all']['ndcg@10']:.2f} A={row['A']['ndcg@10']:.2f} "
              f"B={row['B']['ndcg@10']:.2f}", flush=True)

    raw_dir, center_dir = args.work / "raw", args.work / "center"
    # Build (or reuse: ingest is incremental) both indexes through the product's ingest.
    pipeline_run(dataset, raw_dir, load_settings(correction="none"), mode="sparse")
    if not center_dir.exists():
        shutil.copytree(raw_dir, center_dir)
        rebuild(center_dir, load_settings(), keep_vectors=True)
    settings = load_settings()
    center = open_index(center_dir, settings)
    raw = open_index(raw_dir, settings, embedding=center.embedding)
    # Both indexes have the same encoder, so the queries are encoded once; every run below is
    # then the store's own query (what OpenIndex.search_many does after encoding).
    vectors = center.encoder.encode_queries(dataset.query_texts())

    def store_run(index, mode: str, **options) -> dict:
        store_mode = {"dense": VectorStoreQueryMode.DEFAULT, "sparse": VectorStoreQueryMode.SPARSE,
                      "hybrid": VectorStoreQueryMode.HYBRID}[mode]
        fusion = options.pop("fusion", settings.fusion)
        run = {}
        for qid, text, vector in zip(qids, dataset.query_texts(), vectors, strict=True):
            result = index.vector_store.query(VectorStoreQuery(
                query_embedding=vector.tolist(), query_str=text, similarity_top_k=100, mode=store_mode,
                alpha=options.get("alpha", settings.alpha)), fusion=fusion)
            hits = [{"doc_id": n.ref_doc_id, "score": s} for n, s in zip(result.nodes, result.similarities, strict=True)]
            run[qid] = ranked_documents(hits, 100)
        return run

    add("product dense, no correction", store_run(raw, "dense"))
    for mode in ("dense", "sparse", "hybrid"):
        add(f"product {mode} (defaults)", store_run(center, mode))
    for fusion in ("convex", "rrf"):
        for alpha in ALPHAS:
            add(f"product hybrid {fusion} alpha={alpha}", store_run(center, "hybrid", alpha=alpha, fusion=fusion),
                fusion=fusion, alpha=alpha)
    details = {"encoder": center.embedding.model_name, "index_kind": center.store.index_kind,
               "correction": center.store.correction_summary()}
    result = {
        "dataset": dataset.name, "split": SPLIT, "queries": len(qids), "docs": len(dataset.corpus),
        "halves": {k: len(v) for k, v in halves.items()}, **details,
        "rows": rows, "seconds": round(time.perf_counter() - began, 1),
    }
    _write_json(RESULTS / "pipeline.json", result)
    lines = [
        "# Retrieval through the product (SciFact train, development split)", "",
        f"{len(qids)} queries over {len(dataset.corpus)} documents; {result['encoder']}; "
        f"{result['index_kind']} index. Halves A/B: {len(half_a)}/{len(qids) - len(half_a)} queries "
        "(fixed seed); defaults were chosen on A.", "",
        "| setting | NDCG@10 all | A | B | Recall@100 | MRR@10 | mean score of hit 1 / hit 10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = row.get("scores") or {}
        scores = f"{spread['top1_mean']:.3f} / {spread['top10_mean']:.3f}" if spread else "-"
        lines.append(f"| {row['label']} | {row['all']['ndcg@10']:.1f} | {row['A']['ndcg@10']:.1f} | "
                     f"{row['B']['ndcg@10']:.1f} | {row['all']['recall@100']:.1f} | {row['all']['mrr@10']:.1f} | "
                     f"{scores} |")
    (RESULTS / "pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
