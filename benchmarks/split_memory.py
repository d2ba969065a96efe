"""Splitting one large document into nodes: peak memory and time, by document size.

Each size runs in a fresh process (peak RSS is per process), which loads the model's tokenizer,
makes a document of that many megabytes (prose of made-up words, a sentence every ~15 words, one
paragraph), records its peak RSS so far, then splits the document with the ingest splitter
(`pipelines.chunking`) and records the peak again: the difference is what splitting costs above
the loaded model and the text. With ``--compare DIR`` each size also runs from another checkout
(e.g. the commit before a change, exported with `git archive`), one after the other, so both see
the same machine. Writes benchmarks/results/split_memory.{json,md}.

    python benchmarks/split_memory.py [--sizes 1 2 8] [--model smollm2-135m] [--compare OLD_CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from machine import checkouts, cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Runs in the child: prints one JSON line.
CHILD = """
import json, random, resource, sys, time
from htp_embed import EncoderConfig, HTPEncoder
from pipelines.chunking import default_chunk_size, make_splitter, split_documents
from pipelines.sources import SourceDocument

megabytes, model = float(sys.argv[1]), sys.argv[2]
encoder = HTPEncoder(EncoderConfig(model=model))
rng = random.Random(0)
words = (f"w{rng.randrange(100000)}" + ("." if i % 15 == 14 else "") for i in range(int(megabytes * 1e6 / 6)))
text = " ".join(words)[: int(megabytes * 1e6)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
began = time.perf_counter()
try:
    nodes = len(split_documents([SourceDocument(doc_id="big", text=text)],
                                make_splitter(encoder.tokenize, default_chunk_size(encoder), 32)))
    error = None
except Exception as exc:
    nodes, error = None, f"{type(exc).__name__}: {str(exc)[:160]}"
seconds = time.perf_counter() - began
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"megabytes": megabytes, "nodes": nodes, "error": error, "split_s": round(seconds, 2),
                  "peak_before_mib": round(before / 1024), "peak_after_mib": round(after / 1024),
                  "split_peak_mib": round((after - before) / 1024)}))
"""



def split_once(tree: Path, megabytes: float, model: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(megabytes), model], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"split in {tree} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.0, 8.0], help="document sizes in MB")
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts tokens")
    parser.add_argument("--compare", type=Path, help="another checkout to run beside this one (the 'before')")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()
    trees = checkouts(ROOT, args.compare)
    load_before = os.getloadavg()
    rows = []
    for megabytes in args.sizes:
        for name, tree in trees.items():
            rows.append({"checkout": name, **split_once(tree, megabytes, args.model)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "model": args.model,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    from results_file import write_markdown

    write_markdown(args.out / "split_memory.md", markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"# Splitting one large document ({result['cpu']}, {result['cores']} cores, Python {result['python']})\n",
        f"Tokenizer of {result['model']}; prose of made-up words, one paragraph; a fresh process per row; load "
        f"average {result['load_average_before'][0]:.1f} before, {result['load_average_after'][0]:.1f} after.\n",
        "| MB | checkout | nodes | split s | peak RSS above model and text, MiB | error |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['megabytes']:g} | {row['checkout']} | {row['nodes'] if row['nodes'] is not None else '-'} | "
                     f"{row['split_s']:.1f} | {row['split_peak_mib']} | {_one_line(row['error'] or '')} |")
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 90) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    main()
