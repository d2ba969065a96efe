"""Which deployable correction of the vectors' geometry, and which fusion with BM25?

    nice -n 5 .venv/bin/python benchmarks/quality/correction.py [--max-docs N]

Development split only: SciFact ``train`` (809 judged queries) over the full corpus (5,183
abstracts) unless ``--max-docs`` subsamples it. The default encoder (gemma3-270m, htp,
exit 13) runs in bfloat16, the product's CPU default where the CPU has bf16 instructions.

Every candidate is fitted on the corpus alone, as an index could at ingest time:

* ``raw``: the encoder's vectors (what the product served before this study);
* ``docmean``: documents and queries minus the document mean, re-normalised;
* ``docmean+pseudo``: documents minus the document mean; queries minus the mean of
  *pseudo-queries* (sentences of the corpus embedded with the query instruction);
* ``query-only``: only the query is centred (on the pseudo-query mean) and the stored documents
  stay as they are: ranking by ``q'.d`` equals ranking by ``q'.(d - mean_d)``, so this is
  document centring without re-normalising documents, and it needs no document re-embedding;
* ``... -pcN``: additionally the top N principal directions of the centred documents removed
  from both sides (all-but-the-top);
* ``oracle``: queries minus the *evaluation queries'* own mean (no deployment has it; the
  +10 figure of earlier tables), for reference only.

Then each correction is fused with BM25 (bm25s) by a convex combination of min-max normalised
scores (with a floor) over alpha = dense weight, and by reciprocal-rank fusion. The queries are
split in two halves by a fixed seed: a setting is chosen on half A and reported on half B too,
so the chosen figure is not only a fit to the data that chose it.
Rows go to ``benchmarks/results/quality/correction.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time

import numpy as np
from common import RESULTS, SCIFACT, SPLIT, _write_json

from htp_embed import HTPEncoder
from pipelines.evaluation import EmbeddingCache, bm25_run, exact_search, prepare_dataset, score_run

TABLE = "correction"
PSEUDO_QUERIES = 1024


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def pseudo_queries(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """Sentences of the corpus of 6-40 words, sampled with a fixed seed."""
    sentences = [
        s.strip()
        for text in texts
        for s in re.split(r"(?<=[.!?])\s+", text)
        if 6 <= len(s.split()) <= 40
    ]
    return random.Random(seed).sample(sentences, min(n, len(sentences)))


def top_directions(centred_docs: np.ndarray, n: int) -> np.ndarray:
    _, _, vt = np.linalg.svd(centred_docs - centred_docs.mean(0), full_matrices=False)
    return vt[:n]


def remove(x: np.ndarray, directions: np.ndarray) -> np.ndarray:
    return x - (x @ directions.T) @ directions


def minmax_convex(lexical: dict, dense: dict, alpha: float, floor: float, top_k: int = 100) -> dict:
    """alpha * dense + (1 - alpha) * lexical, each min-max normalised per query over its own top
    list; the minimum is taken no higher than ``floor`` of the maximum, so a flat list of
    near-equal scores does not stretch to [0, 1] (noise getting full weight)."""
    fused = {}
    for q in set(lexical) | set(dense):
        parts = []
        for run, weight in ((dense.get(q, {}), alpha), (lexical.get(q, {}), 1 - alpha)):
            if not run:
                parts.append({})
                continue
            hi = max(run.values())
            lo = min(min(run.values()), hi * floor) if hi > 0 else min(run.values())
            span = (hi - lo) or 1.0
            parts.append({d: weight * (s - lo) / span for d, s in run.items()})
        scores: dict[str, float] = {}
        for part in parts:
            for d, s in part.items():
                scores[d] = scores.get(d, 0.0) + s
        fused[q] = dict(sorted(scores.items(), key=lambda kv: -kv[1])[:top_k])
    return fused


def rrf(runs: list[dict], k: int, weights: list[float], top_k: int = 100) -> dict:
    fused: dict = {}
    for run, w in zip(runs, weights, strict=True):
        for q, docs in run.items():
            target = fused.setdefault(q, {})
            for rank, (d, _) in enumerate(sorted(docs.items(), key=lambda kv: -kv[1]), start=1):
                target[d] = target.get(d, 0.0) + w / (k + rank)
    return {q: dict(sorted(v.items(), key=lambda kv: -kv[1])[:top_k]) for q, v in fused.items()}


def write_markdown(result: dict, path) -> None:
    """The table of a run: references and corrections, then the best fusions by NDCG@10."""
    rows = result["rows"]
    lines = [
        "# Vector corrections and fusions (research harness, development split)", "",
        f"SciFact {result['split']}: {result['queries']} queries over {result['docs']} documents "
        f"(every judged document plus random others); {result['encoder']} in {result['dtype']}; "
        f"{result['pseudo_queries']} pseudo-queries. Halves A/B of the queries by a fixed seed.", "",
        "| setting | NDCG@10 all | A | B | Recall@100 | mean top-1 score | top-1 minus top-10 |",
        "|---|---|---|---|---|---|---|",
    ]
    plain = [r for r in rows if not r["label"].startswith(("convex", "rrf"))]
    fused = sorted((r for r in rows if r["label"].startswith(("convex", "rrf"))),
                   key=lambda r: -r["A"]["ndcg@10"])[:12]
    for r in plain + fused:
        lines.append(f"| {r['label']} | {r['all']['ndcg@10']:.1f} | {r['A']['ndcg@10']:.1f} | "
                     f"{r['B']['ndcg@10']:.1f} | {r['all']['recall@100']:.1f} | {r.get('top1_mean', '-')} | "
                     f"{r.get('top1_minus_top10', '-')} |")
    lines += ["", "Fusions: the 12 best on half A. `floor` bounds min-max normalisation (see "
              "`indexes/fusion.py`); `oracle` centres queries on the evaluation queries' own mean, "
              "which no deployment has."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-docs", type=int, default=None, help="use at most this many documents (a quick run)")
    parser.add_argument("--dtype", default="bfloat16", help="encoder precision (default: %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON")
    args = parser.parse_args()
    suffix = "" if args.max_docs is None else f"_maxdocs{args.max_docs}"
    if args.report_only:
        write_markdown(json.loads((RESULTS / f"{TABLE}{suffix}.json").read_text()), RESULTS / f"{TABLE}{suffix}.md")
        return
    began = time.perf_counter()
    dataset = prepare_dataset(SCIFACT, SPLIT, max_docs=args.max_docs, max_queries=None, seed=0)
    encoder = HTPEncoder(dtype=args.dtype, batch_size=8)
    cache = EmbeddingCache()
    doc_texts = dataset.doc_texts()
    docs = cache.embed(encoder, doc_texts, kind="documents", content_hash=dataset.corpus_hash(), dataset=dataset.name)
    queries = cache.embed(encoder, dataset.query_texts(), kind="queries", content_hash=dataset.queries_hash(), dataset=dataset.name)
    pseudo_texts = pseudo_queries(doc_texts, PSEUDO_QUERIES)
    pseudo = cache.embed(encoder, pseudo_texts, kind="queries",
                         content_hash=hashlib.sha256("\x00".join(pseudo_texts).encode()).hexdigest(),
                         dataset=dataset.name)
    print(f"embedded in {time.perf_counter() - began:.0f} s; cache hits {cache.hits}", flush=True)

    mu_d = docs.mean(0)
    mu_p = pseudo.mean(0)
    mu_q = queries.mean(0)
    corrections = {
        "raw": (queries, docs),
        "docmean": (normalise(queries - mu_d), normalise(docs - mu_d)),
        "docmean+pseudo": (normalise(queries - mu_p), normalise(docs - mu_d)),
        "query-only(pseudo)": (normalise(queries - mu_p), docs),
        "query-only(docmean)": (normalise(queries - mu_d), docs),
        "oracle": (normalise(queries - mu_q), normalise(docs - mu_d)),
    }
    for n in (1, 2, 4, 8):
        pcs = top_directions(docs - mu_d, n)
        corrections[f"docmean+pseudo-pc{n}"] = (
            normalise(remove(queries - mu_p, pcs)), normalise(remove(docs - mu_d, pcs)))

    qids = dataset.query_ids()
    halves = {"A": set(random.Random(7).sample(sorted(qids), len(qids) // 2))}
    halves["B"] = set(qids) - halves["A"]

    def metrics(run: dict) -> dict:
        out = {}
        for name, keep in (("all", set(qids)), *halves.items()):
            qrels = {q: v for q, v in dataset.qrels.items() if q in keep}
            means, _ = score_run(qrels, {q: v for q, v in run.items() if q in keep})
            out[name] = {m: round(100 * v, 2) for m, v in means.items()}
        return out

    rows = []

    def add(label: str, run: dict, **extra) -> None:
        row = {"label": label, **extra, **metrics(run)}
        rows.append(row)
        print(f"{label:48s} all={row['all']['ndcg@10']:.2f} A={row['A']['ndcg@10']:.2f} "
              f"B={row['B']['ndcg@10']:.2f} r@100={row['all']['recall@100']:.2f}", flush=True)

    lexical = bm25_run(dataset, 100)
    add("bm25 (bm25s)", lexical)
    dense_runs = {}
    for name, (q, d) in corrections.items():
        run = exact_search(q, d, qids, dataset.doc_ids(), 100)
        dense_runs[name] = run
        scores = (q @ d.T)
        top1 = np.sort(scores, axis=1)[:, -1]
        top10 = np.sort(scores, axis=1)[:, -10]
        add(f"dense {name}", run, top1_mean=round(float(top1.mean()), 4),
            top1_minus_top10=round(float((top1 - top10).mean()), 4))
    for name in ("raw", "docmean", "docmean+pseudo", "query-only(pseudo)", "docmean+pseudo-pc1",
                 "docmean+pseudo-pc2"):
        for alpha in (0.2, 0.3, 0.4, 0.5, 0.6):
            for floor in (0.0, 0.5):
                add(f"convex {name} alpha={alpha} floor={floor}",
                    minmax_convex(lexical, dense_runs[name], alpha, floor), fusion="convex",
                    correction=name, alpha=alpha, floor=floor)
        for k in (10, 60):
            add(f"rrf {name} k={k}", rrf([lexical, dense_runs[name]], k, [1.0, 1.0]), fusion="rrf",
                correction=name, k=k)
    result = {
        "dataset": dataset.name, "split": SPLIT, "queries": len(qids), "docs": len(doc_texts),
        "encoder": encoder.describe(), "dtype": args.dtype, "pseudo_queries": len(pseudo_texts),
        "halves": {k: len(v) for k, v in halves.items()}, "rows": rows,
        "seconds": round(time.perf_counter() - began, 1),
    }
    _write_json(RESULTS / f"{TABLE}{suffix}.json", result)
    write_markdown(result, RESULTS / f"{TABLE}{suffix}.md")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
