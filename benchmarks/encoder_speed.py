"""Encoder speed on one machine, every comparison side by side in one run.

1. Precision: the default path (dtype='auto') against the float32 reference on the same texts,
   chunks interleaved; text tokens/s and the cosine between their vectors. Optionally the same
   in a child process with oneDNN capped below AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16), which
   shows what a CPU with AVX512-BF16 but no AMX would get, and int8 dynamic quantisation.
2. Achieved FLOP/s of the default path as a fraction of the cores' peak (counted FLOPs of the
   real positions, peak = cores x clock x FLOP/cycle of the instruction set in use).
3. Methods on the default path: vanilla vs htp vs echo, interleaved chunk by chunk.
4. Peak memory per method in a fresh child process: RSS above the RSS before encoding, sampled
   every 2 ms, with glibc's mmap threshold fixed at 64 KiB so freed tensors go back to the OS
   (RSS then follows live memory instead of allocator slack), plus tracemalloc's peak of Python
   allocations (segmentation, tokenizer output, layouts). On CUDA: peak allocated bytes.
5. Optionally (--quality) NDCG@10 of float32 vs the default path on the SciFact train
   subsample that `htp-index eval` uses (150 queries, 100 docs + their relevant ones, seed 0).
6. Optionally (--startup) `htp-index demo` into a fresh folder and `htp-index query` on its
   index, wall time from process start, warm model cache.
7. Short texts (8-30 tokens: SciFact claims, embedded as queries, what queries and
   pseudo-queries are): float32 vs the default path and htp vs vanilla on the default path,
   interleaved chunk by chunk, plus the latency of one query at a time.

Throughput is reported as text tokens per second: the tokens of the user's text, not the
placeholders or template, so extra work shows up as a lower figure. Writes
benchmarks/results/encoder_speed.{json,md}.

    python benchmarks/encoder_speed.py [--n 256] [--chunk 32] [--device auto] [--no-amx] \
        [--int8] [--quality] [--startup] [--short-n 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from htp_embed.threads import default_openmp_waiting  # noqa: E402

default_openmp_waiting()  # htp_embed's default, set before torch or faiss loads OpenMP
ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact" / "corpus.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("vanilla", "htp", "echo")


def load_texts(n: int) -> tuple[list[str], str]:
    """The first n SciFact abstracts when the shared data is there, else the bundled corpus."""
    if SCIFACT.exists():
        texts = []
        with SCIFACT.open() as handle:
            for line in handle:
                record = json.loads(line)
                texts.append(f"{record['title']}. {record['text']}".strip())
                if len(texts) == n:
                    break
        return texts, f"SciFact abstracts (first {len(texts)})"
    from pipelines.sample_corpus import sample_texts

    texts = sample_texts()
    return (texts * (n // len(texts) + 1))[:n], "bundled sample corpus (repeated)"


SHORT_TOKENS = (8, 30)


def load_short_texts(n: int, count_tokens) -> tuple[list[str], str]:
    """Up to n texts of 8-30 tokens: SciFact claims (real queries) when the shared data is
    there, else sentences of the bundled corpus."""
    queries = SCIFACT.with_name("queries.jsonl")
    if queries.exists():
        with queries.open() as handle:
            candidates = [json.loads(line)["text"] for line in handle]
        source = "SciFact claims"
    else:
        import re

        from pipelines.sample_corpus import sample_texts

        candidates = [s for t in sample_texts() for s in re.split(r"(?<=[.!?])\s+", t)]
        source = "bundled corpus sentences"
    low, high = SHORT_TOKENS
    texts = [t for t in candidates if low <= count_tokens(t) <= high][:n]
    return texts, f"{source} of {low}-{high} tokens ({len(texts)})"


def interleaved_queries(encoders: dict, texts: list[str], chunk: int) -> tuple[dict, dict]:
    """Texts and seconds per encoder embedding ``texts`` as queries, chunks interleaved with a
    rotating first mover."""
    names = list(encoders)
    for encoder in encoders.values():  # warm-up
        encoder.encode_queries(texts[:chunk])
    seconds = dict.fromkeys(names, 0.0)
    for c, start in enumerate(range(0, len(texts), chunk)):
        part = texts[start : start + chunk]
        for name in names[c % len(names) :] + names[: c % len(names)]:
            began = time.perf_counter()
            encoders[name].encode_queries(part)
            seconds[name] += time.perf_counter() - began
    return dict.fromkeys(names, len(texts)), seconds


def single_query_latency(encoders: dict, texts: list[str], repeats: int = 3) -> dict:
    """Median and p90 milliseconds of one query per call, encoders alternating call by call."""
    import statistics

    times: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(repeats):
        for text in texts:
            for name, encoder in encoders.items():
                began = time.perf_counter()
                encoder.encode_queries([text])
                times[name].append(1000 * (time.perf_counter() - began))
    return {name: {"median_ms": statistics.median(ts), "p90_ms": sorted(ts)[int(0.9 * (len(ts) - 1))]}
            for name, ts in times.items()}


def short_text_run(base, n: int, chunk: int) -> dict:
    """Short texts: float32 vs default (htp), and htp vs vanilla on the default path."""
    from htp_embed import HTPEncoder

    texts, source = load_short_texts(n, base.count_tokens)
    encoders = {
        "float32 htp": HTPEncoder(base.config.model_copy(update={"dtype": "float32"})),
        "default htp": base,
        "default vanilla": base.with_method("vanilla"),
    }
    counts, seconds = interleaved_queries(encoders, texts, chunk)
    texts_per_s = {name: counts[name] / seconds[name] for name in encoders}
    latency = single_query_latency({k: encoders[k] for k in ("float32 htp", "default htp")}, texts[:16])
    tokens = sum(base.count_tokens(t) for t in texts)
    print(f"short texts: {texts_per_s}", flush=True)
    return {
        "source": source, "texts": len(texts), "text_tokens": tokens, "chunk": chunk,
        "texts_per_s": texts_per_s,
        "tokens_per_s": {name: tps * tokens / len(texts) for name, tps in texts_per_s.items()},
        "default/float32": texts_per_s["default htp"] / texts_per_s["float32 htp"],
        "htp/vanilla": texts_per_s["default htp"] / texts_per_s["default vanilla"],
        "single_query_latency": latency,
    }


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(method: str, n: int, device: str, batch_size: int) -> dict:
    """Child-process entry: load, embed, report peak memory above the loaded model."""
    import tracemalloc

    import torch

    from htp_embed import HTPEncoder

    texts, _ = load_texts(n)
    encoder = HTPEncoder(method=method, device=device, batch_size=batch_size, show_progress=False)
    encoder.encode_documents(texts[:batch_size])  # warm-up: first-batch allocations, spaCy loaded
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        encoder.encode_documents(texts)
        peak = torch.cuda.max_memory_allocated() - base
        return {"method": method, "peak_mb": peak / 2**20, "kind": "cuda allocated above model"}
    # ru_maxrss would include the model-loading peak; sample RSS during encoding instead.
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    encoder.encode_documents(texts)
    done.set()
    sampler.join()
    tracemalloc.start()  # a second pass: Python-side allocations only (tensors are not traced)
    encoder.encode_documents(texts)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "method": method, "peak_mb": peak[0] - base, "python_peak_mb": python_peak / 2**20,
        "kind": "peak RSS during encoding above the RSS before it (fresh process per method, "
        "MALLOC_MMAP_THRESHOLD_=65536)",
    }


def interleaved(encoders: dict, texts: list[str], chunk: int, label: str) -> tuple[dict, dict, dict]:
    """Text tokens and seconds per encoder, chunks interleaved with a rotating first mover;
    also each encoder's vectors in text order."""
    import numpy as np
    import torch

    names = list(encoders)
    for encoder in encoders.values():  # warm-up
        encoder.encode_documents(texts[:4])
    tokens = dict.fromkeys(names, 0)
    seconds = dict.fromkeys(names, 0.0)
    vectors: dict[str, list] = {name: [] for name in names}
    for c, start in enumerate(range(0, len(texts), chunk)):
        part = texts[start : start + chunk]
        order = names[c % len(names) :] + names[: c % len(names)]
        for name in order:
            encoder = encoders[name]
            before = encoder.stats.tokens
            cuda = encoder.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            vectors[name].append(encoder.encode_documents(part))
            if cuda:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - began
            tokens[name] += encoder.stats.tokens - before
        print(f"{label} chunk {c + 1}: " + ", ".join(f"{m} {tokens[m] / seconds[m]:.0f} tok/s" for m in names), flush=True)
    return tokens, seconds, {name: np.concatenate(v) for name, v in vectors.items()}


