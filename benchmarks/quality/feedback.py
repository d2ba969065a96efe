"""Can the default hybrid's own signals go further? Pseudo-relevance feedback and keyword
scoring variants, side by side with the default, on the development split.

    nice -n 5 .venv/bin/python benchmarks/quality/feedback.py --work /tmp/htp-quality

Needs ``--work/kv-center`` from ``adapter.py`` (SciFact train over all 5,183 abstracts, the
default centring). Every variant is scored from the same stored vectors and the same keyword
analysis, in numpy, so only the variant differs:

* the baseline is re-computed here (exact dense search over the stored vectors, FTS5's BM25
  over the product's own keyword analysis, `indexes.fusion.fuse`) and must equal the product's
  figures in ``pipeline.md``: a check that the rest measures what the product would do;
* dense feedback (Rocchio): the query vector plus ``beta`` times the mean of the first ``m``
  hits' vectors, searched again and fused with the keyword side; the hits come either from the
  hybrid ranking or from dense search alone;
* keyword feedback (RM3-style): the query's terms (share ``orig``) plus the ``n`` terms that
  weigh most in the first ``m`` hybrid hits (tf / length x idf), searched again and fused;
* a per-query weight: alpha 0.3 moved up or down with how peaked either side's list is;
* BM25's ``k1`` and ``b`` (FTS5 fixes 1.2 and 0.75).

Queries are split into the fixed halves A (choices) and B (untouched) of ``common.dev_halves``.
Writes ``benchmarks/results/quality/feedback.{json,md}``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from common import RESULTS, SCIFACT, SPLIT, _write_json, dev_halves, score_by_half

from indexes import fusion
from indexes.keywords import KeywordSegment, analyse_query
from pipelines.eval_pipeline import ranked_documents
from pipelines.evaluation import prepare_dataset
from pipelines.query import open_index
from pipelines.settings import load_settings

DEPTH = 100  # candidates per side, as the product fuses (fusion.CANDIDATES)
Hits = list[tuple[int, float]]


class KeywordScorer:
    """FTS5's BM25 over the product's keyword analysis of the nodes, with weighted query
    tokens and settable k1 and b (equal to `indexes.keywords` at weights 1, k1 1.2, b 0.75)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.segment = segment = KeywordSegment.from_texts(texts)
        self.rows = segment.rows
        self.lengths = segment.doclen.astype(np.float64)
        self.avgdl = segment.total_tokens / self.rows
        self.set_parameters(1.2, 0.75)
        self.idf = {}
        self.doc_terms: list[dict[str, int]] = [{} for _ in range(self.rows)]
        for term_id in range(segment.n_terms):
            start, end = int(segment.post_offsets[term_id]), int(segment.post_offsets[term_id + 1])
            token = segment.term(term_id)
            n = end - start
            self.idf[token] = max(np.log((self.rows - n + 0.5) / (n + 0.5)), 1e-6)
            for row, tf in zip(segment.docs[start:end].tolist(), segment.tfs[start:end].tolist(), strict=True):
                self.doc_terms[row][token] = tf

    def set_parameters(self, k1: float, b: float) -> None:
        self.k1 = k1
        self.length_part = k1 * (1 - b + b * self.lengths / self.avgdl)

    def scores(self, weights: dict[str, float]) -> np.ndarray:
        out = np.zeros(self.rows)
        for token, weight in weights.items():
            term_id = self.segment.term_id(token)
            if term_id < 0:
                continue
            start, end = int(self.segment.post_offsets[term_id]), int(self.segment.post_offsets[term_id + 1])
            rows, tf = self.segment.docs[start:end], self.segment.tfs[start:end].astype(np.float64)
            out[rows] += weight * self.idf[token] * tf * (self.k1 + 1) / (tf + self.length_part[rows])
        return out

    def expansion(self, rows: Sequence[int], n: int) -> list[tuple[str, float]]:
        """The ``n`` tokens that weigh most in ``rows``: sum of tf / length, ranked by that x idf."""
        weights: dict[str, float] = {}
        for row in rows:
            for token, tf in self.doc_terms[row].items():
                weights[token] = weights.get(token, 0.0) + tf / self.lengths[row]
        return sorted(weights.items(), key=lambda item: -item[1] * self.idf[item[0]])[:n]


