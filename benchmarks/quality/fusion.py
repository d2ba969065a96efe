"""Table 4: reciprocal-rank fusion (k = 60) of BM25 with dense runs, from cached embeddings.

    nice -n 5 .venv/bin/python benchmarks/quality/fusion.py

Costs no forward pass when tables 1-2 have run: every dense run below is a cache hit (a miss
would embed, which is correct but slow). Dense runs are fused as the encoder gives them and,
for the decoders, after centring (postprocess.py), the best training-free geometry fix found.
Rows go to ``benchmarks/results/quality/fusion.json``.
"""

from __future__ import annotations

from typing import Any

from common import SPLIT, load_base, load_sample, record
from postprocess import center

from pipelines.evaluation import (
    EmbeddingCache,
    bm25_run,
    exact_search,
    reciprocal_rank_fusion,
    score_run,
)

TABLE = "fusion"
R13 = {"rewire_start": 1, "rewire_stop": 3}
DENSE: dict[str, dict[str, Any]] = {
    "vanilla/exit=17": {"method": "vanilla", "exit_layer": 17},
    "vanilla/exit=13": {"method": "vanilla", "exit_layer": 13},
    "htp:k1-r1-3/exit=17": {"method": "htp", "k": 1, **R13, "exit_layer": 17},
    "htp:k1-r1-3/exit=13": {"method": "htp", "k": 1, **R13, "exit_layer": 13},
    "htp:adaptive:8-r1-3/exit=13": {"method": "htp", "k": "adaptive:8", **R13, "exit_layer": 13},
}


def row(dataset, run, method: str, model: str) -> dict[str, Any]:
    means, per_query = score_run(dataset.qrels, run)
    return {"dataset": dataset.name, "split": SPLIT, "method": method, "model": model, **means,
            "queries": len(dataset.queries), "docs": len(dataset.corpus), "seconds": 0.0,
            "per_query": per_query}


def main() -> None:
    dataset = load_sample()
    store = EmbeddingCache()
    lexical = bm25_run(dataset)
    record(TABLE, "bm25", row(dataset, lexical, "bm25", "bm25s"))
    from pipelines.evaluation import MiniLMEncoder

    encoders: dict[str, Any] = {"minilm": MiniLMEncoder(show_progress=False)}
    base = load_base("gemma3-270m")
    for name, settings in DENSE.items():
        settings = dict(settings)
        encoders[f"gemma3-270m/{name}"] = base.with_method(settings.pop("method"), **settings)
    for name, encoder in encoders.items():
        docs = store.embed(encoder, dataset.doc_texts(), kind="documents", content_hash=dataset.corpus_hash())
        queries = store.embed(encoder, dataset.query_texts(), kind="queries", content_hash=dataset.queries_hash())
        variants = {"": (queries, docs)}
        if name != "minilm":
            variants["+center"] = center(queries, docs)
        for suffix, (q, d) in variants.items():
            dense = exact_search(q, d, dataset.query_ids(), dataset.doc_ids())
            record(TABLE, f"{name}{suffix}", row(dataset, dense, name, name))
            fused = reciprocal_rank_fusion([lexical, dense], k=60)
            record(TABLE, f"bm25+{name}{suffix}", row(dataset, fused, "rrf", name))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # no options: --help describes the run
    main()