def cosines(vectors: dict, reference: str) -> dict:
    """Min and mean cosine of each encoder's vectors to the reference's (all L2-normalised)."""
    out = {}
    for name, matrix in vectors.items():
        if name != reference:
            cos = (matrix * vectors[reference]).sum(axis=1)
            out[name] = {"min": float(cos.min()), "mean": float(cos.mean())}
    return out


def int8_encoder(settings: dict):
    """float32 weights with int8 dynamic quantisation of every Linear (torch.ao, CPU only)."""
    import warnings

    import torch

    from htp_embed import HTPEncoder
    from htp_embed.models import load_model

    model, tokenizer = load_model(settings.get("model", "gemma3-270m"), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return HTPEncoder(decoder=model, tokenizer=tokenizer, dtype="float32", **settings)


def precision_run(texts: list[str], chunk: int, device: str, batch_size: int, int8: bool) -> dict:
    """float32 vs the default path (and int8 if asked), same texts, one run."""
    from htp_embed import HTPEncoder

    common = {"device": device, "batch_size": batch_size, "show_progress": False}
    encoders = {"float32": HTPEncoder(dtype="float32", **common), "default": HTPEncoder(**common)}
    if int8:
        encoders["int8-dynamic"] = int8_encoder(common)
    tokens, seconds, vectors = interleaved(encoders, texts, chunk, "precision")
    tps = {name: tokens[name] / seconds[name] for name in encoders}
    return {
        "dtypes": {name: str(e.dtype).removeprefix("torch.") + (" + int8 linear" if name == "int8-dynamic" else "")
                   for name, e in encoders.items()},
        "text_tokens": tokens, "seconds": seconds, "tokens_per_s": tps,
        "speedup_vs_float32": {name: tps[name] / tps["float32"] for name in encoders},
        "cosine_to_float32": cosines(vectors, "float32"),
        "texts": len(texts),
    }


def no_amx_child(n: int, chunk: int, batch_size: int) -> dict:
    """float32 vs bfloat16 with oneDNN capped at AVX512-BF16 (no AMX), in a child process."""
    from htp_embed import HTPEncoder

    texts, _ = load_texts(n)
    common = {"device": "cpu", "batch_size": batch_size, "show_progress": False}
    encoders = {"float32": HTPEncoder(dtype="float32", **common), "bfloat16": HTPEncoder(dtype="bfloat16", **common)}
    tokens, seconds, vectors = interleaved(encoders, texts, chunk, "no-amx")
    tps = {name: tokens[name] / seconds[name] for name in encoders}
    return {"ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"), "texts": len(texts),
            "tokens_per_s": tps, "bfloat16/float32": tps["bfloat16"] / tps["float32"],
            "cosine_to_float32": cosines(vectors, "float32")}


