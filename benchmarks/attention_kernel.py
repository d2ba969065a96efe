"""The fused attention kernel vs two matrix products, in float32 and bfloat16, side by side in one process.

    python benchmarks/attention_kernel.py [--rounds 3] [--queries 40] [--docs 32]

Two default encoders are loaded (float32 and bfloat16, packaged model, own forward pass); each
runs with ``attention_kernel`` "fused" and "matmul" (``htp_embed.attention``), four paths in all,
alternating round by round so that noise on the machine falls on all of them alike:

* one query at a time (SciFact claims, as the service embeds them): p50 / p95 ms (queries keep
  the fused kernel in both settings: their passes are below ``MIN_SCORES``, so this column
  shows the noise floor);
* SciFact abstracts as documents, in the encoder's own batches: text tokens per second of wall
  time and of the process's CPU time (the ratios use CPU time: on a shared host the cores come
  and go, which wall time shows and CPU time mostly does not);
* the least cosine between each dtype's two kernels' vectors.

Reports the kernel's gain per dtype and bfloat16 over float32 with each dtype's faster kernel
(what ``dtype="auto"`` and ``attention_kernel="auto"`` give where they choose those), and what
the encoders decided on their own at load (measured once per CPU and cached).
Writes benchmarks/results/attention_kernel.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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

DTYPES = ("float32", "bfloat16")
KERNELS = ("fused", "matmul")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RESULTS, "path")
    parser.set_defaults(rounds=3, docs=32)
    args = parser.parse_args()

    import torch

    from htp_embed import HTPEncoder

    # "auto" for the kernel: each encoder records what this CPU decided for it
    encoders = {dtype: HTPEncoder(show_progress=False, dtype=dtype) for dtype in DTYPES}
    if not all(encoder.native for encoder in encoders.values()):
        raise SystemExit("the attention kernel is a setting of htp-index's own forward pass, which is not running here")
    decided = {dtype: encoder.attention.summary() if encoder.attention else None for dtype, encoder in encoders.items()}
    texts = queries(args.queries)
    docs, docs_label = load_texts(args.docs)
    doc_tokens = sum(encoders["float32"].count_tokens(text) for text in docs)

    def path(dtype: str, kernel: str):
        def use() -> HTPEncoder:
            encoders[dtype].model.attention_kernel = kernel
            return encoders[dtype]
        return use

    measured = alternate({f"{dtype} {kernel}": path(dtype, kernel) for dtype in DTYPES for kernel in KERNELS},
                         texts, docs, args.rounds)
    rows = measured.rows(doc_tokens)
    # Compared by CPU time (the cores a busy host lends come and go; wall time is in the table too).
    speed = "doc_tokens_per_cpu_s"
    gains = {dtype: rows[f"{dtype} matmul"][speed] / rows[f"{dtype} fused"][speed] for dtype in DTYPES}
    best = {dtype: max(KERNELS, key=lambda kernel, d=dtype: rows[f"{d} {kernel}"][speed]) for dtype in DTYPES}
    bf16_over_fp32 = {
        "fused kernel both": rows["bfloat16 fused"][speed] / rows["float32 fused"][speed],
        "each dtype's faster kernel": rows[f"bfloat16 {best['bfloat16']}"][speed] / rows[f"float32 {best['float32']}"][speed],
    }
    cosines = {dtype: measured.min_cosine(f"{dtype} fused", f"{dtype} matmul", 1) for dtype in DTYPES}
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "encoder": encoders["bfloat16"].describe(), "decided_at_load": decided, "rounds": args.rounds,
        "queries": len(texts), "docs": len(docs), "docs_label": docs_label, "doc_tokens": doc_tokens,
        "paths": rows, "matmul_doc_speedup": gains, "faster_kernel": best, "bf16_over_fp32_docs": bf16_over_fp32,
        "min_cosine_docs_between_kernels": cosines,
    }
    both_fused, each_faster = bf16_over_fp32.values()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Attention kernel: fused vs matrix products ({result['cpu']}, {result['cores']} cores, torch {result['torch']})",
        "", f"Encoder {result['encoder']}; {args.rounds} rounds, the four paths' order alternating; {len(texts)} single "
        f"SciFact queries and {len(docs)} {docs_label} ({doc_tokens} tokens) per round.", "",
        "| dtype | kernel | query p50 / p95 | documents (wall) | documents (CPU time) |", "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        dtype, kernel = name.split()
        lines.append(f"| {dtype} | {kernel} | {row['query_p50_ms']:.1f} / {row['query_p95_ms']:.1f} ms "
                     f"| {row['doc_tokens_per_s']:.0f} tokens/s | {row[speed]:.0f} tokens/CPU-s |")
    lines += [
        "", "Ratios of documents per CPU second (the process's user + system time: a neighbour's load on "
        "the host shows in wall time, not in it; each path's median round).",
        "Matrix products / fused kernel on documents: "
        + ", ".join(f"{dtype} {gain:.2f}x (least cosine {cosines[dtype]:.6f})" for dtype, gain in gains.items()) + ".",
        f"bfloat16 / float32 on documents: {both_fused:.2f}x with the fused kernel in both, "
        f"{each_faster:.2f}x with each dtype's faster kernel "
        f"(float32 {best['float32']}, bfloat16 {best['bfloat16']}).",
        "", "Decided at load on this machine: "
        + "; ".join(f"{dtype}: {d['kernel']} ({d['reason']})" if d else f"{dtype}: none" for dtype, d in decided.items()),
    ]
    from results_file import write_markdown

    write_markdown(args.out / "attention_kernel.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
