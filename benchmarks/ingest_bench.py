"""Ingest benchmark: first ingest vs re-ingest of the same corpus, and end-to-end ingest
throughput vs the bare encoder doing the very same encoder work (pipeline overhead).

The first ingest of a new index embeds the node texts *and* fits the vector correction, which
embeds pseudo-queries sampled from those texts; the bare-encoder baseline does both, and the
table shows the correction's share on its own.

Both comparisons run side by side in one process, alternating, so machine noise hits both.
Writes benchmarks/results/ingest_bench.{json,md}.

    python benchmarks/ingest_bench.py [--docs 120] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def make_corpus(folder: Path, n_docs: int) -> str:
    """A BEIR JSONL file of the first n SciFact abstracts, else the bundled sample corpus."""
    if SCIFACT.exists():
        target = folder / "corpus.jsonl"
        with SCIFACT.open() as src, target.open("w") as dst:
            for i, line in enumerate(src):
                if i == n_docs:
                    break
                dst.write(line)
        return f"SciFact abstracts (first {n_docs}, JSONL)"
    from pipelines.sample_corpus import sample_dir

    shutil.copytree(sample_dir(), folder / "docs")
    return "bundled sample corpus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=120, help="SciFact abstracts ingested (the sample corpus without SciFact)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()

    from machine import cpu_model

    from htp_embed.llama_index import HTPEmbedding
    from indexes import FaissVectorStore
    from pipelines.chunking import embed_text
    from pipelines.correction import pseudo_queries
    from pipelines.ingest import ingest
    from pipelines.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="htp-ingest-bench-"))
    try:
        label = make_corpus(work, args.docs)
        source = work / ("corpus.jsonl" if (work / "corpus.jsonl").exists() else "docs")
        embedding = HTPEmbedding(show_progress=False)
        settings = Settings(encoder=embedding.encoder.config)
        embedding.get_text_embedding_batch(["warm-up text."])
        rows = []
        for repeat in range(args.repeats):
            index = work / f"index-{repeat}"
            first = ingest(source, index, settings, embedding=embedding)
            second = ingest(source, index, settings, embedding=embedding)
            store = FaissVectorStore.open(index)
            texts = [embed_text(node) for node in store.all_nodes()]
            fitted = store.correction is not None
            began = time.perf_counter()
            embedding.encoder.encode_documents(texts)
            bare_documents = time.perf_counter() - began
            if fitted:
                embedding.encoder.encode_queries(pseudo_queries(texts))
            bare = time.perf_counter() - began
            rows.append({
                "first_ingest_s": first.seconds, "re_ingest_s": second.seconds, "bare_encoder_s": bare,
                "bare_documents_s": bare_documents, "bare_pseudo_queries_s": bare - bare_documents,
                "pseudo_queries": store.correction.pseudo_queries if fitted else 0,
                "nodes": first.nodes_embedded, "tokens": first.tokens, "re_ingest_nodes_embedded": second.nodes_embedded,
            })
            print(json.dumps(rows[-1]), flush=True)
        best = {key: min(r[key] for r in rows)
                for key in ("first_ingest_s", "re_ingest_s", "bare_encoder_s", "bare_documents_s", "bare_pseudo_queries_s")}
        result = {
            "corpus": label, "documents": args.docs if "SciFact" in label else None,
            "model": embedding.model_name, "device": str(embedding.encoder.device),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores", "repeats": rows, "best": best,
            "first_vs_reingest_ratio": best["first_ingest_s"] / best["re_ingest_s"],
            "ingest_overhead_vs_bare_encoder": best["first_ingest_s"] / best["bare_encoder_s"] - 1,
            "ingest_tokens_per_s": rows[0]["tokens"] / best["first_ingest_s"],
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ingest_bench.json").write_text(json.dumps(result, indent=2) + "\n")
        table = (
            f"# Ingest benchmark ({result['machine']}, {result['device']})\n\n"
            f"{label}; {rows[0]['nodes']} nodes, {rows[0]['tokens']} text tokens; {embedding.model_name}; "
            f"best of {args.repeats} alternating repeats.\n\n"
            "| measure | value | target |\n|---|---|---|\n"
            f"| first ingest | {best['first_ingest_s']:.1f} s | |\n"
            f"| re-ingest (unchanged) | {best['re_ingest_s']:.2f} s, {rows[0]['re_ingest_nodes_embedded']} nodes embedded | |\n"
            f"| first / re-ingest | {result['first_vs_reingest_ratio']:.0f}x | >= 100x |\n"
            f"| bare encoder, same work | {best['bare_encoder_s']:.1f} s | |\n"
            f"| of which node texts | {best['bare_documents_s']:.1f} s | |\n"
            f"| of which {rows[0]['pseudo_queries']} pseudo-queries (correction fit) | {best['bare_pseudo_queries_s']:.1f} s | |\n"
            f"| ingest overhead vs bare encoder | {100 * result['ingest_overhead_vs_bare_encoder']:+.1f}% | <= 5% |\n"
            f"| ingest throughput | {result['ingest_tokens_per_s']:.0f} text tokens/s | |\n"
        )
        from results_file import write_markdown

        write_markdown(args.out / "ingest_bench.md", table)
        print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