def useful_flops(encoder, texts: list[str]) -> float:
    """FLOPs of the layers that run, on real positions only (no padding): 2 per weight of
    every Linear per position, plus causal attention (QK^T and AV: 4 x heads x head_dim x
    context per position, the context capped by a sliding window where a layer has one)."""
    import torch

    from htp_embed.packed_linear import PackedLinear

    config = encoder.model.config
    depth = encoder.exit_depth or config.num_hidden_layers
    layers = encoder._layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or 10**9
    total = 0.0
    lengths = [len(layout) for layout in encoder.layouts(texts)]
    for index in range(depth):
        # Packed projections (htp_embed.packed_linear) are Linears too: missing them had counted
        # attention alone (13 GFLOP/s reported where ~190 ran).
        linear = sum(m.weight.numel() for m in layers[index].modules()
                     if isinstance(m, (torch.nn.Linear, PackedLinear)))
        cap = window if types[index] == "sliding_attention" else 10**9
        for n in lengths:
            context = sum(min(t + 1, cap) for t in range(n))
            total += 2 * linear * n + 4 * heads * head_dim * context
    return total


def peak_flops(dtype: str) -> dict:
    """The cores' peak for the instruction set the dtype runs on, from /proc/cpuinfo's clock."""
    from htp_embed.models import _cpuinfo_flags

    flags = _cpuinfo_flags()
    mhz = None
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    cores = os.cpu_count() or 1
    if dtype == "bfloat16" and "amx_bf16" in flags:
        per_cycle, unit = 2048, "AMX-BF16: 1024 bf16 FMA/cycle/core (Intel's TMUL figure)"
    elif dtype == "bfloat16" and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX512-BF16: 2 FMA ports x 32 bf16 pairs"
    elif "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 FP32: 2 FMA ports x 16 lanes x 2"
    else:
        per_cycle, unit = 32, "AVX2 FP32: 2 FMA ports x 8 lanes x 2"
    ghz = (mhz or 0) / 1000
    return {"cores": cores, "ghz": ghz, "flop_per_cycle_per_core": per_cycle, "basis": unit,
            "peak_flops": cores * ghz * 1e9 * per_cycle}


