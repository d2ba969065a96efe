"""htp-index's own Gemma 3 forward pass vs transformers' model class, side by side.

    python benchmarks/native_decoder.py [--rounds 4] [--queries 40] [--docs 16] [--dtype float32]

Two encoders on the same packaged weights, ``implementation="auto"`` (on a CPU:
``htp_embed.gemma3_native``, fused projections, rewiring and exit in its own loop) and
``implementation="transformers"`` (``Gemma3TextModel`` with hooks), both with the Linear
packing this CPU chose, alternating round by round (``side_by_side.alternate``):

* one query at a time (SciFact claims, as the service embeds them): p50 / p95 ms;
* SciFact abstracts as documents, in the encoder's own batches: text tokens/s;
* the least cosine between the two implementations' vectors;
* a cold import of each implementation's modeling code, in a fresh interpreter.

Writes benchmarks/results/native_decoder.{json,md} (``native_decoder_<dtype>`` with --dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from htp_embed.threads import default_openmp_waiting  # noqa: E402

default_openmp_waiting()  # htp_embed's default, set before torch or faiss loads OpenMP
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from encoder_speed import load_texts  # noqa: E402
from machine import cpu_model  # noqa: E402
from side_by_side import add_arguments, alternate  # noqa: E402
from store_scale import queries  # noqa: E402

IMPORTS = {
    "native": "import htp_embed.gemma3_native",
    "transformers": "import torch, transformers.models.gemma3.modeling_gemma3",
}


def import_seconds(statement: str, runs: int = 3) -> float:
    """Median wall seconds of a fresh interpreter running ``statement`` (torch included)."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RESULTS, "implementation")
    args = parser.parse_args()

    import torch

    from htp_embed import HTPEncoder

    native = HTPEncoder(show_progress=False, dtype=args.dtype)
    hooked = HTPEncoder(show_progress=False, dtype=args.dtype, implementation="transformers")
    if not native.native:
        raise SystemExit("the default encoder did not load htp-index's own forward pass here (not a CPU?)")
    texts = queries(args.queries)
    docs, docs_label = load_texts(args.docs)
    doc_tokens = sum(native.count_tokens(text) for text in docs)
    measured = alternate({"transformers": lambda: hooked, "native": lambda: native}, texts, docs, args.rounds)
    imports = {name: import_seconds(statement) for name, statement in IMPORTS.items()}
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "dtype": str(native.dtype),
        "encoder": native.describe(), "packing": native.packing.summary() if native.packing else None,
        "rounds": args.rounds, "queries": len(texts), "docs": len(docs), "docs_label": docs_label,
        "doc_tokens": doc_tokens, **measured.compared("transformers", "native", doc_tokens),
        "import_s": imports,
    }
    rows = result["paths"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "native_decoder" if args.dtype == "auto" else f"native_decoder_{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Own Gemma 3 forward pass vs transformers ({result['cpu']}, {result['cores']} cores, torch {result['torch']})",
        "",
        f"Encoder {result['encoder']} in {result['dtype'].removeprefix('torch.')}, Linear packing "
        f"{'on' if native.packing and native.packing.pack else 'off'} for both; {args.rounds} rounds per "
        f"implementation, order alternating; {len(texts)} single SciFact queries and {len(docs)} {docs_label} "
        f"({doc_tokens} tokens) per round.", "",
        "| implementation | query p50 / p95 | documents | cold import of its modeling code |", "|---|---|---|---|",
    ]
    for path, row in rows.items():
        lines.append(f"| {path} | {row['query_p50_ms']:.1f} / {row['query_p95_ms']:.1f} ms "
                     f"| {row['doc_tokens_per_s']:.0f} tokens/s | {imports[path]:.2f} s |")
    lines += [
        "", f"native / transformers: queries {result['query_speedup']:.2f}x faster (p50), documents "
        f"{result['doc_speedup']:.2f}x; least cosine between their vectors {result['min_cosine_queries']:.6f} "
        f"(queries), {result['min_cosine_docs']:.6f} (documents).",
    ]
    from results_file import write_markdown

    write_markdown(args.out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
