"""Queries at their exact widths vs padded to a few widths: memory, first-query and steady speed.

    python benchmarks/query_widths.py [--claims 300] [--tail 300] [--rounds 2]

On the CPU oneDNN compiles and keeps a kernel for every new input shape, and a single query's
shape is its length. ``htp_embed.query_widths`` pads a few queries to one of a few widths.
Each setting runs in its own process (fresh kernel caches), the settings alternating for
``--rounds`` rounds:

* ``exact``: no padding (``query_widths.ENABLED = False``), as before;
* ``padded``: the default;
* ``padded, warmed``: the default after ``warm_query_widths()``, as ``htp-index serve`` starts.

In each: SciFact claims embedded one at a time by the fresh process (p50 / p95 ms, RSS growth),
then a tail of texts of 3 to ``--tail`` + 2 words (a service's long queries: one length each;
p50 and RSS growth). Then, in one more process per round, the steady state: every claim run at
both settings first, then each claim at both, alternating which goes first (p50s, the median
of the per-claim ratio, and the least cosine between the two vectors). Writes
``benchmarks/results/query_widths.{json,md}`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = ("exact", "padded", "padded, warmed")


def timed(encoder, texts: list[str]) -> list[float]:
    """Milliseconds to embed each text alone, as a query."""
    out = []
    for text in texts:
        began = time.perf_counter()
        encoder.encode_queries([text])
        out.append((time.perf_counter() - began) * 1000)
    return out


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[18]


def load(claims: int, tail: int):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from store_scale import queries as query_texts

    from htp_embed import HTPEncoder

    texts = query_texts(max(claims, 809))
    words = " ".join(texts).split()
    tail_texts = [" ".join(words[n * 7 : n * 7 + n]) for n in range(3, 3 + tail)]
    encoder = HTPEncoder(show_progress=False)
    encoder.encode_queries(["a first query loads what every query needs"])
    return encoder, texts[:claims], tail_texts


def child(setting: str, claims: int, tail: int) -> dict:
    """In a fresh process: claims one at a time, then the tail, under ``setting``."""
    encoder, texts, tail_texts = load(claims, tail)
    from machine import resident_mib

    from htp_embed import query_widths

    query_widths.ENABLED = setting != "exact"
    start = resident_mib()  # the warm-up's own kernels count
    warm_seconds = 0.0
    if setting == "padded, warmed":
        began = time.perf_counter()
        encoder.warm_query_widths()
        warm_seconds = time.perf_counter() - began
    first = timed(encoder, texts)
    after_claims = resident_mib()
    longer = timed(encoder, tail_texts)
    end = resident_mib()
    return {
        "warm_up_s": warm_seconds,
        "claims_p50_ms": statistics.median(first), "claims_p95_ms": p95(first),
        "claims_rss_growth_mib": after_claims - start,
        "tail_p50_ms": statistics.median(longer), "tail_rss_growth_mib": end - after_claims,
        "total_rss_growth_mib": end - start,
    }


def steady(claims: int) -> dict:
    """Every claim at both settings once, then timed at both, alternating which runs first."""
    import numpy as np

    encoder, texts, _ = load(claims, 0)
    from htp_embed import query_widths

    for enabled in (False, True):
        query_widths.ENABLED = enabled
        timed(encoder, texts)
    times: dict[bool, list[float]] = {False: [], True: []}
    vectors: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for i, text in enumerate(texts):
        for enabled in ((False, True) if i % 2 else (True, False)):
            query_widths.ENABLED = enabled
            began = time.perf_counter()
            vectors[enabled].append(encoder.encode_queries([text])[0])
            times[enabled].append((time.perf_counter() - began) * 1000)
    cosines = np.sum(np.array(vectors[False]) * np.array(vectors[True]), axis=1)
    return {
        "exact_p50_ms": statistics.median(times[False]), "padded_p50_ms": statistics.median(times[True]),
        "ratio_median": statistics.median(p / e for p, e in zip(times[True], times[False], strict=True)),
        "cosine_min": float(cosines.min()),
    }


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=300, help="SciFact claims embedded one at a time")
    parser.add_argument("--tail", type=int, default=300, help="texts of 3, 4, ... words (one length each)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the settings' order reversed each round")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for query_widths.{json,md}")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode = args.child[0]
        result = steady(args.claims) if mode == "steady" else child(mode, args.claims, args.tail)
        print(json.dumps(result))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_model

    sizes = ("--claims", str(args.claims), "--tail", str(args.tail))
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    steadies: list[dict] = []
    for round_ in range(args.rounds):
        for setting in SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]:
            result = run_child(setting, *sizes)
            runs[setting].append(result)
            print(f"round {round_ + 1} {setting:>15}: claims p50 {result['claims_p50_ms']:.1f} "
                  f"p95 {result['claims_p95_ms']:.1f} ms (+{result['claims_rss_growth_mib']:.0f} MiB); "
                  f"tail p50 {result['tail_p50_ms']:.1f} ms (+{result['tail_rss_growth_mib']:.0f} MiB); "
                  f"warm-up {result['warm_up_s']:.2f} s", flush=True)
        steadies.append(run_child("steady", *sizes))
        print(f"round {round_ + 1} steady: {steadies[-1]}", flush=True)
    summary = {s: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for s, rs in runs.items()}
    steady_summary = {key: statistics.median(r[key] for r in steadies) for key in steadies[0]}
    steady_summary["cosine_min"] = min(r["cosine_min"] for r in steadies)
    record = {"cpu": cpu_model(), "cores": os.cpu_count(), "claims": args.claims, "tail": args.tail,
              "rounds": args.rounds, "summary": summary, "steady": steady_summary, "runs": runs,
              "steady_runs": steadies}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "query_widths.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Query widths: exact vs padded ({record['cpu']}, {record['cores']} cores)", "",
             f"One query at a time, default encoder; each setting in its own fresh process, medians of "
             f"{args.rounds} round(s), settings alternating. Claims: the first {args.claims} SciFact claims; "
             f"tail: {args.tail} texts of 3 to {args.tail + 2} words, one length each, after the claims.", "",
             "| setting | warm-up s | claims p50 / p95 ms | RSS growth, claims | tail p50 ms | RSS growth, tail | "
             "RSS growth, total |",
             "|---|---|---|---|---|---|---|"]
    for setting, s in summary.items():
        lines.append(f"| {setting} | {s['warm_up_s']:.2f} | {s['claims_p50_ms']:.1f} / {s['claims_p95_ms']:.1f} | "
                     f"{s['claims_rss_growth_mib']:.0f} MiB | {s['tail_p50_ms']:.1f} | "
                     f"{s['tail_rss_growth_mib']:.0f} MiB | {s['total_rss_growth_mib']:.0f} MiB |")
    lines += ["", f"Steady state (every claim seen at both widths first, then alternating in one process): "
              f"exact p50 {steady_summary['exact_p50_ms']:.2f} ms, padded {steady_summary['padded_p50_ms']:.2f} ms, "
              f"median per-claim ratio padded/exact {steady_summary['ratio_median']:.3f}; least cosine between "
              f"the two vectors {steady_summary['cosine_min']:.6f}."]
    from results_file import write_markdown

    write_markdown(args.out / "query_widths.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
