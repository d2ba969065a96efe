"""How many pseudo-query pairs the adapter correction needs, and of what length, on the
development split (SciFact train, 809 queries, all 5,183 abstracts).

    nice -n 5 .venv/bin/python benchmarks/quality/adapter_pairs.py --work /tmp/htp-quality

Needs ``--work/raw`` from ``pipeline.py`` (the corpus ingested with ``correction = "none"``).
Pairs are drawn as the product draws them (`pipelines.correction`), the
pseudo-queries embedded once (cached in ``--work/pseudo_queries.npz``, with the seconds it
took, which is the cost a user pays at rebuild), and the adapter fitted by
`pipelines.adapter.fit_linear_adapter` with its defaults on each sample; dense NDCG@10 is
scored on halves A (choices) and B (untouched). The product's rule
(`pipelines.correction.ADAPTER_PAIRS_PER_NODE`, `ADAPTER_PAIRS`) was chosen here. Writes
``benchmarks/results/quality/adapter_pairs.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import RESULTS, SCIFACT, SPLIT, _write_json, dev_halves, score_by_half

from indexes import VectorCorrection
from pipelines.adapter import fit_linear_adapter
from pipelines.correction import pseudo_query_pairs
from pipelines.eval_pipeline import ranked_documents
from pipelines.evaluation import prepare_dataset
from pipelines.query import open_index
from pipelines.settings import load_settings


def length_class(sample: str) -> str:
    """"6-40 words" of "6-40 words, 5697 pairs"."""
    return sample.split(",")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="holds raw/ from pipeline.py")
    args = parser.parse_args()
    dataset = prepare_dataset(SCIFACT, SPLIT)
    qids = dataset.query_ids()
    halves = dev_halves(qids)
    index = open_index(args.work / "raw", load_settings())
    nodes = index.store.all_nodes()
    stored = dict(index.store.iter_embeddings())
    texts = [node.text for node in nodes]
    docs = np.stack([stored[node.node_id] for node in nodes]).astype(np.float32)
    doc_of = [str(node.ref_doc_id) for node in nodes]
    queries = np.asarray(index.encoder.encode_queries(dataset.query_texts()), dtype=np.float32)
    n = len(nodes)
    samples = {f"6-40 words, {size} pairs": pseudo_query_pairs(texts, size) for size in (n, 8192, 2 * n, 16_384)}
    samples |= {f"6-20 words, {size} pairs": pseudo_query_pairs(texts, size, max_words=20) for size in (n, 2 * n)}

    cache_path = args.work / "pseudo_queries.npz"
    cache: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    if cache_path.exists():
        saved = np.load(cache_path, allow_pickle=True)
        cache = dict(zip(saved["texts"].tolist(), saved["vectors"], strict=True))
        seconds = dict(saved["seconds"].item())
    for name, pairs in samples.items():
        missing = sorted({s for _, s in pairs} - set(cache))
        if missing:
            began = time.perf_counter()
            cache.update(zip(missing, np.asarray(index.encoder.encode_queries(missing), dtype=np.float32), strict=True))
            # seconds per pseudo-query of this length, from the first (largest) batch embedded
            seconds.setdefault(length_class(name), round((time.perf_counter() - began) / len(missing), 5))
            keys = sorted(cache)
            np.savez(cache_path, texts=np.array(keys, dtype=object), vectors=np.stack([cache[k] for k in keys]),
                     seconds=np.array(seconds, dtype=object))

    rows = []
    for name, pairs in samples.items():
        pseudo = np.stack([cache[s] for _, s in pairs])
        centring = VectorCorrection.fit(docs, pseudo)
        fit = fit_linear_adapter(centring.centred_queries(pseudo), centring.centred_documents(docs),
                                 np.asarray([source for source, _ in pairs]))
        assert fit is not None
        corrected = centring.with_adapter(fit.matrix, docs, pairs=fit.pairs, epochs=fit.epochs,
                                          heldout_mrr=fit.heldout_mrr)
        scores = corrected.queries(queries) @ corrected.documents(docs).T
        run = {qid: ranked_documents([{"doc_id": doc_of[i], "score": float(row[i])} for i in np.argsort(-row)[:300]], 100)
               for qid, row in zip(qids, scores, strict=True)}
        per_text = seconds[length_class(name)]
        row = {"sample": name, "pairs": len(pairs), "epochs": fit.epochs, "heldout_mrr": fit.heldout_mrr,
               "embed_seconds_est": round(per_text * len(pairs), 1), **score_by_half(dataset.qrels, run, halves)}
        rows.append(row)
        print(name, row["all"]["ndcg@10"], row["A"]["ndcg@10"], row["B"]["ndcg@10"], flush=True)

    _write_json(RESULTS / "adapter_pairs.json", {"dataset": dataset.name, "split": SPLIT, "nodes": n,
                                                 "queries": len(qids), "seconds_per_pseudo_query": seconds, "rows": rows})
    lines = ["# Adapter: pseudo-query pairs and their length (SciFact train, development split)", "",
             f"{len(qids)} queries over {n} nodes (all 5,183 abstracts), dense search with the adapter "
             "correction fitted on each sample (defaults of `fit_linear_adapter`, same raw vectors). "
             "Embedding seconds: the pseudo-queries of the sample at the rate measured while embedding "
             "them here (2 cores, shared).", "",
             "| pseudo-queries | pairs | epochs | embedding s (est.) | NDCG@10 all | A | B | Recall@100 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {length_class(row['sample'])} | {row['pairs']} | {row['epochs']} | {row['embed_seconds_est']} | "
                     f"{row['all']['ndcg@10']:.1f} | {row['A']['ndcg@10']:.1f} | {row['B']['ndcg@10']:.1f} | "
                     f"{row['all']['recall@100']:.1f} |")
    (RESULTS / "adapter_pairs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
