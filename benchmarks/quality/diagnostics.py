"""Why does HTP move retrieval quality? Evidence from cached vectors and layouts (no forward pass).

    nice -n 5 .venv/bin/python benchmarks/quality/diagnostics.py [gemma3-270m] [EXIT_LAYER]

For each cached HTP setting at a given exit, against vanilla at the same exit:
* how far HTP moves each document vector (cosine to its vanilla vector), next to how close
  unrelated documents already are (decoder mean-pooled embeddings are strongly anisotropic, so a
  small move can reorder neighbours);
* the per-query NDCG@10 change split by the number of HTP blocks M of the query's relevant
  documents (does the loss grow with the number of <B-PST> slots?).
Writes ``benchmarks/results/quality/diagnostics_<model>_exit<N>.json``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from common import RESULTS, load_base, load_sample, read_per_query

from pipelines.evaluation import EmbeddingCache

SETTINGS: dict[str, dict[str, Any]] = {
    "htp:k1-r1-3": {"method": "htp", "k": 1, "rewire_start": 1, "rewire_stop": 3},
    "htp:k1-r1-7": {"method": "htp", "k": 1, "rewire_start": 1, "rewire_stop": 7},
    "htp:local-r1-3": {"method": "htp", "k": 1, "rewire_start": 1, "rewire_stop": 3, "global_tokens": False},
    "htp:global-r1-3": {"method": "htp", "k": 1, "rewire_start": 1, "rewire_stop": 3, "local_tokens": False},
    "htp:adaptive:8-r1-3": {"method": "htp", "k": "adaptive:8", "rewire_start": 1, "rewire_stop": 3},
}


def cached(store: EmbeddingCache, encoder, texts_hash: str, rows: int) -> np.ndarray | None:
    key = store.key(encoder.identity(), "documents", texts_hash, str(encoder.dtype))
    path = store.root / f"{key}.npy"
    return np.load(path) if path.exists() and np.load(path).shape[0] == rows else None


def anisotropy_by_layer(store: EmbeddingCache, base, dataset) -> dict[str, Any]:
    """Per exit layer: mean cosine between different documents, and the share of the mean
    vector's squared norm held by its largest coordinate (one outlier channel dominating every
    mean-pooled vector makes all documents look alike)."""
    out: dict[str, Any] = {}
    texts_hash, rows = dataset.corpus_hash(), len(dataset.corpus)
    for depth in [*range(1, len(base._layers) + 1), None]:
        vectors = cached(store, base.with_method("vanilla", exit_layer=depth), texts_hash, rows)
        if vectors is None:
            continue
        cosine = vectors @ vectors.T
        centroid = vectors.mean(0)
        out[str(depth or "full")] = {
            "doc_doc_cosine": round(float(cosine[~np.eye(rows, dtype=bool)].mean()), 4),
            "top_channel_share": round(float((centroid**2).max() / (centroid**2).sum()), 4),
            "top_channel": int(np.abs(centroid).argmax()),
        }
    return out


def main(model: str = "gemma3-270m", exit_layer: int = 17) -> None:
    dataset = load_sample()
    store = EmbeddingCache()
    base = load_base(model)
    texts = dataset.doc_texts()
    vanilla = cached(store, base.with_method("vanilla", exit_layer=exit_layer), dataset.corpus_hash(), len(texts))
    if vanilla is None:
        raise SystemExit("vanilla vectors are not cached yet: run methods.py first")
    pairwise = vanilla @ vanilla.T
    off_diagonal = pairwise[~np.eye(len(texts), dtype=bool)]
    report: dict[str, Any] = {
        "model": model, "exit_layer": exit_layer, "docs": len(texts),
        "vanilla_doc_doc_cosine": {"mean": float(off_diagonal.mean()), "p10": float(np.percentile(off_diagonal, 10)),
                                   "p90": float(np.percentile(off_diagonal, 90))},
        "settings": {},
    }
    sweep = read_per_query("sweep") or {}
    methods = read_per_query("methods") or {}
    vanilla_scores = sweep.get(f"{model}/vanilla/exit={exit_layer}") or methods.get(f"{model}/vanilla[exit={exit_layer}]")
    doc_index = {d: i for i, d in enumerate(dataset.doc_ids())}
    for name, settings in SETTINGS.items():
        settings = dict(settings)
        encoder = base.with_method(settings.pop("method"), exit_layer=exit_layer, **settings)
        vectors = cached(store, encoder, dataset.corpus_hash(), len(texts))
        if vectors is None:
            continue
        blocks = [layout.n_blocks for layout in encoder.layouts(texts)]
        entry: dict[str, Any] = {
            "self_cosine_to_vanilla": {"mean": float((vectors * vanilla).sum(1).mean()),
                                       "min": float((vectors * vanilla).sum(1).min())},
            "blocks_per_doc": {"mean": float(np.mean(blocks)), "max": int(np.max(blocks))},
        }
        scores = sweep.get(f"{model}/{name}/exit={exit_layer}")
        if scores and vanilla_scores:
            groups: dict[str, list[float]] = {}
            for query_id, judged in dataset.qrels.items():
                m = max(blocks[doc_index[d]] for d in judged)
                bucket = "M<=8" if m <= 8 else ("M 9-12" if m <= 12 else "M>=13")
                groups.setdefault(bucket, []).append(scores[query_id] - vanilla_scores[query_id])
            entry["ndcg_delta_by_blocks_of_relevant_doc"] = {
                b: {"queries": len(v), "mean_delta": 100 * float(np.mean(v))} for b, v in sorted(groups.items())
            }
        report["settings"][name] = entry
    report["vanilla_by_layer"] = anisotropy_by_layer(store, base, dataset)
    (RESULTS / f"diagnostics_{model}_exit{exit_layer}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="gemma3-270m", help="model whose cached vectors are read (default: %(default)s)")
    parser.add_argument("exit_layer", nargs="?", type=int, default=17, help="exit layer compared (default: %(default)s)")
    args = parser.parse_args()
    main(args.model, args.exit_layer)
