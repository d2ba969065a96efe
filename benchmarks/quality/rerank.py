"""The query-likelihood reranker through the product, beside the default hybrid, on the
development split (SciFact train queries over all 5,183 abstracts).

    nice -n 5 .venv/bin/python benchmarks/quality/rerank.py --work /tmp/htp-quality \\
        [--window best|start] [--passage-tokens 64] [--depth 10] [--compare-cost 30]

Needs ``--work/kv-center`` from ``adapter.py`` (the corpus with the default correction). Each
query's default hybrid list (top 100) comes from ``OpenIndex.search_many``; its best
``--depth`` hits are scored once by the reranker's scorer (``--window best``: each long hit's
heading and best-matching sentences, the product's default; ``start``: its first tokens), then
blended at several weights (``htp_embed.rerank.blend_scores``, what ``rerank`` does) and put
back above the rest of the list, which is what a reranked query returns in its top ``depth``.
The weight is chosen on the first ``--tune`` queries of half A (0: use ``--weight``); half B
(untouched) gives the figure. Seconds per query are the scorer's, on this machine; with
``--compare-cost N`` the product's scorer and the previous one (the first 256 tokens) also
score the same N queries' candidates alternately, for a ratio that load on the machine cannot
bias; one end-to-end ``search(rerank=True)`` is timed per ``--end-to-end`` query. Likelihoods
are kept under ``--work`` so an interrupted run resumes. Writes
``benchmarks/results/quality/rerank_{window}{T}_depth{D}.{json,md}`` (``_adapter`` appended
with ``--index kv-adapter``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from common import RESULTS, SCIFACT, SPLIT, _write_json, dev_halves, score_by_half
from tqdm import tqdm

from benchmarks.machine import cpu_model
from htp_embed.rerank import DEFAULT_WEIGHT, QueryLikelihoodScorer, blend_scores
from pipelines.eval_pipeline import ranked_documents, reranked_on_top
from pipelines.evaluation import prepare_dataset
from pipelines.query import SearchRequest, open_index
from pipelines.settings import load_settings

WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7, 1.0)
PREVIOUS = {"window": "start", "passage_tokens": 256}  # the scorer before passage windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="holds kv-center/ from adapter.py")
    parser.add_argument("--index", default="kv-center",
                        help="which index under --work (kv-adapter: the adapter correction's copy)")
    parser.add_argument("--depth", type=int, default=10, help="hits reranked per query")
    parser.add_argument("--passage-tokens", type=int, default=64, help="tokens of each hit the scorer reads")
    parser.add_argument("--window", choices=("best", "start"), default="best", help="which tokens of a longer hit")
    parser.add_argument("--tune", type=int, default=404, help="queries of half A the weight is chosen on")
    parser.add_argument("--weight", type=float, default=DEFAULT_WEIGHT, help="the weight reported when --tune is 0")
    parser.add_argument("--end-to-end", type=int, default=20, help="queries timed through search(rerank=True)")
    parser.add_argument("--compare-cost", type=int, default=0,
                        help="queries whose candidates both this scorer and the previous one score, alternately")
    args = parser.parse_args()
    dataset = prepare_dataset(SCIFACT, SPLIT)
    qids, texts = dataset.query_ids(), dataset.query_texts()
    halves = dev_halves(qids)
    tune = [q for q in qids if q in halves["A"]][: args.tune]
    scored_ids = set(tune) | halves["B"]
    index = open_index(args.work / args.index, load_settings(rerank_passage_tokens=args.passage_tokens,
                                                                rerank_depth=args.depth))
    encoder = index.encoder

    def scorer_for(window: str, tokens: int) -> QueryLikelihoodScorer:
        return QueryLikelihoodScorer(encoder.model, encoder.tokenizer, max_passage_tokens=tokens, window=window,
                                     segmenter=encoder.config.segmenter)

    scorer = scorer_for(args.window, args.passage_tokens)
    name = f"rerank_{args.window}{args.passage_tokens}_depth{args.depth}"
    if args.index != "kv-center":
        name += f"_{args.index.removeprefix('kv-')}"
    cache_path = args.work / f"{name}.likelihoods.json"
    cache: dict[str, dict] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    requests = [SearchRequest(text, 100) for text in texts]
    hits_by_query = dict(zip(qids, index.search_many(requests), strict=True))
    text_of = dict(zip(qids, texts, strict=True))
    todo = [q for q in qids if q in scored_ids and q not in cache]
    for n, qid in enumerate(tqdm(todo, desc="reranking")):
        head = hits_by_query[qid][: args.depth]
        began = time.perf_counter()
        likelihood = [s.log_likelihood for s in scorer.score(text_of[qid], [h["text"] for h in head])]
        cache[qid] = {"node_ids": [h["node_id"] for h in head], "likelihood": likelihood,
                      "seconds": time.perf_counter() - began}
        if n % 25 == 24:
            cache_path.write_text(json.dumps(cache))
    cache_path.write_text(json.dumps(cache))

    base: dict[str, dict[str, float]] = {}
    blended: dict[float, dict[str, dict[str, float]]] = {w: {} for w in WEIGHTS}
    for qid in scored_ids:
        hits = hits_by_query[qid]
        head = hits[: args.depth]
        if [h["node_id"] for h in head] != cache[qid]["node_ids"]:
            raise SystemExit(f"{cache_path} was scored on other hybrid lists (query {qid}); delete it")
        base[qid] = ranked_documents(hits, 100)
        for weight in WEIGHTS:
            mixed = blend_scores([h["score"] for h in head], cache[qid]["likelihood"], weight)
            blended[weight][qid] = reranked_on_top([{**h, "score": s} for h, s in zip(head, mixed, strict=True)], hits, 100)
    tune_halves = {"tune (A)": set(tune), "B": halves["B"], "all": scored_ids}
    rows = [{"rerank": "none (default hybrid)", **score_by_half(dataset.qrels, base, tune_halves)}]
    for weight in WEIGHTS:
        rows.append({"rerank": f"weight {weight}", "weight": weight,
                     **score_by_half(dataset.qrels, blended[weight], tune_halves)})
    chosen = (max(rows[1:], key=lambda row: row["tune (A)"]["ndcg@10"]) if tune
              else next(row for row in rows[1:] if row["weight"] == args.weight))
    seconds = [cache[q]["seconds"] for q in scored_ids]
    timing = {"scorer_seconds_per_query": _spread(seconds)}
    if args.compare_cost:
        timing["side_by_side"] = compare_cost(scorer, scorer_for(PREVIOUS["window"], PREVIOUS["passage_tokens"]),
                                              [(text_of[q], hits_by_query[q][: args.depth]) for q in qids[: args.compare_cost]])
    if args.end_to_end and args.window == "best":
        end_to_end = []
        for text in texts[: args.end_to_end]:
            began = time.perf_counter()
            index.search(text, 5, rerank=True)
            end_to_end.append(time.perf_counter() - began)
        timing["search_rerank_top5_seconds"] = _spread(end_to_end)
    result = {"dataset": dataset.name, "split": SPLIT, "docs": len(dataset.corpus), "index": args.index,
              "correction": index.store.correction_summary(), "depth": args.depth, "window": args.window,
              "passage_tokens": args.passage_tokens, "tune_queries": len(tune), "b_queries": len(halves["B"]),
              "encoder": index.embedding.model_name, "machine": f"{cpu_model()}, {os.cpu_count()} cores",
              "chosen_weight_on_A": chosen["weight"] if tune else None, "shipped_weight": DEFAULT_WEIGHT,
              "timing": timing, "rows": rows}
    _write_json(RESULTS / f"{name}.json", result)
    what = ("each hit's heading and the sentences that best match the query" if args.window == "best"
            else "each hit's first tokens")
    lines = ["# Query-likelihood reranking through the product (SciFact train, development split)", "",
             f"Hybrid top {args.depth} of each query ({args.index}: correction "
             f"{(result['correction'] or {}).get('kind', 'none')}) reranked by {result['encoder']} at full depth, "
             f"reading {what} within {args.passage_tokens} tokens, blended with the retrieval score "
             f"(z-scores; weight = the likelihood's share). "
             + (f"Weight chosen on {len(tune)} queries of half A (best there: {chosen['weight']}; shipped: "
                f"{DEFAULT_WEIGHT}); " if tune else f"Weight {args.weight} (not tuned in this run); ")
             + f"half B ({len(halves['B'])} queries) is untouched. Corpus {len(dataset.corpus)} documents. "
             f"Machine: {result['machine']}.", "",
             f"Scorer seconds per query: {_words(timing['scorer_seconds_per_query'])}."]
    if "search_rerank_top5_seconds" in timing:
        lines.append(f"`search(top_k=5, rerank=True)` end to end: {_words(timing['search_rerank_top5_seconds'])}.")
    if "side_by_side" in timing:
        side = timing["side_by_side"]
        lines.append(f"Side by side on the same {side['queries']} queries' candidates, alternating: this scorer "
                     f"p50 {side['this_p50']} s, the first 256 tokens p50 {side['previous_p50']} s: "
                     f"{side['ratio_p50']}x less time.")
    lines += ["", "| rerank | NDCG@10 tune (A) | NDCG@10 B | NDCG@10 all scored | Recall@100 B |", "|---|---|---|---|---|"]
    for row in rows:
        mark = " (chosen)" if row is chosen else ""
        lines.append(f"| {row['rerank']}{mark} | {row['tune (A)']['ndcg@10']:.1f} | {row['B']['ndcg@10']:.1f} | "
                     f"{row['all']['ndcg@10']:.1f} | {row['B']['recall@100']:.1f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def compare_cost(this: QueryLikelihoodScorer, previous: QueryLikelihoodScorer, queries: list) -> dict:
    """Both scorers on the same candidates, alternating query by query (which goes first too)."""
    mine, theirs = [], []
    for n, (text, head) in enumerate(queries):
        passages = [h["text"] for h in head]
        pair = [(this, mine), (previous, theirs)]
        for scorer, times in pair if n % 2 == 0 else pair[::-1]:
            began = time.perf_counter()
            scorer.score(text, passages)
            times.append(time.perf_counter() - began)
    return {"queries": len(queries), "this_p50": round(statistics.median(mine), 3),
            "previous_p50": round(statistics.median(theirs), 3),
            "ratio_p50": round(statistics.median(t / m for t, m in zip(theirs, mine, strict=True)), 2)}


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": round(statistics.mean(values), 3), "p50": round(statistics.median(values), 3),
            "p95": round(ordered[int(0.95 * (len(ordered) - 1))], 3)}


def _words(spread: dict[str, float]) -> str:
    return f"mean {spread['mean']}, p50 {spread['p50']}, p95 {spread['p95']} s"


if __name__ == "__main__":
    main()
