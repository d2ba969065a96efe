"""Table 3: long documents built from SciFact, K (sentences per HTP block) against vanilla.

    nice -n 5 .venv/bin/python benchmarks/quality/long_docs.py [VARIANT ...]

The task: judged abstracts (at most 384 tokens) of single-judgement SciFact queries are packed, in random order,
into long documents of at most 768, 1,280 and 1,792 tokens (3-4, 4-5 and 7-8 abstracts). A query's
only relevant document is the long document holding its abstract, at whatever position it
landed; every other abstract in that document is noise for it. Packing judged abstracts (rather
than padding one judged abstract with random fillers) makes every embedded token serve some
query: ~4 times the queries for the same CPU time. Documents stay under 1,792 tokens so that
even K = 1 (two placeholders per sentence) fits ``max_length`` = 2048 without truncation,
which would otherwise confound the comparison. Results are also broken down by length bucket
(target tokens) and by the relevant abstract's position.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from common import RESULTS, SCIFACT, SPLIT, cache, record
from multi_exit import prime_cache

from htp_embed import HTPEncoder
from pipelines.beir import BeirDataset, Document, load_beir
from pipelines.evaluation import dense_run, score_run

TABLE = "long_docs"
MAX_LENGTH = 2048
DOCS_PER_SIZE = 10
SIZES = (768, 1280, 1792)  # target tokens per long document; none exceeds its target
MAX_ABSTRACT = 384
EXITS = (17, 15, 13)  # the encoder's default (-2) and the best short-text layers of table 2
VARIANTS: dict[str, dict[str, Any]] = {
    "vanilla": {"method": "vanilla"},
    "k=1": {"method": "htp", "k": 1},
    "adaptive:8": {"method": "htp", "k": "adaptive:8"},
    "k=4": {"method": "htp", "k": 4},
    "k=12": {"method": "htp", "k": 12},
    "adaptive:16": {"method": "htp", "k": "adaptive:16"},
    "k=2": {"method": "htp", "k": 2},
    "k=8": {"method": "htp", "k": 8},
    "adaptive:4": {"method": "htp", "k": "adaptive:4"},
}


def build_task(count_tokens, seed: int = 0) -> tuple[BeirDataset, dict[str, dict[str, Any]]]:
    """The long-document dataset and, per query, its document's size, tokens and position."""
    source = load_beir(SCIFACT, SPLIT)
    single = {q: next(iter(judged)) for q, judged in source.qrels.items() if len(judged) == 1}
    by_doc: dict[str, list[str]] = {}
    for query_id, doc_id in single.items():
        by_doc.setdefault(doc_id, []).append(query_id)
    lengths = {d: count_tokens(source.corpus[d].embedding_text()) for d in sorted(by_doc)}
    # Abstracts of at most MAX_ABSTRACT tokens, so that every document holds at least two.
    pool = sorted(d for d in by_doc if lengths[d] <= MAX_ABSTRACT)
    random.Random(seed).shuffle(pool)
    corpus: dict[str, Document] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    info: dict[str, dict[str, Any]] = {}
    sizes = [size for size in SIZES for _ in range(DOCS_PER_SIZE)]
    for number, size in enumerate(sizes):
        members: list[str] = []
        tokens = 0
        while True:
            # the first abstract from the end of the shuffled pool that still fits
            fits = next((i for i in range(len(pool) - 1, -1, -1)
                         if tokens + lengths[pool[i]] <= size), None)
            if fits is None:
                break
            doc_id = pool.pop(fits)
            members.append(doc_id)
            tokens += lengths[doc_id]
        if len(members) < 2:
            raise ValueError(f"could not fill a {size}-token document with two abstracts")
        long_id = f"long{number}"
        corpus[long_id] = Document("", " ".join(source.corpus[d].embedding_text() for d in members))
        for position, doc_id in enumerate(members):
            for query_id in by_doc[doc_id]:
                queries[query_id] = source.queries[query_id]
                qrels[query_id] = {long_id: 1}
                info[query_id] = {"size": size, "abstracts": len(members), "tokens": tokens,
                                  "position": position, "last": position == len(members) - 1}
    dataset = BeirDataset("scifact-long", SPLIT, corpus, queries, qrels,
                          {"docs_per_size": DOCS_PER_SIZE, "target_tokens": SIZES})
    return dataset, info


def breakdown(per_query: dict[str, dict[str, float]], info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean NDCG@10 per document size (target tokens), per relevant-abstract position, and for
    the relevant abstract being the last one or not."""
    out: dict[str, Any] = {}
    for key in ("size", "position", "last"):
        groups: dict[int, list[float]] = {}
        for query_id, values in per_query.items():
            groups.setdefault(info[query_id][key], []).append(values["ndcg@10"])
        out[f"ndcg@10_by_{key}"] = {str(k): sum(v) / len(v) for k, v in sorted(groups.items())}
        out[f"queries_by_{key}"] = {str(k): len(v) for k, v in sorted(groups.items())}
    return out


def main(names: list[str], model: str = "gemma3-270m") -> None:
    base = HTPEncoder(model=model, method="vanilla", exit_layer=None, max_length=MAX_LENGTH, batch_size=4)
    dataset, info = build_task(lambda text: len(base.tokenizer(text, add_special_tokens=False)["input_ids"]))
    lengths = sorted({(v["abstracts"], v["tokens"]) for v in info.values()})
    print(f"{len(dataset.corpus)} long docs, {len(dataset.queries)} queries; (abstracts, tokens) "
          f"{lengths[0]}..{lengths[-1]}", flush=True)
    store = cache()
    for name in names or list(VARIANTS):
        settings = dict(VARIANTS[name])
        method = settings.pop("method")
        encoder = base.with_method(method, exit_layer=None, **settings)
        prime_cache(encoder, dataset, store)
        for exit_layer in EXITS:
            sibling = encoder.with_method(method, exit_layer=exit_layer)
            run = dense_run(sibling, dataset, cache=store)
            means, per_query = score_run(dataset.qrels, run)
            result = {"dataset": dataset.name, "split": SPLIT, "method": method, "model": model,
                      **means, "queries": len(dataset.queries), "docs": len(dataset.corpus),
                      "identity": sibling.identity(), "describe": sibling.describe(),
                      "seconds": 0.0, "per_query": per_query, **breakdown(per_query, info)}
            record(TABLE, f"{model}/{name}/exit={exit_layer}", result, variant=name, exit_depth=exit_layer,
                   max_length=MAX_LENGTH)
    Path(RESULTS / "long_docs_task.json").write_text(
        __import__("json").dumps({"queries": info, "notes": dataset.notes}, indent=1))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"settings to run (default: all of {', '.join(VARIANTS)})")
    chosen = parser.parse_args().variants
    if unknown := [name for name in chosen if name not in VARIANTS]:  # (choices= refuses an empty list)
        parser.error(f"unknown VARIANT {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    main(chosen)
