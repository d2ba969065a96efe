"""The query-likelihood reranker through the product, beside the default hybrid, on the
development split (SciFact train queries over all 5,183 abstracts).

    nice -n 5 .venv/bin/python benchmarks/quality/rerank.py --work /tmp/htp-quality

Needs ``--work/kv-center`` from ``adapter.py`` (the corpus with the default correction). Each
query's default hybrid list (top 100) comes from ``OpenIndex.search_many``; its best
``--depth`` hits are scored once by the reranker's scorer, then blended at several weights
(``htp_embed.rerank.blend_scores``, what ``rerank`` does) and put back above the rest of the
list, which is what a reranked query returns in its top ``depth``. The weight is chosen on the
first ``--tune`` queries of half A; half B (untouched) gives the figure. Seconds per query are
the scorer's, on this machine, and one end-to-end ``search(rerank=True)`` per timed query.
Writes ``benchmarks/results/quality/rerank.{json,md}`` (with other depths or passage lengths,
``rerank_depth{D}_tokens{T}.{json,md}``; with ``--index kv-adapter``, the same names ending in
``_adapter``).
"""

from __future__ import annotations

import argparse
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

WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="holds kv-center/ from adapter.py")
    parser.add_argument("--index", default="kv-center",
                        help="which index under --work (kv-adapter: the adapter correction's copy)")
    parser.add_argument("--depth", type=int, default=10, help="hits reranked per query")
    parser.add_argument("--passage-tokens", type=int, default=256, help="tokens of each hit the scorer reads")
    parser.add_argument("--tune", type=int, default=120, help="queries of half A the weight is chosen on")
    parser.add_argument("--end-to-end", type=int, default=20, help="queries timed through search(rerank=True)")
    args = parser.parse_args()
    dataset = prepare_dataset(SCIFACT, SPLIT)
    qids, texts = dataset.query_ids(), dataset.query_texts()
    halves = dev_halves(qids)
    tune = [q for q in qids if q in halves["A"]][: args.tune]
    scored_ids = set(tune) | halves["B"]
    index = open_index(args.work / args.index, load_settings(rerank_passage_tokens=args.passage_tokens,
                                                                rerank_depth=args.depth))
    scorer = QueryLikelihoodScorer(index.encoder.model, index.encoder.tokenizer, max_passage_tokens=args.passage_tokens)
    base: dict[str, dict[str, float]] = {}
    blended: dict[float, dict[str, dict[str, float]]] = {w: {} for w in WEIGHTS}
    seconds: list[float] = []
    requests = [SearchRequest(text, 100) for text in texts]
    hits_by_query = dict(zip(qids, index.search_many(requests), strict=True))
    for qid, text in tqdm([(q, t) for q, t in zip(qids, texts, strict=True) if q in scored_ids], desc="reranking"):
        hits = hits_by_query[qid]
        base[qid] = ranked_documents(hits, 100)
        head = hits[: args.depth]
        began = time.perf_counter()
        likelihood = [s.log_likelihood for s in scorer.score(text, [h["text"] for h in head])]
        seconds.append(time.perf_counter() - began)
        for weight in WEIGHTS:
            mixed = blend_scores([h["score"] for h in head], likelihood, weight)
            reranked = [{**h, "score": score} for h, score in zip(head, mixed, strict=True)]
            blended[weight][qid] = reranked_on_top(reranked, hits, 100)
    tune_halves = {"tune (A)": set(tune), "B": halves["B"]}
    rows = [{"rerank": "none (default hybrid)", **score_by_half(dataset.qrels, base, tune_halves)}]
    for weight in WEIGHTS:
        rows.append({"rerank": f"weight {weight}", "weight": weight,
                     **score_by_half(dataset.qrels, blended[weight], tune_halves)})
    chosen = max(rows[1:], key=lambda row: row["tune (A)"]["ndcg@10"])
    end_to_end = []
    for text in texts[: args.end_to_end]:
        began = time.perf_counter()
        index.search(text, 5, rerank=True)
        end_to_end.append(time.perf_counter() - began)
    timing = {
        "scorer_seconds_per_query": {"mean": round(statistics.mean(seconds), 3),
                                     "p50": round(statistics.median(seconds), 3),
                                     "p95": round(sorted(seconds)[int(0.95 * (len(seconds) - 1))], 3)},
        "search_rerank_top5_seconds_p50": round(statistics.median(end_to_end), 3),
        "search_plain_note": "benchmarks/results/service_latency.md has the query without reranking",
    }
    result = {"dataset": dataset.name, "split": SPLIT, "docs": len(dataset.corpus), "index": args.index,
              "correction": index.store.correction_summary(), "depth": args.depth,
              "passage_tokens": args.passage_tokens, "tune_queries": len(tune), "b_queries": len(halves["B"]),
              "encoder": index.embedding.model_name, "machine": f"{cpu_model()}, {os.cpu_count()} cores",
              "chosen_weight_on_A": chosen["weight"], "shipped_weight": DEFAULT_WEIGHT, "timing": timing, "rows": rows}
    name = "rerank" if (args.depth, args.passage_tokens) == (10, 256) else f"rerank_depth{args.depth}_tokens{args.passage_tokens}"
    if args.index != "kv-center":
        name += f"_{args.index.removeprefix('kv-')}"
    _write_json(RESULTS / f"{name}.json", result)
    lines = ["# Query-likelihood reranking through the product (SciFact train, development split)", "",
             f"Hybrid top {args.depth} of each query ({args.index}: correction "
             f"{(result['correction'] or {}).get('kind', 'none')}) reranked by {result['encoder']} at full depth "
             f"(passages cut to {args.passage_tokens} tokens), blended with the retrieval score "
             f"(z-scores; weight = the likelihood's share). Weight chosen on {len(tune)} queries of half A "
             f"(best there: {chosen['weight']}; shipped: {DEFAULT_WEIGHT}); half B ({len(halves['B'])} queries) "
             f"is untouched. Corpus {len(dataset.corpus)} documents. Machine: {result['machine']}.", "",
             f"Scorer seconds per query: mean {timing['scorer_seconds_per_query']['mean']}, p50 "
             f"{timing['scorer_seconds_per_query']['p50']}, p95 {timing['scorer_seconds_per_query']['p95']}; "
             f"`search(top_k=5, rerank=True)` end to end p50 {timing['search_rerank_top5_seconds_p50']} s.", "",
             "| rerank | NDCG@10 tune (A) | NDCG@10 B | Recall@100 B |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['rerank']} | {row['tune (A)']['ndcg@10']:.1f} | {row['B']['ndcg@10']:.1f} | "
                     f"{row['B']['recall@100']:.1f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
