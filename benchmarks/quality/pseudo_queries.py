"""Which texts give the pseudo-queries behind the vector correction's query mean?

    nice -n 5 .venv/bin/python benchmarks/quality/pseudo_queries.py [--max-docs N]

The correction (``indexes/correction.py``) centres documents on the documents' mean and
queries on the mean of *pseudo-queries*, sentences of 6-40 words sampled from the index's node
texts (``pipelines/correction.py``). Two rules for a text without such a sentence:

* ``prose only`` (before stop 42): it gives none, unless no text at all has one;
* ``every text`` (now): it gives its first 40 words.

The rules differ only on corpora with unpunctuated texts (logs, tables, code, one huge line),
where ``prose only`` takes the query mean from the few prose texts while the documents' mean
covers everything. Measured here, the default encoder in bfloat16:

1. the development split (SciFact ``train``, 809 judged queries, full corpus) chunked as an
   ingest chunks it, a document scored by its best node: dense NDCG@10 and Recall@100 under each
   rule (the dev corpus has a handful of nodes without such a sentence);
2. a made-up lopsided corpus: one long unpunctuated text (250 of its nodes) beside 8 short
   prose documents, and one query per prose document: the rank of its document in dense search
   under each rule and without correction.

Writes ``benchmarks/results/quality/pseudo_queries.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
from common import RESULTS, SCIFACT, SPLIT

from htp_embed import HTPEncoder
from indexes import VectorCorrection
from pipelines.chunking import default_chunk_size, embed_text, make_splitter
from pipelines.correction import _SENTENCE_END, PSEUDO_QUERIES, pseudo_queries
from pipelines.evaluation import EmbeddingCache, prepare_dataset, score_run

TABLE = "pseudo_queries"
PROSE = {  # a short document and a query about it
    "The saxophone quartet improvised jazz melodies in the basement club.": "jazz saxophone quartet",
    "The zebrafish aquarium keeps tropical fish in warm water. Zebrafish regenerate fins.": "zebrafish regenerate fins",
    "The obsidian volcano erupted basalt lava over the plateau.": "volcano erupted lava",
    "Penguins huddle in Antarctica to survive the blizzard winds.": "penguins in the blizzard",
    "Wombats dig long burrows with their strong front claws at night.": "wombat burrows",
    "The tapir uses its flexible snout to grab leaves and fruit.": "tapir snouts",
    "Caramelized sugar tops the French custard dessert at the brasserie.": "caramelized French dessert",
    "The lighthouse keeper logged every passing ship during the storm.": "lighthouse keeper storm",
}


def prose_only(texts: Sequence[str], n: int = PSEUDO_QUERIES, seed: int = 0) -> list[str]:
    """The rule before stop 42: only texts with a sentence of 6-40 words give pseudo-queries
    (every text's first 40 words only when no text has one)."""
    pairs = [s.strip() for t in texts for s in _SENTENCE_END.split(t) if 6 <= len(s.split()) <= 40]
    if not pairs:
        pairs = [" ".join(t.split()[:40]) for t in texts if t.strip()]
    return random.Random(seed).sample(pairs, n) if len(pairs) > n else pairs


RULES: dict[str, Callable[..., list[str]]] = {"prose only": prose_only, "every text": pseudo_queries}


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def corrected(encoder: HTPEncoder, nodes: np.ndarray, queries: np.ndarray, texts: Sequence[str],
              rule: str | None, cache: EmbeddingCache, name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(queries, nodes) as the index would hold and search them under ``rule`` (None: no
    correction) with the pseudo-queries sampled by ``seed`` (the product's is 0), and the number
    of pseudo-queries."""
    if rule is None:
        return normalise(queries), normalise(nodes), 0
    pseudo_texts = RULES[rule](texts, seed=seed)
    pseudo = cache.embed(encoder, pseudo_texts, kind="queries", content_hash=_hash(pseudo_texts), dataset=name)
    correction = VectorCorrection.fit(nodes, pseudo)
    return correction.queries(queries), correction.documents(nodes), len(pseudo_texts)


def _hash(texts: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def nodes_of(encoder: HTPEncoder, texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Node texts as an ingest splits ``texts`` (default chunk size, 32 tokens overlap), and
    the text each came from."""
    from llama_index.core import Document

    splitter = make_splitter(encoder.tokenize, default_chunk_size(encoder), 32)
    nodes = splitter.get_nodes_from_documents([Document(id_=str(i), text=t) for i, t in enumerate(texts)])
    return [embed_text(n) for n in nodes], [int(n.ref_doc_id) for n in nodes]


def development(encoder: HTPEncoder, cache: EmbeddingCache, max_docs: int | None, seeds: int) -> dict:
    """Dense search on the development split under each rule, with ``seeds`` samples of
    pseudo-queries per rule: two samples of 1,024 differ by chance, and that spread is what a
    difference between the rules is to be read against."""
    dataset = prepare_dataset(SCIFACT, SPLIT, max_docs=max_docs, max_queries=None, seed=0)
    texts, owner = nodes_of(encoder, dataset.doc_texts())
    doc_ids = dataset.doc_ids()
    lacking = sum(1 for t in texts if not any(6 <= len(s.split()) <= 40 for s in _SENTENCE_END.split(t)))
    nodes = cache.embed(encoder, texts, kind="documents", content_hash=_hash(texts), dataset=dataset.name)
    queries = cache.embed(encoder, dataset.query_texts(), kind="queries", content_hash=dataset.queries_hash(),
                          dataset=dataset.name)
    owner_arr = np.asarray(owner)
    rows = {}
    for rule in (None, *RULES):
        samples = []
        for seed in range(1 if rule is None else seeds):
            q, d, pseudo = corrected(encoder, nodes, queries, texts, rule, cache, dataset.name, seed)
            scores = q @ d.T
            best = np.full((len(q), len(doc_ids)), -np.inf, dtype=np.float32)
            np.maximum.at(best.T, owner_arr, scores.T)  # a document scores by its best node
            top = np.argsort(-best, axis=1)[:, :100]
            run = {qid: {doc_ids[j]: float(best[i, j]) for j in top[i]} for i, qid in enumerate(dataset.query_ids())}
            means, _ = score_run(dataset.qrels, run)
            samples.append((100 * means["ndcg@10"], 100 * means["recall@100"]))
            print(f"dev {rule or 'no correction'}, seed {seed}: NDCG@10 {samples[-1][0]:.2f}", flush=True)
        ndcg = [s[0] for s in samples]
        rows[rule or "no correction"] = {
            "pseudo_queries": pseudo, "ndcg@10": round(ndcg[0], 2), "recall@100": round(samples[0][1], 2),
            "ndcg@10_seeds": [round(v, 2) for v in ndcg], "ndcg@10_mean": round(float(np.mean(ndcg)), 2)}
    return {"documents": len(doc_ids), "nodes": len(texts), "nodes_without_sentence": lacking,
            "queries": len(queries), "rows": rows}


def lopsided(encoder: HTPEncoder, cache: EmbeddingCache, words: int) -> dict:
    """One long unpunctuated text beside the short prose documents of ``PROSE``."""
    rng = random.Random(0)
    vocabulary = [f"quokka{i}" for i in range(2000)] + ["marsupial", "island", "survey", "count"]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(words)), *PROSE]
    node_texts, owner = nodes_of(encoder, texts)
    nodes = cache.embed(encoder, node_texts, kind="documents", content_hash=_hash(node_texts), dataset="lopsided")
    queries = encoder.encode_queries(list(PROSE.values()))
    rows = {}
    for rule in (None, *RULES):
        q, d, pseudo = corrected(encoder, nodes, queries, node_texts, rule, cache, "lopsided")
        order = np.argsort(-(q @ d.T), axis=1)
        ranks = [int(np.flatnonzero(np.asarray(owner)[order[i]] == i + 1)[0]) for i in range(len(q))]
        rows[rule or "no correction"] = {"pseudo_queries": pseudo, "ranks": ranks}
        print(f"lopsided {rule or 'no correction':14s} {rows[rule or 'no correction']}", flush=True)
    return {"nodes": len(node_texts), "long_text_nodes": owner.count(0), "rows": rows}


def write_markdown(result: dict) -> None:
    dev, lop = result["development"], result["lopsided"]
    lines = [
        "# Pseudo-queries for the vector correction: prose texts only, or every text", "",
        f"{result['encoder']} in {result['dtype']}, {result['cpu']}. See `benchmarks/quality/pseudo_queries.py`.", "",
        f"Development split (SciFact train, {dev['queries']} queries, {dev['documents']} documents as "
        f"{dev['nodes']} nodes, {dev['nodes_without_sentence']} of them without a 6-40-word sentence); "
        "dense search, a document scored by its best node:", "",
        "| rule | pseudo-queries | NDCG@10 (the product's sample) | Recall@100 | NDCG@10 over samples: mean (min-max) |",
        "|---|---|---|---|---|",
        *(f"| {k} | {v['pseudo_queries']} | {v['ndcg@10']:.2f} | {v['recall@100']:.2f} | {v['ndcg@10_mean']:.2f} "
          f"({min(v['ndcg@10_seeds']):.2f}-{max(v['ndcg@10_seeds']):.2f}, {len(v['ndcg@10_seeds'])}) |"
          for k, v in dev["rows"].items()),
        "",
        f"Lopsided corpus ({lop['nodes']} nodes, {lop['long_text_nodes']} of them one unpunctuated text; "
        f"{len(PROSE)} short prose documents, one query each): rank of each query's document in dense search (0 = first):",
        "", "| rule | pseudo-queries | ranks | worst |", "|---|---|---|---|",
        *(f"| {k} | {v['pseudo_queries']} | {v['ranks']} | {max(v['ranks'])} |" for k, v in lop["rows"].items()),
    ]
    (RESULTS / f"{TABLE}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-docs", type=int, default=None, help="subsample the development corpus (default: all)")
    parser.add_argument("--long-words", type=int, default=60_000, help="words of the lopsided corpus's long text")
    parser.add_argument("--dtype", default="bfloat16", help="the encoder's dtype (the CPU default where bf16 pays)")
    parser.add_argument("--seeds", type=int, default=5, help="samples of pseudo-queries per rule on the development split")
    args = parser.parse_args()
    from htp_embed.precision import cpu_model

    began = time.perf_counter()
    encoder = HTPEncoder(dtype=args.dtype, batch_size=8)
    cache = EmbeddingCache()
    result = {"encoder": encoder.describe(),
              "dtype": args.dtype, "cpu": cpu_model(),
              "lopsided": lopsided(encoder, cache, args.long_words),
              "development": development(encoder, cache, args.max_docs, args.seeds)}
    result["seconds"] = round(time.perf_counter() - began)
    (RESULTS / f"{TABLE}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result)
    print((RESULTS / f"{TABLE}.md").read_text())


if __name__ == "__main__":
    main()
