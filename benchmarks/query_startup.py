"""Cold `htp-index query`: wall and CPU time from process start to answer, and what it imports.

Each run is a fresh interpreter on a warm model cache (the realistic second use of the tool).
With ``--compare DIR`` the same runs alternate with another checkout of the project (e.g. the
commit before a change, exported with `git archive`), so both see the same machine load:
compare the ratio, not the seconds, when the cores are shared. ``-X importtime`` of one more
run of each gives the biggest imports. Writes benchmarks/results/query_startup.{json,md}.

    python benchmarks/query_startup.py --index DIR [--runs 3] [--compare OLD_CHECKOUT] [--mode sparse]

``--mode`` times that query mode (default: the settings' default, hybrid) and writes
query_startup_<mode>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import checkouts, cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUERY = "How do summary tokens let early words see later sentences?"
# The packages a query must not need (issue 21), and the heavy ones it does.
# llama_index is a namespace package: its cost is in llama_index.core
WATCHED = ("torch", "transformers", "spacy", "llama_index.core", "faiss", "prefect", "dask", "fastapi")



def cold_query(tree: Path, index: Path, importtime: bool = False, mode: str | None = None) -> dict:
    """One `python -m htp_cli query` in a fresh process run from ``tree`` (in ``mode``, if given)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    flags = ["-X", "importtime"] if importtime else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, *flags, "-m", "htp_cli", "query", QUERY, "--index", str(index),
                           "-k", "3", "--json", *(["--mode", mode] if mode else [])], capture_output=True, text=True, env=env, cwd=tree)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"query from {tree} failed: {done.stderr[-2000:]}")
    run = {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    if importtime:
        run["imports"] = biggest_imports(done.stderr)
    return run


def biggest_imports(stderr: str) -> dict:
    """Cumulative import seconds of each watched package, wherever it was first imported
    (absent: not imported at all)."""
    found: dict[str, float] = {}
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| *(\S+)", line)
        if match and match.group(2) in WATCHED:
            found[match.group(2)] = max(found.get(match.group(2), 0.0), int(match.group(1)) / 1e6)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="a small index (htp-index demo makes one)")
    parser.add_argument("--runs", type=int, default=3, help="cold starts per checkout")
    parser.add_argument("--compare", type=Path, help="another checkout to alternate with (the 'before')")
    parser.add_argument("--mode", choices=("dense", "sparse", "hybrid"), help="query mode (default: the settings')")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()
    trees = checkouts(ROOT, args.compare)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            runs[name].append(cold_query(tree, args.index.resolve(), mode=args.mode))
            print(f"{name}: {runs[name][-1]}", flush=True)
    imports = {name: cold_query(tree, args.index.resolve(), importtime=True, mode=args.mode)["imports"]
               for name, tree in trees.items()}
    summary = {
        name: {"median_wall_s": statistics.median(r["wall_s"] for r in rs),
               "median_cpu_s": statistics.median(r["cpu_s"] for r in rs), "runs": rs,
               "imports_s": imports[name]}
        for name, rs in runs.items()
    }
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "index": str(args.index), "query": QUERY, "mode": args.mode or "default (settings)", "trees": {k: str(v) for k, v in trees.items()},
              "results": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"query_startup_{args.mode}" if args.mode else "query_startup"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    from results_file import write_markdown

    write_markdown(args.out / f"{stem}.md", markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    rows = "\n".join(
        f"| {name} | {s['median_wall_s']:.2f} | {s['median_cpu_s']:.2f} | "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["imports_s"].items(), key=lambda kv: -kv[1]))
        + " |"
        for name, s in result["results"].items()
    )
    return (
        f"# Cold `htp-index query` ({result['cpu']}, {result['cores']} cores, Python {result['python']})\n\n"
        f"Query {result['query']!r} (mode: {result.get('mode', 'default (settings)')}) on {result['index']}, warm model cache, a fresh process per run, the "
        f"checkouts alternating run by run; load average {result['load_average_before'][0]:.1f} before, "
        f"{result['load_average_after'][0]:.1f} after (the cores are shared: compare within a row set).\n\n"
        "| checkout | median wall s | median CPU s (user+sys) | cumulative import s (-X importtime, one run) |\n"
        "|---|---|---|---|\n"
        f"{rows}\n\nTarget (issue 21): <= 4 s wall on a small index.\n"
    )


if __name__ == "__main__":
    main()