def top(scores: np.ndarray, k: int = DEPTH, positive: bool = False) -> Hits:
    rows = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
    rows = rows[np.argsort(-scores[rows], kind="stable")]
    return [(int(r), float(scores[r])) for r in rows if not positive or scores[r] > 0]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="holds kv-center/ from adapter.py")
    args = parser.parse_args()
    began = time.perf_counter()
    dataset = prepare_dataset(SCIFACT, SPLIT)
    qids, texts = dataset.query_ids(), dataset.query_texts()
    halves = dev_halves(qids)
    index = open_index(args.work / "kv-center", load_settings())
    store = index.store
    nodes = store.all_nodes()
    doc_of = [str(node.ref_doc_id) for node in nodes]
    stored = dict(store.iter_embeddings())
    docs = np.stack([stored[node.node_id] for node in nodes]).astype(np.float32)
    queries = store.correction.queries(np.asarray(index.encoder.encode_queries(texts), dtype=np.float32))
    keywords = KeywordScorer([node.text for node in nodes])
    query_tokens = [dict(analyse_query(text)) for text in texts]

    rows: list[dict] = []

    def record(family: str, variant: str, mode: str, hits: Sequence[Hits]) -> dict:
        run = {qid: ranked_documents([{"doc_id": doc_of[r], "score": score} for r, score in ranked], DEPTH)
               for qid, ranked in zip(qids, hits, strict=True)}
        row = {"family": family, "variant": variant, "mode": mode, **score_by_half(dataset.qrels, run, halves)}
        rows.append(row)
        print(f"{family:10s} {variant:34s} {mode:12s} all {row['all']['ndcg@10']:5.1f}  A {row['A']['ndcg@10']:5.1f}"
              f"  B {row['B']['ndcg@10']:5.1f}  R@100 {row['all']['recall@100']:5.1f}", flush=True)
        return row

    def fused(dense: Sequence[Hits], sparse: Sequence[Hits], alpha: float | None = None) -> list[Hits]:
        return [fusion.fuse(d, s, alpha=alpha)[:DEPTH] for d, s in zip(dense, sparse, strict=True)]

    dense = [top(row) for row in queries @ docs.T]
    sparse = [top(keywords.scores(tokens), positive=True) for tokens in query_tokens]
    hybrid = fused(dense, sparse)
    record("baseline", "default", "dense", dense)
    record("baseline", "default", "sparse", sparse)
    record("baseline", "default", "hybrid", hybrid)

    def dense_feedback(source: Sequence[Hits], m: int, beta: float) -> list[Hits]:
        return [top(docs @ unit(q + beta * docs[[r for r, _ in hits[:m]]].mean(0)))
                for q, hits in zip(queries, source, strict=True)]

    for source_name, source in (("hybrid", hybrid), ("dense", dense)):
        for m in (3, 5, 10):
            for beta in (0.5, 1.0, 2.0):
                expanded = dense_feedback(source, m, beta)
                variant = f"from {source_name}, m={m}, beta={beta}"
                record("dense PRF", variant, "dense", expanded)
                for alpha in (0.3, 0.4, 0.5):
                    record("dense PRF", variant, f"hybrid a={alpha}", fused(expanded, sparse, alpha))

    def keyword_feedback(m: int, n: int, orig: float) -> list[Hits]:
        out = []
        for tokens, hits in zip(query_tokens, hybrid, strict=True):
            terms = keywords.expansion([r for r, _ in hits[:m]], n)
            total, query_total = sum(w for _, w in terms) or 1.0, sum(tokens.values()) or 1.0
            weights = {t: orig * w / query_total for t, w in tokens.items()}
            for token, weight in terms:
                weights[token] = weights.get(token, 0.0) + (1 - orig) * weight / total
            out.append(top(keywords.scores(weights), positive=True))
        return out

    for m in (3, 10):
        for n in (10, 40):
            for orig in (0.5, 0.7):
                expanded = keyword_feedback(m, n, orig)
                variant = f"m={m}, terms={n}, orig={orig}"
                record("keyword PRF", variant, "sparse", expanded)
                for alpha in (0.2, 0.3):
                    record("keyword PRF", variant, f"hybrid a={alpha}", fused(dense, expanded, alpha))

    # A per-query weight of the dense side: alpha 0.3 moved by how peaked either side's list is
    # (score drop from hit 1 to hit 10, standardised over the queries).
    spreads = {"keyword": [(h[0][1] - h[min(9, len(h) - 1)][1]) / h[0][1] if h else 0.0 for h in sparse],
               "dense": [h[0][1] - h[9][1] for h in dense]}
    for side, spread in spreads.items():
        z = (np.asarray(spread) - np.median(spread)) / (np.std(spread) + 1e-9)
        for slope in (-0.1, -0.05, 0.05, 0.1):
            alphas = np.clip(0.3 + slope * z, 0.05, 0.7)
            hits = [fusion.fuse(d, s, alpha=float(a))[:DEPTH] for d, s, a in zip(dense, sparse, alphas, strict=True)]
            record("per-query weight", f"{side} spread, slope {slope}", "hybrid a=0.3+", hits)

    for k1 in (0.9, 1.2, 1.5):
        for b in (0.5, 0.75, 1.0):
            keywords.set_parameters(k1, b)
            bm25 = [top(keywords.scores(tokens), positive=True) for tokens in query_tokens]
            record("BM25", f"k1={k1}, b={b}", "sparse", bm25)
            record("BM25", f"k1={k1}, b={b}", "hybrid a=0.3", fused(dense, bm25, 0.3))

    report(rows, dataset.name, len(qids), len(doc_of), round(time.perf_counter() - began, 1))


