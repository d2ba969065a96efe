"""Hybrid fusion re-tuned on the full development corpus: weight x normalisation, and whether
the choice holds on a smaller corpus.

    nice -n 5 .venv/bin/python benchmarks/quality/fusion_norm.py --work /tmp/htp-quality

Uses ``--work/kv-center`` from ``adapter.py`` (the full SciFact corpus with the default
correction). Each query's dense and keyword candidates (top 100 nodes each) come from the
product's store; they are fused here with the product's convex fusion at several floors
(``floor`` 1 = plain min-max, 0 = divide by the top score), with z-score normalisation, and
with reciprocal ranks. The 1k-document rows restrict every candidate list to the judged
documents plus random others (1,000 in all), which keeps the full corpus's BM25 statistics:
a check of stability, not a re-indexing. Halves A (choices) and B as in ``pipeline.py``.
Writes ``benchmarks/results/quality/fusion_norm.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from common import RESULTS, SCIFACT, SPLIT, _write_json, dev_halves, score_by_half
from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode

from indexes import fusion
from pipelines.eval_pipeline import ranked_documents
from pipelines.evaluation import prepare_dataset
from pipelines.query import open_index
from pipelines.settings import load_settings

ALPHAS = (0.2, 0.3, 0.4, 0.5)
FLOORS = (0.0, 0.25, 0.5, 0.75, 1.0)


def zscore(dense, sparse, alpha):
    def norm(hits):
        if not hits:
            return {}, 0.0
        scores = np.array([s for _, s in hits])
        z = (scores - scores.mean()) / (scores.std() + 1e-9)
        return {k: float(v) for (k, _), v in zip(hits, z, strict=True)}, float(z.min())
    (dn, dmin), (sn, smin) = norm(dense), norm(sparse)
    fused = {k: alpha * dn.get(k, dmin) + (1 - alpha) * sn.get(k, smin) for k in set(dn) | set(sn)}
    return sorted(fused.items(), key=lambda item: -item[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True, help="holds kv-center/ from adapter.py")
    args = parser.parse_args()
    dataset = prepare_dataset(SCIFACT, SPLIT)
    qids, texts = dataset.query_ids(), dataset.query_texts()
    halves = dev_halves(qids)
    index = open_index(args.work / "kv-center", load_settings())
    vectors = index.encoder.encode_queries(texts)
    keys: dict[str, int] = {}
    doc_of: dict[int, str] = {}
    lists = []
    for text, vector in zip(texts, vectors, strict=True):
        sides = []
        for mode in (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.SPARSE):
            result = index.vector_store.query(VectorStoreQuery(query_embedding=vector.tolist(), query_str=text,
                                                        similarity_top_k=fusion.CANDIDATES, mode=mode))
            hits = []
            for node, score in zip(result.nodes, result.similarities, strict=True):
                key = keys.setdefault(node.node_id, len(keys))
                doc_of[key] = node.ref_doc_id
                hits.append((key, float(score)))
            sides.append(hits)
        lists.append(sides)
    judged = {d for rel in dataset.qrels.values() for d in rel}
    others = sorted(set(dataset.corpus) - judged)
    small = judged | set(random.Random(0).sample(others, max(0, 1000 - len(judged))))
    corpora = {"5,183 docs (full)": None, f"{len(small):,} docs (restricted)": small}
    methods = {f"convex floor={f}": (lambda d, s, a, f=f: fusion.convex(d, s, a, f)) for f in FLOORS}
    methods["z-score"] = zscore
    methods["rrf"] = lambda d, s, a: fusion.rrf(d, s, a)
    rows = []
    for corpus, keep_docs in corpora.items():
        for name, fuse in methods.items():
            for alpha in ALPHAS:
                run = {}
                for qid, (dense, sparse) in zip(qids, lists, strict=True):
                    if keep_docs is not None:
                        dense = [h for h in dense if doc_of[h[0]] in keep_docs]
                        sparse = [h for h in sparse if doc_of[h[0]] in keep_docs]
                    fused = fuse(dense, sparse, alpha)
                    run[qid] = ranked_documents([{"doc_id": doc_of[k], "score": s} for k, s in fused], 100)
                scores = score_by_half(dataset.qrels, run, halves)
                row = {"corpus": corpus, "fusion": name, "alpha": alpha,
                       **{half: means["ndcg@10"] for half, means in scores.items()}}
                rows.append(row)
                print(corpus, name, alpha, row["all"], row["A"], row["B"], flush=True)
    _write_json(RESULTS / "fusion_norm.json", {"dataset": dataset.name, "split": SPLIT, "rows": rows})
    lines = ["# Hybrid fusion: weight x normalisation (SciFact train, NDCG@10)", "",
             "Dense and keyword candidates (100 each) from the product's store with the default "
             "correction; halves A/B as in pipeline.md. The product's default is convex, floor 0.5, alpha 0.3.", ""]
    for corpus in corpora:
        lines += [f"## {corpus}", "", "| fusion | " + " | ".join(f"alpha {a}: all / A / B" for a in ALPHAS) + " |",
                  "|---|" + "---|" * len(ALPHAS)]
        for name in methods:
            cells = [f"{r['all']:.1f} / {r['A']:.1f} / {r['B']:.1f}" for r in rows
                     if r["corpus"] == corpus and r["fusion"] == name]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    (RESULTS / "fusion_norm.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
