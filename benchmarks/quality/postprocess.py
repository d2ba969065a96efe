"""Table 5: can a training-free fix of the vectors' geometry beat the method choice?

    nice -n 5 .venv/bin/python benchmarks/quality/postprocess.py [gemma3-270m] [replicate]

Mean-pooled residual-stream states of these small decoders are dominated by one or two
"massive activation" channels (diagnostics.py: documents have cosine 0.95-0.999 to each other),
so rankings hang on small residual differences. From cached vectors only (no forward pass),
this scores, for vanilla and HTP at every exit layer:
* ``raw``: the encoder's vectors;
* ``drop-top``: the channels with the largest mean magnitude over the documents (N = 1, 2)
  zeroed in queries and documents, then re-normalised (corpus-independent once the channel is
  known: it is a property of the model);
* ``center``: documents minus the document mean, queries minus the query mean, re-normalised
  (needs corpus and query statistics);
* ``center-docmean``: both minus the document mean (deployable: an index-level statistic).
Rows go to ``benchmarks/results/quality/postprocess.json``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from common import SPLIT, load_base, load_sample, record
from multi_exit import CachedVariant

from pipelines.evaluation import EmbeddingCache, exact_search, score_run

TABLE = "postprocess"
Transform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def drop_top(n: int) -> Transform:
    def apply(queries: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        channels = np.argsort(-np.abs(docs.mean(0)))[:n]
        queries, docs = queries.copy(), docs.copy()
        queries[:, channels] = 0.0
        docs[:, channels] = 0.0
        return normalise(queries), normalise(docs)

    return apply


def center(queries: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return normalise(queries - queries.mean(0)), normalise(docs - docs.mean(0))


def center_on_docs(queries: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sides minus the document mean: deployable, the mean is stored with the index."""
    mean = docs.mean(0)
    return normalise(queries - mean), normalise(docs - mean)


TRANSFORMS: dict[str, Transform] = {
    "raw": lambda q, d: (q, d), "drop-top1": drop_top(1), "drop-top2": drop_top(2), "center": center,
    "center-docmean": center_on_docs,
}
SETTINGS = {
    "vanilla": {"method": "vanilla"},
    "htp:k1-r1-3": {"method": "htp", "k": 1, "rewire_start": 1, "rewire_stop": 3},
    "htp:k1-r1-7": {"method": "htp", "k": 1, "rewire_start": 1, "rewire_stop": 7},
    "htp:local-r1-3": {"method": "htp", "k": 1, "rewire_start": 1, "rewire_stop": 3, "global_tokens": False},
    "htp:adaptive:8-r1-3": {"method": "htp", "k": "adaptive:8", "rewire_start": 1, "rewire_stop": 3},
    # SmolLM2 with a sink token in front (sweep.py): identities carry the sink marker.
    "sink-vanilla": {"method": "vanilla", "_sink": 0},
    "htp:sink-k1-r1-7": {"method": "htp", "k": 1, "rewire_start": 1, "rewire_stop": 7, "_sink": 0},
}


def load(store: EmbeddingCache, encoder, kind: str, content_hash: str, rows: int) -> np.ndarray | None:
    path = store.root / f"{store.key(encoder.identity(), kind, content_hash, str(encoder.dtype))}.npy"
    return np.load(path) if path.exists() else None


def main(model: str = "gemma3-270m", sample: str = "first") -> None:
    """``sample``: "first" (common.SAMPLE) or "replicate" (replicate.py's disjoint sample)."""
    if sample == "replicate":
        from replicate import second_sample

        dataset, prefix = second_sample(), "replicate:"
    else:
        dataset, prefix = load_sample(), ""
    store = EmbeddingCache()
    base = load_base(model)
    for name, settings in SETTINGS.items():
        settings = dict(settings)
        method, sink = settings.pop("method"), settings.pop("_sink", None)
        for depth in [*range(1, len(base._layers) + 1), None]:
            encoder = base.with_method(method, exit_layer=depth, **settings)
            if sink is not None:
                encoder = CachedVariant(encoder, extra={"sink_prefix": sink})
            docs = load(store, encoder, "documents", dataset.corpus_hash(), len(dataset.corpus))
            queries = load(store, encoder, "queries", dataset.queries_hash(), len(dataset.queries))
            if docs is None or queries is None:
                continue
            for transform, apply in TRANSFORMS.items():
                q, d = apply(queries, docs)
                run = exact_search(q, d, dataset.query_ids(), dataset.doc_ids())
                means, per_query = score_run(dataset.qrels, run)
                result = {"dataset": dataset.name, "split": SPLIT, "method": method, "model": model,
                          **means, "queries": len(dataset.queries), "docs": len(dataset.corpus),
                          "seconds": 0.0, "per_query": per_query}
                record(TABLE, f"{prefix}{model}/{name}/{transform}/exit={depth or 'full'}", result,
                       variant=name, transform=transform, exit_depth=depth, sample=sample)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="gemma3-270m", help="model whose vectors are post-processed (default: %(default)s)")
    parser.add_argument("sample", nargs="?", default="first", choices=["first", "replicate"],
                        help="the first sample (common.SAMPLE) or replicate.py's disjoint one (default: %(default)s)")
    args = parser.parse_args()
    main(args.model, args.sample)