def report(rows: list[dict], dataset: str, queries: int, nodes: int, seconds: float) -> None:
    _write_json(RESULTS / "feedback.json", {"dataset": dataset, "split": SPLIT, "queries": queries,
                                             "nodes": nodes, "seconds": seconds, "rows": rows})
    base = {r["mode"]: r for r in rows if r["family"] == "baseline"}
    best: Callable[[str], dict] = lambda family: max(  # noqa: E731
        (r for r in rows if r["family"] == family and r["mode"].startswith("hybrid")), key=lambda r: r["A"]["ndcg@10"])
    lines = [
        "# Feedback and keyword-scoring variants beside the default hybrid (SciFact train, development split)", "",
        f"{queries} queries over {nodes} nodes of all 5,183 abstracts, default centring; every variant "
        "from the same stored vectors and keyword analysis (numpy; the baseline equals the product's "
        "`pipeline.md`). Best hybrid variant of each family chosen on half A; B is untouched.", "",
        "| family | variant (best on A) | mode | NDCG@10 all | A | B | Recall@100 |", "|---|---|---|---|---|---|---|"]
    for row in [base["dense"], base["sparse"], base["hybrid"], *(best(f) for f in ("dense PRF", "keyword PRF", "per-query weight", "BM25"))]:
        lines.append(f"| {row['family']} | {row['variant']} | {row['mode']} | {row['all']['ndcg@10']:.1f} | "
                     f"{row['A']['ndcg@10']:.1f} | {row['B']['ndcg@10']:.1f} | {row['all']['recall@100']:.1f} |")
    prf_dense = max((r for r in rows if r["family"] == "dense PRF" and r["mode"] == "dense"), key=lambda r: r["A"]["ndcg@10"])
    lines += ["", f"Dense search fed by the hybrid's hits ({prf_dense['variant']}) reaches "
              f"{prf_dense['all']['ndcg@10']:.1f} NDCG@10 alone (dense baseline {base['dense']['all']['ndcg@10']:.1f}), "
              "but that is the keyword side's evidence coming back: fused again, it adds little. "
              f"Every row: `feedback.json`. {seconds} s in all."]
    (RESULTS / "feedback.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
