"""Table 2b: the main HTP-vs-vanilla comparisons again, on a second, disjoint SciFact sample.

    nice -n 5 .venv/bin/python benchmarks/quality/replicate.py [gemma3-270m] [VARIANT ...]

150 queries are too few to resolve 2-point differences (95% intervals are about ±2.5), and
the sweep picked its best settings on the first sample, which flatters them. This draws 150
*other* queries (none of the first sample's) with their judged abstracts plus 100 other
abstracts, and scores vanilla and the chosen HTP settings at every exit layer. Rows go to
``benchmarks/results/quality/replicate.json``.
"""

from __future__ import annotations

from common import SAMPLE, SCIFACT, SPLIT, load_base, load_sample
from sweep import run_vanilla, run_variant, variants_of

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
    base = load_base(model)
    run_vanilla(TABLE, model, dataset, base)
    for name in names:
        run_variant(TABLE, model, dataset, base, name, variants_of(model)[name])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="gemma3-270m", help="model to compare (default: %(default)s)")
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help="sweep.py variants to replicate (default: k1-r1-7 k1-r1-3)")
    args = parser.parse_args()
    main([args.model, *args.variants])
