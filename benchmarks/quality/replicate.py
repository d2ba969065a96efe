"""Table 2b: the main HTP-vs-vanilla comparisons again, on a second, disjoint SciFact sample.

    nice -n 5 .venv/bin/python benchmarks/quality/replicate.py [gemma3-270m] [VARIANT ...]

150 queries are too few to resolve 2-point differences (95% intervals are about ±2.5), and
the sweep picked its best settings on the first sample, which flatters them. This draws 150
*other* queries (none of the first sample's) with their judged abstracts plus 100 other
abstracts, and scores vanilla and the chosen HTP settings at every exit layer. Rows go to
``benchmarks/results/quality/replicate.json``.
"""

from __future__ import annotations

import sys

from common import SAMPLE, SCIFACT, SPLIT, cache, load_base, load_sample, score
from multi_exit import prime_cache
from sweep import VARIANTS

from pipelines.beir import BeirDataset, load_beir, subsample

TABLE = "replicate"


def second_sample() -> BeirDataset:
    """150 queries disjoint from the first sample, their judged abstracts and 100 others."""
    first = set(load_sample().queries)
    full = load_beir(SCIFACT, SPLIT)
    rest = BeirDataset(full.name, full.split, full.corpus,
                       {q: t for q, t in full.queries.items() if q not in first},
                       {q: j for q, j in full.qrels.items() if q not in first}, dict(full.notes))
    dataset = subsample(rest, max_queries=SAMPLE["max_queries"], max_docs=SAMPLE["max_docs"], seed=1)
    dataset.notes["disjoint_from"] = "the first sample's queries (common.SAMPLE)"
    return dataset


def main(args: list[str]) -> None:
    model = args[0] if args else "gemma3-270m"
    names = args[1:] or ["k1-r1-7", "k1-r1-3"]
    dataset = second_sample()
    store = cache()
    base = load_base(model)
    exits = [*range(1, len(base._layers) + 1), None]
    prime_cache(base, dataset, store, readouts=[("mean", "vanilla")])
    for exit_layer in exits:
        score(TABLE, f"{model}/vanilla/exit={exit_layer or 'full'}", dataset,
              base.with_method("vanilla", exit_layer=exit_layer), model=model, variant="vanilla",
              exit_depth=exit_layer)
    for name in names:
        encoder = base.with_method("htp", exit_layer=None, **VARIANTS[name])
        prime_cache(encoder, dataset, store)
        for exit_layer in exits:
            score(TABLE, f"{model}/htp:{name}/exit={exit_layer or 'full'}", dataset,
                  encoder.with_method("htp", exit_layer=exit_layer), model=model,
                  variant=f"htp:{name}", exit_depth=exit_layer)


if __name__ == "__main__":
    main(sys.argv[1:])
