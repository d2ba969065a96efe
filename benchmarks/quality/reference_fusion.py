"""The outside reference for hybrid search: BM25 (bm25s) fused with all-MiniLM-L6-v2, on the
development split over the full corpus, with the product's own fusions.

    nice -n 5 .venv/bin/python benchmarks/quality/reference_fusion.py

What a user who fuses a small trained retriever with BM25 gets on the same queries and corpus
(SciFact train, 809 queries, 5,183 abstracts); MiniLM's vectors come from the evaluation cache
when ``pipeline.py`` has run. Document-level runs (top 100 each) are fused with
`indexes.fusion` (convex at several weights, and reciprocal ranks). Writes
``benchmarks/results/quality/reference_fusion.{json,md}``.
"""

from __future__ import annotations

from common import RESULTS, SCIFACT, SPLIT, _write_json, dev_halves, score_by_half

from indexes import fusion
from pipelines.evaluation import EmbeddingCache, bm25_run, dense_run, make_encoder, prepare_dataset

ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def main() -> None:
    dataset = prepare_dataset(SCIFACT, SPLIT)
    halves = dev_halves(dataset.query_ids())
    lexical = bm25_run(dataset)
    dense = dense_run(make_encoder("minilm"), dataset, cache=EmbeddingCache())
    keys = {doc_id: i for i, doc_id in enumerate(dataset.doc_ids())}
    names = {i: doc_id for doc_id, i in keys.items()}

    def as_hits(docs: dict[str, float]) -> list[tuple[int, float]]:
        return [(keys[d], s) for d, s in docs.items()]

    rows = []
    runs = {"bm25 (bm25s)": lexical, "all-MiniLM-L6-v2": dense}
    for method in ("convex", "rrf"):
        for alpha in ALPHAS:
            runs[f"{method} alpha={alpha}"] = {
                q: {names[k]: s for k, s in fusion.fuse(as_hits(dense.get(q, {})), as_hits(lexical.get(q, {})),
                                                        method=method, alpha=alpha)[:100]}
                for q in dataset.query_ids()}
    for label, run in runs.items():
        row = {"label": label, **score_by_half(dataset.qrels, run, halves)}
        rows.append(row)
        print(f"{label:28s} all={row['all']['ndcg@10']:.2f} A={row['A']['ndcg@10']:.2f} B={row['B']['ndcg@10']:.2f}")
    _write_json(RESULTS / "reference_fusion.json", {"dataset": dataset.name, "split": SPLIT, "rows": rows})
    lines = ["# Reference: BM25 fused with all-MiniLM-L6-v2 (SciFact train, full corpus)", "",
             f"{len(dataset.queries)} queries over {len(dataset.corpus)} documents; fusions from "
             "`indexes.fusion` (alpha = MiniLM's weight).", "",
             "| run | NDCG@10 all | A | B | Recall@100 |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['all']['ndcg@10']:.1f} | {r['A']['ndcg@10']:.1f} | {r['B']['ndcg@10']:.1f} | "
              f"{r['all']['recall@100']:.1f} |" for r in rows]
    (RESULTS / "reference_fusion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # no options: --help describes the run
    main()
