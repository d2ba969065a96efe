"""The adapter correction through the product, beside the default centring, on the development
split (SciFact train, 809 queries, full corpus of 5,183 abstracts).

    nice -n 5 .venv/bin/python benchmarks/quality/adapter.py --work /tmp/htp-quality

Needs ``--work/raw`` from ``pipeline.py`` (the corpus ingested with ``correction = "none"``).
Two copies are upgraded from its stored vectors with ``rebuild --keep-vectors``, one with each
correction, so both see the same raw vectors and only the correction differs; the adapter's
fitting time is measured there. Queries are encoded once; dense and hybrid (the default
fusion, and alpha 0.2-0.5) are scored on halves A (choices) and B (untouched). Writes
``benchmarks/results/quality/adapter.{json,md}``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import RESULTS, SCIFACT, SPLIT, _write_json, dev_halves, score_by_half
from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode

from pipelines.eval_pipeline import ranked_documents
from pipelines.evaluation import prepare_dataset
from pipelines.query import open_index
from pipelines.rebuild import rebuild
from pipelines.settings import load_settings

ALPHAS = (0.2, 0.3, 0.4, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="holds raw/ from pipeline.py")
    args = parser.parse_args()
    dataset = prepare_dataset(SCIFACT, SPLIT)
    qids, texts = dataset.query_ids(), dataset.query_texts()
    halves = dev_halves(qids)
    fits: dict[str, float] = {}
    for kind in ("center", "adapter"):
        target = args.work / f"kv-{kind}"
        if not target.exists():
            shutil.copytree(args.work / "raw", target)
            began = time.perf_counter()
            rebuild(target, load_settings(correction=kind), keep_vectors=True)
            fits[kind] = round(time.perf_counter() - began, 1)
    settings = load_settings()
    center = open_index(args.work / "kv-center", settings)
    adapter = open_index(args.work / "kv-adapter", settings, embedding=center.embedding)
    vectors = center.encoder.encode_queries(texts)
    rows = []
    for name, index in (("center (default)", center), ("adapter", adapter)):
        for mode, alpha in [("dense", None), *[("hybrid", a) for a in ALPHAS]]:
            run = {}
            for qid, text, vector in zip(qids, texts, vectors, strict=True):
                result = index.vector_store.query(VectorStoreQuery(
                    query_embedding=vector.tolist(), query_str=text, similarity_top_k=100, alpha=alpha,
                    mode=VectorStoreQueryMode.DEFAULT if mode == "dense" else VectorStoreQueryMode.HYBRID))
                run[qid] = ranked_documents([{"doc_id": n.ref_doc_id, "score": s} for n, s in
                                             zip(result.nodes, result.similarities, strict=True)], 100)
            row = {"correction": name, "mode": mode, "alpha": alpha, **score_by_half(dataset.qrels, run, halves)}
            rows.append(row)
            print(name, mode, alpha, row["all"]["ndcg@10"], row["A"]["ndcg@10"], row["B"]["ndcg@10"], flush=True)
    summary = adapter.store.correction_summary()
    result = {"dataset": dataset.name, "split": SPLIT, "queries": len(qids), "docs": len(dataset.corpus),
              "encoder": center.embedding.model_name, "rebuild_keep_vectors_seconds": fits,
              "adapter": summary, "rows": rows}
    _write_json(RESULTS / "adapter.json", result)
    lines = ["# Adapter vs centring through the product (SciFact train, development split)", "",
             f"{len(qids)} queries over {len(dataset.corpus)} documents; {result['encoder']}. Both indexes "
             "were upgraded from the same stored raw vectors with `rebuild --keep-vectors`; "
             f"seconds for that (pseudo-queries embedded + fit): {fits or 'built earlier'}. "
             f"Adapter: {summary}.", "",
             "| correction | mode | alpha | NDCG@10 all | A | B | Recall@100 |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        alpha = "default" if row["mode"] == "hybrid" and row["alpha"] is None else (row["alpha"] or "-")
        lines.append(f"| {row['correction']} | {row['mode']} | {alpha} | {row['all']['ndcg@10']:.1f} | "
                     f"{row['A']['ndcg@10']:.1f} | {row['B']['ndcg@10']:.1f} | {row['all']['recall@100']:.1f} |")
    (RESULTS / "adapter.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
