"""Markdown tables and plots from the recorded results (no model is loaded).

    .venv/bin/python benchmarks/quality/report.py

Writes ``benchmarks/results/quality/tables.md``, ``dev_report.md`` (the development split's
full-corpus figures in one table) and ``exit_layers_*.png`` (when matplotlib is
installed). Differences between two settings are paired over the same queries: the mean
per-query NDCG@10 difference with a 95% bootstrap interval (2,000 resamples of the queries).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from common import RESULTS, read_per_query, read_table

PCT = 100.0


def paired_delta(a: dict[str, float], b: dict[str, float], rounds: int = 2000) -> tuple[float, float, float]:
    """Mean of a - b over shared queries and its 95% bootstrap interval, in NDCG points."""
    queries = sorted(set(a) & set(b))
    diffs = [a[q] - b[q] for q in queries]
    if not diffs:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(0)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return PCT * sum(diffs) / n, PCT * means[int(0.025 * rounds)], PCT * means[int(0.975 * rounds)]


def fmt_delta(delta: tuple[float, float, float]) -> str:
    mean, low, high = delta
    mark = "**" if low > 0 or high < 0 else ""
    return f"{mark}{mean:+.1f}{mark} [{low:+.1f}, {high:+.1f}]"


def metric_cells(row: dict[str, Any]) -> list[str]:
    return [f"{PCT * row[m]:.1f}" for m in ("ndcg@10", "recall@10", "recall@100", "mrr@10")]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def methods_table() -> str:
    rows = read_table("methods")
    if not rows:
        return ""
    scores = read_per_query("methods")
    by_label = {r["label"]: r for r in rows}
    out = []
    for r in rows:
        reference = None
        if r.get("model"):
            depth = r["identity"].get("exit_layer")
            reference = f"{r['model']}/vanilla[exit={depth if depth else 'full'}]"
        delta = (fmt_delta(paired_delta(scores[r["label"]], scores[reference]))
                 if reference in by_label and reference != r["label"] else "")
        out.append([r["label"], *metric_cells(r), delta])
    header = ["setting", "NDCG@10", "R@10", "R@100", "MRR@10", "Δ NDCG@10 vs vanilla, same exit [95% CI]"]
    sample = rows[0]
    return (f"### Methods ({sample['queries']} queries, {sample['docs']} documents)\n\n"
            + table(header, out))


def sweep_table(model: str, exits: Sequence[int]) -> str:
    rows = [r for r in read_table("sweep") if r.get("model") == model]
    if not rows:
        return ""
    scores = read_per_query("sweep")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by_key = {(r["variant"], r["exit_depth"]): r for r in rows}
    out = []
    for variant in variants:
        cells = []
        for depth in exits:
            row = by_key.get((variant, depth))
            if row is None:
                cells.append("")
                continue
            text = f"{PCT * row['ndcg@10']:.1f}"
            # Variants with a sink prefix are compared with vanilla given the same prefix.
            reference = "sink-vanilla" if "sink-" in variant else "vanilla"
            vanilla = by_key.get((reference, depth))
            if variant != reference and vanilla is not None:
                mean, low, high = paired_delta(scores[row["label"]], scores[vanilla["label"]])
                mark = "**" if low > 0 or high < 0 else ""
                text += f" ({mark}{mean:+.1f}{mark})"
            cells.append(text)
        out.append([variant, *cells])
    return (f"### {model}: NDCG@10 by exit layer (Δ vs vanilla at the same exit, sink variants vs "
            f"sink-vanilla; bold = 95% CI excludes 0)\n\n"
            + table(["setting", *[f"exit {d}" for d in exits]], out))


def pooled_table(model: str, exits: Sequence[int | None]) -> str:
    """HTP minus vanilla at the same exit, per query, pooled over both disjoint samples."""
    first, second = read_per_query("sweep"), read_per_query("replicate")
    if not second:
        return ""
    variants = sorted({label.split("/")[1] for label in second if label.startswith(model)}
                      - {"vanilla", "sink-vanilla", "vanilla-skip-first"})
    out = []
    for variant in variants:
        reference = "sink-vanilla" if "sink-" in variant else "vanilla"
        cells = []
        for depth in exits:
            tag = depth or "full"
            pooled_a: dict[str, float] = {}
            pooled_b: dict[str, float] = {}
            for name, scores in (("s1", first), ("s2", second)):
                a, b = scores.get(f"{model}/{variant}/exit={tag}"), scores.get(f"{model}/{reference}/exit={tag}")
                if a and b:
                    pooled_a.update({f"{name}:{q}": v for q, v in a.items()})
                    pooled_b.update({f"{name}:{q}": v for q, v in b.items()})
            cells.append(fmt_delta(paired_delta(pooled_a, pooled_b)) + f" (n={len(pooled_a)})")
        out.append([f"{variant} − {reference}", *cells])
    return (f"### {model}: HTP − vanilla NDCG@10 at the same exit, both samples pooled [95% CI]\n\n"
            + table(["setting", *[f"exit {d or 'full'}" for d in exits]], out))


def replicate_table(model: str, exits: Sequence[int | None]) -> str:
    rows = [r for r in read_table("replicate") if r.get("model") == model]
    if not rows:
        return ""
    by_key = {(r["variant"], r["exit_depth"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    out = [[v, *[f"{PCT * by_key[(v, d)]['ndcg@10']:.1f}" if (v, d) in by_key else "" for d in exits]]
           for v in variants]
    sample = rows[0]
    return (f"### {model}, second disjoint sample ({sample['queries']} queries, {sample['docs']} documents): NDCG@10\n\n"
            + table(["setting", *[f"exit {d or 'full'}" for d in exits]], out))


def postprocess_table(model: str, exits: Sequence[int | None]) -> str:
    rows = [r for r in read_table("postprocess") if r.get("model") == model]
    if not rows:
        return ""
    by_key = {(r.get("sample", "first"), r["variant"], r["transform"], r["exit_depth"]): r for r in rows}
    out = []
    for sample_name, variant, transform in dict.fromkeys(
        (r.get("sample", "first"), r["variant"], r["transform"]) for r in rows
    ):
        cells = [f"{PCT * by_key[(sample_name, variant, transform, d)]['ndcg@10']:.1f}"
                 if (sample_name, variant, transform, d) in by_key else "" for d in exits]
        out.append([sample_name, variant, transform, *cells])
    return (f"### {model}: vector post-processing (NDCG@10)\n\n"
            + table(["sample", "setting", "vectors", *[f"exit {d or 'full'}" for d in exits]], out))


def long_docs_table() -> str:
    rows = read_table("long_docs")
    if not rows:
        return ""
    scores = read_per_query("long_docs")
    by_label = {r["label"]: r for r in rows}
    sizes = list(rows[0]["ndcg@10_by_size"])
    out = []
    for r in rows:
        reference = f"{r['model']}/vanilla/exit={r['exit_depth']}"
        delta = (fmt_delta(paired_delta(scores[r["label"]], scores[reference]))
                 if reference in by_label and reference != r["label"] else "")
        out.append([r["label"], *metric_cells(r), *[f"{PCT * r['ndcg@10_by_size'][s]:.1f}" for s in sizes],
                    f"{PCT * r['ndcg@10_by_last'].get('True', float('nan')):.1f}", delta])
    header = ["setting", "NDCG@10", "R@10", "R@100", "MRR@10",
              *[f"NDCG@10, ~{s} tokens ({rows[0]['queries_by_size'][s]} q)" for s in sizes],
              "NDCG@10, relevant abstract last",
              "Δ vs vanilla [95% CI]"]
    return (f"### Long documents ({rows[0]['queries']} queries, {rows[0]['docs']} documents)\n\n"
            + table(header, out))


FIXED_K = ("k=1", "k=2", "k=4", "k=8", "k=12")


def k_by_length_table(exit_depth: int = 13) -> str:
    """Experiment 3's question: per length bucket, each K's NDCG@10, the best fixed K, and how
    far each adaptive rule is from it (target: within 0.5 everywhere)."""
    rows = {r["variant"]: r for r in read_table("long_docs") if r["exit_depth"] == exit_depth}
    if "vanilla" not in rows:
        return ""
    sizes = list(rows["vanilla"]["ndcg@10_by_size"])
    fixed = [k for k in FIXED_K if k in rows]
    adaptive = sorted((v for v in rows if v.startswith("adaptive")), key=lambda v: int(v.split(":")[1]))
    out = []
    for variant in ["vanilla", *fixed, *adaptive]:
        out.append([variant, *[f"{PCT * rows[variant]['ndcg@10_by_size'][s]:.1f}" for s in sizes],
                    f"{PCT * rows[variant]['ndcg@10']:.1f}"])
    def score(variant: str, size: str) -> float:
        return rows[variant]["ndcg@10"] if size == "all" else rows[variant]["ndcg@10_by_size"][size]

    best = {s: max(fixed, key=lambda k, s=s: score(k, s)) for s in [*sizes, "all"]}
    best_score = {s: score(best[s], s) for s in best}
    out.append(["best fixed K", *[f"{best[s]} ({PCT * best_score[s]:.1f})" for s in [*sizes, "all"]]])
    for variant in adaptive:
        cells = []
        for s in [*sizes, "all"]:
            cells.append(f"{PCT * (score(variant, s) - best_score[s]):+.1f}")
        out.append([f"{variant} − best fixed K", *cells])
    header = ["setting", *[f"~{s} tokens ({rows['vanilla']['queries_by_size'][s]} q)" for s in sizes], "all"]
    return (f"### Long documents: K (sentences per block) by length bucket, exit {exit_depth} (NDCG@10)\n\n"
            + table(header, out))


def fusion_table() -> str:
    rows = read_table("fusion")
    if not rows:
        return ""
    return "### Fusion with BM25 (RRF, k = 60)\n\n" + table(
        ["run", "NDCG@10", "R@10", "R@100", "MRR@10"], [[r["label"], *metric_cells(r)] for r in rows]
    )


def _json(name: str) -> dict[str, Any]:
    import json

    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def reranker_rows(name: str, what: str) -> list[tuple[str, dict[str, Any] | None, str]]:
    """The plain and the reranked rows of one reranker run (``rerank.py``'s JSON ``name``): over
    all queries when the run scored them all (or its tuned half A and B make the whole split)."""
    rerank = _json(name)
    chosen = next((r for r in rerank.get("rows", []) if r.get("weight") == rerank.get("chosen_weight_on_A")), None)
    plain = next((r for r in rerank.get("rows", []) if "weight" not in r), None)
    tuned, half_b = rerank.get("tune_queries", 0), rerank.get("b_queries", 0)
    covers_all = tuned + half_b == _json("pipeline").get("queries")
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    for label, row in ((f"hybrid, same run as the reranker ({what})", plain), (f"hybrid + reranker ({what})", chosen)):
        if row is None:
            continue
        whole = row.get("all") or {}
        if not whole and covers_all:  # the weight was chosen on all of half A: both halves make the split
            whole = {m: (tuned * row["tune (A)"][m] + half_b * row["B"][m]) / (tuned + half_b) for m in row["B"]}
        rows.append((label, {"all": whole, "B": row["B"]}, name))
    return rows


def dev_report() -> str:
    """One table of the development split's full-corpus figures (issue 22's report), gathered
    from the benchmarks that measured them, each row naming its source."""
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    pipeline = {row["label"]: row for row in _json("pipeline").get("rows", [])}
    adapter = {(row["correction"], row["mode"], row["alpha"]): row for row in _json("adapter").get("rows", [])}
    reference = {row["label"]: row for row in _json("reference_fusion").get("rows", [])}
    rows += [("BM25 (bm25s)", pipeline.get("reference: bm25"), "pipeline"),
             ("FTS5 BM25 (sparse)", pipeline.get("product sparse (defaults)"), "pipeline"),
             ("dense", pipeline.get("product dense (defaults)"), "pipeline"),
             ("hybrid (default)", pipeline.get("product hybrid (defaults)"), "pipeline"),
             ("dense + adapter", adapter.get(("adapter", "dense", None)), "adapter"),
             ("hybrid + adapter", adapter.get(("adapter", "hybrid", 0.3)), "adapter")]
    feedback = _json("feedback").get("rows", [])
    for family in ("dense PRF", "keyword PRF", "per-query weight", "BM25"):  # each family's best hybrid on half A
        best_row = max((r for r in feedback if r["family"] == family and r["mode"].startswith("hybrid")),
                       key=lambda r: r["A"]["ndcg@10"], default=None)
        if best_row is not None:
            rows.append((f"hybrid, {family} ({best_row['variant']}, {best_row['mode'].split()[-1]})", best_row, "feedback"))
    rows += reranker_rows("rerank_start256_depth10", "first 256 tokens of each hit, as before windows")
    rows += reranker_rows("rerank_best64_depth10", "each hit's heading and best sentences, 64 tokens")
    rows += reranker_rows("rerank_best64_depth8", "the same, top 8 hits")[1:]  # its plain row is the same
    with_adapter = _json("rerank_start256_depth10_adapter")  # B only: the weight is the shipped one, not re-chosen
    shipped = next((r for r in with_adapter.get("rows", []) if r.get("weight") == with_adapter.get("shipped_weight")), None)
    plain_adapter = next((r for r in with_adapter.get("rows", []) if "weight" not in r), None)
    for label, row in (("hybrid + adapter, same run as its reranker", plain_adapter),
                       (f"hybrid + adapter + reranker (weight {with_adapter.get('shipped_weight')})", shipped)):
        if row is not None:
            rows.append((label, {"B": row["B"]}, "rerank_start256_depth10_adapter"))
    best = max((r for r in reference.values() if r["label"].startswith("convex")),
               key=lambda r: r["A"]["ndcg@10"], default=None)
    rows += [("all-MiniLM-L6-v2 (reference)", reference.get("all-MiniLM-L6-v2"), "reference_fusion"),
             (f"BM25 + MiniLM, {best['label'] if best else 'convex'} (reference)", best, "reference_fusion")]
    note = "" if all(row is None or row.get("all") for _, row, _ in rows) else (
        " (over B where the all column shows -: those runs scored B and only part of A)")
    lines = ["## Development split, full corpus (SciFact train: 809 queries, 5,183 documents)", "",
             f"NDCG@10 over all queries and over half B (untouched by every choice); Recall@100 over all{note}.", "",
             "| retrieval | NDCG@10 all | NDCG@10 B | Recall@100 | from |", "|---|---|---|---|---|"]
    for label, row, source in rows:
        if row is None:
            continue
        whole, half_b = row.get("all", {}), row["B"]
        recall = whole.get("recall@100", half_b["recall@100"])
        lines.append(f"| {label} | {whole['ndcg@10']:.1f} | {half_b['ndcg@10']:.1f} | {recall:.1f} | {source}.md |"
                     if whole else f"| {label} | - | {half_b['ndcg@10']:.1f} | {recall:.1f} | {source}.md |")
    return "\n".join(lines)


def plot_exits(model: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = [r for r in read_table("sweep") if r.get("model") == model and r["exit_depth"] is not None]
    if not rows:
        return
    figure, axis = plt.subplots(figsize=(8, 5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        points = sorted((r["exit_depth"], PCT * r["ndcg@10"]) for r in rows if r["variant"] == variant)
        style = {"color": "black", "linewidth": 2.5} if variant == "vanilla" else {"linewidth": 1}
        axis.plot(*zip(*points, strict=True), marker="o", markersize=3, label=variant, **style)
    axis.set_xlabel("exit layer (output of layer d, no final norm)")
    axis.set_ylabel("NDCG@10")
    axis.set_title(f"{model}: SciFact subsample, HTP variants vs vanilla mean pooling")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / f"exit_layers_{model}.png", dpi=120)


def main() -> None:
    parts = [
        methods_table(),
        sweep_table("gemma3-270m", [18, 17, 16, 15, 13, 12, 9]),
        replicate_table("gemma3-270m", [18, 17, 16, 15, 14, 13, 12, None]),
        pooled_table("gemma3-270m", [18, 17, 15, 14, 13, None]),
        postprocess_table("gemma3-270m", [18, 17, 15, 14, 13, 12, 9, None]),
        sweep_table("smollm2-135m", [30, 29, 28, 26, 24, 20, 15]),
        replicate_table("smollm2-135m", [30, 29, 28, 26, 24, None]),
        pooled_table("smollm2-135m", [30, 29, 28, 26, 24, None]),
        postprocess_table("smollm2-135m", [30, 29, 28, 26, 24, 20, None]),
        long_docs_table(),
        k_by_length_table(13),
        fusion_table(),
    ]
    (RESULTS / "tables.md").write_text("\n\n".join(p for p in parts if p) + "\n")
    (RESULTS / "dev_report.md").write_text("# Retrieval quality on the development split\n\n" + dev_report() + "\n")
    for model in ("gemma3-270m", "smollm2-135m"):
        plot_exits(model)
    print((RESULTS / "tables.md").read_text())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # no options: --help describes the run
    main()