def quality_run(max_queries: int = 150) -> dict:
    """NDCG@10 of float32 and of the default path, same SciFact train subsample (``max_queries``
    queries, 100 documents plus their relevant ones), fresh cache."""
    import tempfile

    from pipelines.evaluation import evaluate

    out = {}
    cache = tempfile.mkdtemp(prefix="encoder-speed-eval-")
    for name, settings in (("float32", {"dtype": "float32"}), ("default", {})):
        result = evaluate(SCIFACT.parent, "train", {**settings, "batch_size": 8, "show_progress": False},
                          max_queries=max_queries, max_docs=100, seed=0, cache_dir=cache)
        out[name] = {"ndcg@10": result["ndcg@10"], "recall@10": result["recall@10"],
                     "queries": result["queries"], "docs": result["docs"], "seconds": result["seconds"]}
        print(f"quality {name}: ndcg@10 {result['ndcg@10']:.4f}", flush=True)
    out["delta_points"] = 100 * (out["default"]["ndcg@10"] - out["float32"]["ndcg@10"])
    return out


def startup_run(repeats: int) -> dict:
    """`htp-index demo` into a fresh folder, then `htp-index query` on its index (warm cache)."""
    import re
    import statistics
    import tempfile

    cli = str(Path(sys.executable).with_name("htp-index"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    demo, query = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as work:
            began = time.perf_counter()
            done = subprocess.run([cli, "demo", "--workdir", work], capture_output=True, text=True, env=env, check=True)
            wall = time.perf_counter() - began
            printed = re.search(r"demo total wall time: ([\d.]+) s", done.stderr + done.stdout)
            demo.append({"wall_s": wall, "printed_s": float(printed.group(1)) if printed else None})
            began = time.perf_counter()
            subprocess.run([cli, "query", "How do summary tokens work?", "-i", f"{work}/index", "-k", "3"],
                           capture_output=True, text=True, env=env, check=True)
            query.append(time.perf_counter() - began)
        print(f"startup: demo {demo[-1]}, query {query[-1]:.1f} s", flush=True)
    return {"demo": demo, "query_s": query,
            "demo_median_s": statistics.median(d["printed_s"] or d["wall_s"] for d in demo),
            "query_median_s": statistics.median(query)}


def cpu_description() -> dict:
    from htp_embed.models import cpu_bf16_instructions

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "bf16_instructions": list(cpu_bf16_instructions()),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none available in this run",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "(unset)"),
            "load_average": os.getloadavg()}


def child(args: list[str], env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="texts to embed per method")
    parser.add_argument("--precision-n", type=int, default=128, help="texts for float32 vs the default path")
    parser.add_argument("--chunk", type=int, default=32, help="texts per interleaved chunk")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per encoder batch")
    parser.add_argument("--device", default="auto", help="where the encoder runs: auto, cpu, cuda (default: %(default)s)")
    parser.add_argument("--memory-n", type=int, default=64, help="texts per memory measurement")
    parser.add_argument("--no-amx", action="store_true", help="also measure bfloat16 with oneDNN capped below AMX")
    parser.add_argument("--int8", action="store_true", help="also measure int8 dynamic quantisation")
    parser.add_argument("--quality", action="store_true", help="NDCG@10 float32 vs default (minutes)")
    parser.add_argument("--quality-queries", type=int, default=150,
                        help="train queries --quality scores (809: all; documents: 100 plus their relevant ones)")
    parser.add_argument("--startup", type=int, default=0, metavar="REPEATS", help="time demo and query REPEATS times")
    parser.add_argument("--short-n", type=int, default=256, help="short texts (8-30 tokens); 0 skips them")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--no-amx-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args.memory_n, args.device, args.batch_size)))
        return
    if args.no_amx_child:
        print(json.dumps(no_amx_child(args.precision_n, args.chunk, args.batch_size)))
        return

    import torch

    from htp_embed import HTPEncoder

    texts, source = load_texts(max(args.n, args.precision_n))
    result: dict = {"machine": cpu_description()}

    precision = precision_run(texts[: args.precision_n], args.chunk, args.device, args.batch_size, args.int8)
    result["precision"] = precision
    if args.no_amx:
        result["precision"]["no_amx"] = child(
            ["--no-amx-child", "--precision-n", str(min(args.precision_n, 64)), "--chunk", str(args.chunk),
             "--batch-size", str(args.batch_size)], {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})

    base = HTPEncoder(device=args.device, batch_size=args.batch_size, show_progress=False)
    encoders = {m: base if m == "htp" else base.with_method(m) for m in METHODS}
    tokens, seconds, _ = interleaved(encoders, texts[: args.n], args.chunk, "methods")
    throughput = {m: tokens[m] / seconds[m] for m in METHODS}
    result["dtype_decision"] = base.dtype_decision.summary()
    if base.packing is not None:
        result["linear_packing"] = base.packing.summary()
    if args.short_n:
        result["short_texts"] = short_text_run(base, args.short_n, args.chunk)

    dtype = str(base.dtype).removeprefix("torch.")
    flops = useful_flops(base, texts[: args.precision_n])
    peak_default, peak_fp32 = peak_flops(dtype), peak_flops("float32")
    result["flops"] = {
        "useful_flops_per_text_set": flops,
        "default": {"achieved": flops / precision["seconds"]["default"], **peak_default},
        "float32": {"achieved": flops / precision["seconds"]["float32"], **peak_fp32},
    }
    for key in ("default", "float32"):
        entry = result["flops"][key]
        entry["fraction_of_peak"] = entry["achieved"] / entry["peak_flops"] if entry["peak_flops"] else None

    memory = {}
    for method in METHODS:
        memory[method] = child(["--memory-child", method, "--memory-n", str(args.memory_n), "--device", args.device,
                                "--batch-size", str(args.batch_size)], {"MALLOC_MMAP_THRESHOLD_": "65536"})
        print(f"memory {method}: {memory[method]['peak_mb']:.0f} MB", flush=True)

    if args.quality:
        result["quality"] = quality_run(args.quality_queries)
    if args.startup:
        result["startup"] = startup_run(args.startup)

    result.update({
        "model": base.config.model,
        "htp_settings": base.describe(),
        "device": str(base.device),
        "device_name": torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {result['machine']['cpu']})",
        "dtype": dtype,
        "texts": args.n,
        "source": source,
        "batch_size": args.batch_size,
        "max_length": base.config.max_length,
        "text_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": throughput,
        "peak_memory_mb": {m: memory[m]["peak_mb"] for m in METHODS},
        "python_peak_mb": {m: memory[m].get("python_peak_mb") for m in METHODS},
        "memory_kind": memory["htp"]["kind"],
        "ratios": {
            "default/float32 throughput": precision["speedup_vs_float32"]["default"],
            "htp/vanilla throughput": throughput["htp"] / throughput["vanilla"],
            **({"short texts default/float32": result["short_texts"]["default/float32"],
                "short texts htp/vanilla": result["short_texts"]["htp/vanilla"]} if "short_texts" in result else {}),
            "echo/vanilla throughput": throughput["echo"] / throughput["vanilla"],
            "htp/vanilla peak memory": memory["htp"]["peak_mb"] / memory["vanilla"]["peak_mb"],
            "echo/vanilla peak memory": memory["echo"]["peak_mb"] / memory["vanilla"]["peak_mb"],
        },
    })
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if base.device.type == "cpu" else "_gpu"
    (args.out / f"encoder_speed{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    from results_file import write_markdown

    write_markdown(args.out / f"encoder_speed{tag}.md", markdown(result, args))
    print(markdown(result, args))


def markdown(result: dict, args) -> str:
    """The results as the Markdown table committed next to the JSON."""
    p = result["precision"]
    rows_p = "\n".join(
        f"| {name} | {p['dtypes'][name]} | {p['tokens_per_s'][name]:.0f} | {p['speedup_vs_float32'][name]:.2f} | "
        + (f"{p['cosine_to_float32'][name]['min']:.5f} / {p['cosine_to_float32'][name]['mean']:.5f}" if name in p["cosine_to_float32"] else "1 (reference)")
        + " |"
        for name in p["tokens_per_s"]
    )
    tps, mem = result["tokens_per_s"], result["peak_memory_mb"]
    rows_m = "\n".join(
        f"| {m} | {tps[m]:.0f} | {tps[m] / tps['vanilla']:.3f} | {mem[m]:.0f} | {mem[m] / mem['vanilla']:.3f} | "
        f"{result['python_peak_mb'][m]:.1f} |"
        for m in METHODS
    )
    f = result["flops"]
    text = (
        f"# Encoder speed ({result['device_name']})\n\n"
        f"{result['htp_settings']}; {result['source']}; batch {args.batch_size}; max_length {result['max_length']}; "
        f"torch {result['machine']['torch']}, {result['machine']['threads']} threads; bf16 instructions: "
        f"{', '.join(result['machine']['bf16_instructions']) or 'none'}; GPU: {result['machine']['gpu']}.\n"
        "All figures in a table come from one run with the contenders interleaved chunk by chunk; compare "
        "ratios, not absolute tokens/s (the two cores may be shared).\n\n"
        f"## Default CPU path vs float32 ({p['texts']} texts, htp)\n\n"
        "| path | dtype | text tokens/s | vs float32 | cosine to float32 (min / mean) |\n|---|---|---|---|---|\n"
        f"{rows_p}\n\n"
    )
    if "no_amx" in p:
        n = p["no_amx"]
        text += (f"Without AMX (child process, ONEDNN_MAX_CPU_ISA={n['ONEDNN_MAX_CPU_ISA']}, {n['texts']} texts): "
                 f"bfloat16 runs at {n['bfloat16/float32']:.2f}x float32 on this CPU capped so. 'auto' decides "
                 "by its own probe on each CPU, not by these flags: an AMD Zen 4 with AVX512-BF16 alone measured "
                 "bfloat16 1.8x faster (encoder_speed_amd_epyc.md).\n\n")
    if "quality" in result:
        q = result["quality"]
        text += (f"Quality (SciFact train, {q['float32']['queries']} queries, {q['float32']['docs']} docs, seed 0): "
                 f"NDCG@10 float32 {100 * q['float32']['ndcg@10']:.2f}, default {100 * q['default']['ndcg@10']:.2f} "
                 f"({q['delta_points']:+.2f} points; bound: within 0.3).\n\n")
    text += (
        "## Achieved FLOP/s\n\n"
        "Useful FLOPs: real positions only, 2 per Linear weight per position plus causal attention, "
        "layers up to the exit; peak = cores x clock (/proc/cpuinfo) x FLOP/cycle/core.\n\n"
        "| path | achieved GFLOP/s | assumed peak GFLOP/s | fraction | peak basis |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {k} | {f[k]['achieved'] / 1e9:.1f} | {f[k]['peak_flops'] / 1e9:.0f} | {f[k]['fraction_of_peak']:.3f} | "
            f"{f[k]['cores']} x {f[k]['ghz']:.2f} GHz x {f[k]['flop_per_cycle_per_core']} ({f[k]['basis']}) |"
            for k in ("default", "float32")
        )
        + "\n\n"
        f"## Methods on the default path ({result['dtype']}, {result['texts']} texts)\n\n"
        f"Memory = {result['memory_kind']}, {args.memory_n} texts; Python peak = tracemalloc's peak during a "
        "second encoding pass (tensors are not traced).\n\n"
        "| method | text tokens/s | vs vanilla | peak memory MB | vs vanilla | Python peak MB |\n|---|---|---|---|---|---|\n"
        f"{rows_m}\n\nTargets: default >= 2.0x float32 at cosine >= 0.99 and NDCG@10 within 0.3; "
        "htp throughput >= 0.95x vanilla; htp peak memory <= 1.10x vanilla.\n"
    )
    if "short_texts" in result:
        st = result["short_texts"]
        lat = st["single_query_latency"]
        rows = "\n".join(f"| {name} | {st['texts_per_s'][name]:.1f} | {st['tokens_per_s'][name]:.0f} |"
                         for name in st["texts_per_s"])
        text += (
            f"\n## Short texts ({st['source']}, embedded as queries, chunks of {st['chunk']})\n\n"
            "| encoder | texts/s | text tokens/s |\n|---|---|---|\n"
            f"{rows}\n\ndefault/float32 {st['default/float32']:.2f}x; htp/vanilla {st['htp/vanilla']:.3f} "
            "(target >= 0.95). One query per call: "
            + "; ".join(f"{name} median {v['median_ms']:.1f} ms, p90 {v['p90_ms']:.1f} ms" for name, v in lat.items())
            + ".\n"
        )
    if "dtype_decision" in result:
        d = result["dtype_decision"]
        text += f"\ndtype auto on this machine: {d['dtype']} ({d['source']}: {d['reason']}).\n"
    if "linear_packing" in result:
        p = result["linear_packing"]
        text += (f"Linear weights {'packed' if p['pack'] else 'not packed'} on this machine ({p['source']}: "
                 f"{p['reason']}).\n")
    if "startup" in result:
        s = result["startup"]
        text += (f"\n## Start-up (warm model cache)\n\n`htp-index demo` into a fresh folder: median "
                 f"{s['demo_median_s']:.1f} s total wall time as the demo prints it (target < 12 s, issue 21); `htp-index "
                 f"query` on that index, process start to answer: median {s['query_median_s']:.1f} s "
                 f"({len(s['query_s'])} runs each).\n")
    return text


if __name__ == "__main__":
    main()
