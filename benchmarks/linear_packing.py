"""Packed vs plain Linear weights on the CPU, side by side in one process.

    python benchmarks/linear_packing.py [--rounds 4] [--queries 40] [--docs 16] [--dtype float32] [--gelu]

The default encoder (dtype auto) is loaded once; its decoder layers' Linear weights are packed
(``htp_embed.packed_linear``) and unpacked between rounds, the order alternating round by round,
so that noise on the machine falls on both alike:

* one query at a time (SciFact claims, as the service embeds them): p50 / p95 ms;
* SciFact abstracts as documents, in the encoder's own batches: text tokens/s;
* the cosine between the two paths' vectors (queries and documents), and the resident memory
  the packed copies add (RSS after packing minus before, glibc told to return freed memory);
* with --quality, dense NDCG@10 of both paths on the SciFact train subsample (150 queries,
  100 documents plus their relevant ones, seed 0), each path with its own embedding cache.

With --gelu, both paths are packed and differ in the feed-forward alone: its tanh-GELU and
product fused into the packed gate-and-up projection as oneDNN post-ops (what the encoder runs)
against the same activation as separate steps (what it ran before).

Also reports what the encoder decided on its own at load (measured once per CPU and cached).
Writes benchmarks/results/linear_packing.{json,md} (``linear_packing_<dtype>`` with --dtype;
``gelu_fusion`` in place of ``linear_packing`` with --gelu).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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


def rss_mib() -> float:
    """Resident memory now, after asking glibc to hand freed memory back."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, RESULTS, "path")
    parser.add_argument("--quality", action="store_true",
                        help="also NDCG@10 of both paths on the SciFact train subsample `htp-index eval` uses")
    parser.add_argument("--gelu", action="store_true",
                        help="compare the feed-forward's GELU fused into its packed projection against it apart")
    args = parser.parse_args()

    import torch

    from htp_embed import HTPEncoder
    from htp_embed.models import decoder_layers
    from htp_embed.packed_linear import (
        PackedGeluGateLinear,
        PackedLinear,
        pack_linear_layers,
        unpack_linear_layers,
    )

    encoder = HTPEncoder(show_progress=False, dtype=args.dtype)
    layers = decoder_layers(encoder.model)
    decided = encoder.packing.summary() if encoder.packing else None
    texts = queries(args.queries)
    docs, docs_label = load_texts(args.docs)
    doc_tokens = sum(encoder.count_tokens(text) for text in docs)

    unpack_linear_layers(layers)
    plain_rss = rss_mib()
    packed_count = pack_linear_layers(layers)
    packed_rss = rss_mib()
    if not packed_count:
        raise SystemExit("this PyTorch cannot pack Linear weights here (see the log)")

    baseline, contender = ("GELU apart", "GELU fused") if args.gelu else ("plain", "packed")
    fused = {mlp: mlp.gate_up_proj for mlp in layers.modules()
             if isinstance(getattr(mlp, "gate_up_proj", None), PackedGeluGateLinear)}
    if args.gelu and not fused:
        raise SystemExit("no feed-forward here has its GELU fused (see the log)")
    apart = {mlp: PackedLinear(projection.plain()) for mlp, projection in fused.items()}

    def use(path: str):
        if args.gelu:
            for mlp in fused:
                mlp.gate_up_proj = (fused if path == contender else apart)[mlp]
        else:
            (pack_linear_layers if path == contender else unpack_linear_layers)(layers)
        return encoder

    measured = alternate({path: (lambda path=path: use(path)) for path in (baseline, contender)},
                         texts, docs, args.rounds)

    quality = {}
    if args.quality:
        import tempfile

        from encoder_speed import SCIFACT

        from pipelines.evaluation import evaluate

        for path in (baseline, contender):
            use(path)
            with tempfile.TemporaryDirectory() as cache:
                scored = evaluate(SCIFACT.parent, "train", encoder, max_queries=150, max_docs=100, seed=0,
                                  cache_dir=cache)
            quality[path] = {"ndcg@10": scored["ndcg@10"], "queries": scored["queries"], "docs": scored["docs"]}
            print(f"quality {path}: ndcg@10 {scored['ndcg@10']:.4f}", flush=True)

    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "dtype": str(encoder.dtype),
        "encoder": encoder.describe(), "decided_at_load": decided, "packed_layers": packed_count,
        "rounds": args.rounds, "queries": len(texts), "docs": len(docs), "docs_label": docs_label,
        "doc_tokens": doc_tokens, **measured.compared(baseline, contender, doc_tokens),
        "extra_rss_mib": packed_rss - plain_rss, "quality": quality,
    }
    if args.gelu:
        result["fused_feed_forwards"] = len(fused)
    rows = result["paths"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gelu_fusion" if args.gelu else "linear_packing"
    stem = stem if args.dtype == "auto" else f"{stem}_{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = ("The feed-forward's GELU fused into its packed projection vs apart" if args.gelu
             else "Packed vs plain Linear weights")
    lines = [
        f"# {title} ({result['cpu']}, {result['cores']} cores, torch {result['torch']})", "",
        f"Encoder {result['encoder']} in {result['dtype'].removeprefix('torch.')}; {packed_count} Linear layers"
        f"{f' packed, {len(fused)} feed-forwards fused' if args.gelu else ''}; "
        f"{args.rounds} rounds per path, order alternating; {len(texts)} single SciFact queries and "
        f"{len(docs)} {docs_label} ({doc_tokens} tokens) per round.", "",
        "| path | query p50 / p95 | documents |", "|---|---|---|",
    ]
    for path, row in rows.items():
        lines.append(f"| {path} | {row['query_p50_ms']:.1f} / {row['query_p95_ms']:.1f} ms "
                     f"| {row['doc_tokens_per_s']:.0f} tokens/s |")
    extra = "" if args.gelu else f"; packed copies +{result['extra_rss_mib']:.0f} MiB RSS"
    lines += [
        "", f"{contender} / {baseline}: queries {result['query_speedup']:.2f}x faster (p50), documents "
        f"{result['doc_speedup']:.2f}x; minimum cosine between the paths' vectors {result['min_cosine_queries']:.6f} "
        f"(queries), {result['min_cosine_docs']:.6f} (documents){extra}.",
        "", f"Decided at load on this machine: {json.dumps(decided)}",
    ]
    if quality:
        lines += ["", "Dense NDCG@10 on the SciFact train subsample ("
                  f"{quality[baseline]['queries']} queries, {quality[baseline]['docs']} documents): {baseline} "
                  f"{100 * quality[baseline]['ndcg@10']:.2f}, {contender} {100 * quality[contender]['ndcg@10']:.2f}."]
    from results_file import write_markdown

    write_markdown(args.out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
