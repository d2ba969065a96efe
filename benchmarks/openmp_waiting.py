"""How OpenMP's threads wait, on a quiet machine and beside a busy process.

    python benchmarks/openmp_waiting.py [--rounds 2] [--queries 40] [--docs 16]

Three settings, each in its own process (OpenMP reads its environment once, when torch loads it):

* ``passive``: ``OMP_WAIT_POLICY=PASSIVE``, what htp_embed set before: waiting threads sleep;
* ``default``: nothing set, so htp_embed's default: a bounded spin (``GOMP_SPINCOUNT``,
  ``htp_embed.threads.SPIN_COUNT``) and the encoder's ``ThreadGovernor``, which runs passes on
  one thread while another process holds a core;
* ``spin only``: the same spin with the governor switched off, to show what it guards against.

Each runs twice per round: on the quiet machine, and beside a busy neighbour (a process
looping in pure Python, taking one core). Measured in each: one query at a time through the
default encoder (SciFact claims: p50 / p90 ms) and SciFact abstracts as documents (text
tokens/s), and on the quiet machine the same abstracts in float32 too (bfloat16 / float32 is
issue 21's figure). The settings' order rotates round by round; each figure is the median over
rounds. Writes ``benchmarks/results/openmp_waiting.{json,md}``.
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
SETTINGS = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "default": {},
    "spin only": {"HTP_BENCH_NO_GOVERNOR": "1"},
}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def child(queries: int, docs: int, with_float32: bool) -> dict:
    """In a fresh process: the measurements of one setting."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from encoder_speed import load_texts
    from store_scale import queries as query_texts

    from htp_embed import HTPEncoder

    common = {"batch_size": 8, "show_progress": False}
    encoder = HTPEncoder(**common)
    if os.environ.get("HTP_BENCH_NO_GOVERNOR"):
        encoder.threads.enabled = False
    texts = query_texts(queries)
    for text in texts[:5]:
        encoder.encode_queries([text])
    latencies = []
    for text in texts:
        began = time.perf_counter()
        encoder.encode_queries([text])
        latencies.append((time.perf_counter() - began) * 1000)
    documents, _ = load_texts(docs)
    encoders = {"default": encoder}
    if with_float32:
        encoders["float32"] = HTPEncoder(dtype="float32", **common)
    speeds = {}
    for name, each in encoders.items():
        each.encode_documents(documents[:2])
        before, began = each.stats.tokens, time.perf_counter()
        each.encode_documents(documents)
        speeds[name] = (each.stats.tokens - before) / (time.perf_counter() - began)
    quantiles = statistics.quantiles(latencies, n=10)
    return {"query_p50_ms": statistics.median(latencies), "query_p90_ms": quantiles[8],
            "docs_tokens_per_s": speeds["default"], "float32_tokens_per_s": speeds.get("float32"),
            "dtype": str(encoder.dtype).removeprefix("torch."), "single_thread_passes": encoder.threads.single_thread_passes,
            "spincount": os.environ.get("GOMP_SPINCOUNT"), "wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run_setting(name: str, busy: bool, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    env.update(SETTINGS[name])
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        out = subprocess.run([sys.executable, __file__, "--child", "--queries", str(args.queries), "--docs", str(args.docs),
                              *([] if busy else ["--float32"])], env=env, capture_output=True, text=True, check=True)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    lines = [
        f"# OpenMP waiting: passive, bounded spin with the thread governor, spin alone ({result['cpu']}, "
        f"{result['cores']} cores)", "",
        f"Default encoder ({result['dtype']}); {result['queries']} single queries (SciFact claims) and "
        f"{result['docs']} SciFact abstracts per process; median of {result['rounds']} rounds, settings' order "
        "rotating. Busy: a process looping in pure Python beside the measured one.", "",
        "| setting | machine | query p50 / p90 ms | documents tokens/s | bfloat16 / float32 on documents | passes on 1 thread |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "-"
        lines.append(f"| {row['setting']} | {row['machine']} | {row['query_p50_ms']:.1f} / {row['query_p90_ms']:.1f} | "
                     f"{row['docs_tokens_per_s']:.0f} | {ratio} | {row['single_thread_passes']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every setting and machine state")
    parser.add_argument("--queries", type=int, default=40, help="single queries per process")
    parser.add_argument("--docs", type=int, default=16, help="abstracts embedded as documents per process")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--float32", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.queries, args.docs, args.float32)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import cpu_model

    names = list(SETTINGS)
    runs: dict[tuple[str, bool], list[dict]] = {}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for busy in (False, True):
            for name in order:
                measured = run_setting(name, busy, args)
                runs.setdefault((name, busy), []).append(measured)
                print(f"round {round_ + 1} {name} {'busy' if busy else 'quiet'}: query p50 {measured['query_p50_ms']:.1f} ms, "
                      f"documents {measured['docs_tokens_per_s']:.0f} tok/s"
                      + (f", float32 {measured['float32_tokens_per_s']:.0f} tok/s" if measured["float32_tokens_per_s"] else ""),
                      flush=True)
    rows = []
    for (name, busy), measured in runs.items():
        def median(key: str, measured: list[dict] = measured) -> float:
            return statistics.median(m[key] for m in measured)
        row = {"setting": name, "machine": "busy" if busy else "quiet", "query_p50_ms": median("query_p50_ms"),
               "query_p90_ms": median("query_p90_ms"), "docs_tokens_per_s": median("docs_tokens_per_s"),
               "single_thread_passes": int(median("single_thread_passes")), "runs": measured}
        if not busy:
            row["ratio"] = statistics.median(m["docs_tokens_per_s"] / m["float32_tokens_per_s"] for m in measured)
        rows.append(row)
    rows.sort(key=lambda r: (r["machine"] != "quiet", names.index(r["setting"])))
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "rounds": args.rounds, "queries": args.queries,
              "docs": args.docs, "dtype": rows[0]["runs"][0]["dtype"], "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openmp_waiting.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    from results_file import write_markdown

    write_markdown(args.out / "openmp_waiting.md", text)
    print(text)


if __name__ == "__main__":
    main()
