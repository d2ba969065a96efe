"""Encoder throughput and peak memory: vanilla vs htp vs echo on the same texts, one run.

Throughput is measured with the methods interleaved chunk by chunk (so machine noise hits all
of them alike) and reported as text tokens per second — the tokens of the user's text, not the
placeholders or template, so extra work shows up as a lower figure. Peak memory is measured
per method in a fresh child process (peak RSS above the RSS after loading the model on CPU;
peak allocated on CUDA). Writes benchmarks/results/encoder_speed.{json,md}.

    python benchmarks/encoder_speed.py [--n 256] [--chunk 32] [--device auto]
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


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(method: str, n: int, device: str, batch_size: int) -> dict:
    """Child-process entry: load, embed, report peak memory above the loaded model."""
    import torch

    from htp_embed import HTPEncoder

    texts, _ = load_texts(n)
    encoder = HTPEncoder(method=method, device=device, batch_size=batch_size, show_progress=False)
    encoder.encode_documents(texts[:batch_size])  # warm-up allocations of the first batch size
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
    return {"method": method, "peak_mb": peak[0] - base, "kind": "peak RSS during encoding above the RSS before it"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="texts to embed per method")
    parser.add_argument("--chunk", type=int, default=32, help="texts per interleaved chunk")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory-n", type=int, default=64, help="texts per memory measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args.memory_n, args.device, args.batch_size)))
        return

    import torch

    from htp_embed import HTPEncoder

    texts, source = load_texts(args.n)
    base = HTPEncoder(device=args.device, batch_size=args.batch_size, show_progress=False)
    encoders = {m: base if m == "htp" else base.with_method(m) for m in METHODS}
    for encoder in encoders.values():  # warm-up
        encoder.encode_documents(texts[:4])
    tokens = dict.fromkeys(METHODS, 0)
    seconds = dict.fromkeys(METHODS, 0.0)
    for c, start in enumerate(range(0, len(texts), args.chunk)):
        chunk = texts[start : start + args.chunk]
        order = METHODS[c % 3 :] + METHODS[: c % 3]  # rotate who goes first
        for method in order:
            encoder = encoders[method]
            before = encoder.stats.tokens
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            encoder.encode_documents(chunk)
            if encoder.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[method] += time.perf_counter() - began
            tokens[method] += encoder.stats.tokens - before
        print(f"chunk {c + 1}: " + ", ".join(f"{m} {tokens[m] / seconds[m]:.0f} tok/s" for m in METHODS), flush=True)

    memory = {}
    for method in METHODS:
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", method, "--memory-n", str(args.memory_n),
             "--device", args.device, "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )
        memory[method] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"memory {method}: {memory[method]['peak_mb']:.0f} MB", flush=True)

    throughput = {m: tokens[m] / seconds[m] for m in METHODS}
    result = {
        "model": base.config.model,
        "htp_settings": base.describe(),
        "device": str(base.device),
        "device_name": torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "dtype": str(base.dtype).removeprefix("torch."),
        "texts": len(texts),
        "source": source,
        "batch_size": args.batch_size,
        "max_length": base.config.max_length,
        "text_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": throughput,
        "peak_memory_mb": {m: memory[m]["peak_mb"] for m in METHODS},
        "memory_kind": memory["htp"]["kind"],
        "ratios": {
            "htp/vanilla throughput": throughput["htp"] / throughput["vanilla"],
            "echo/vanilla throughput": throughput["echo"] / throughput["vanilla"],
            "htp/vanilla peak memory": memory["htp"]["peak_mb"] / memory["vanilla"]["peak_mb"],
            "echo/vanilla peak memory": memory["echo"]["peak_mb"] / memory["vanilla"]["peak_mb"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if base.device.type == "cpu" else "_gpu"
    (args.out / f"encoder_speed{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {m} | {throughput[m]:.0f} | {throughput[m] / throughput['vanilla']:.3f} | "
        f"{memory[m]['peak_mb']:.0f} | {memory[m]['peak_mb'] / memory['vanilla']['peak_mb']:.3f} |"
        for m in METHODS
    )
    table = (
        f"# Encoder speed ({result['device_name']}, {result['dtype']})\n\n"
        f"{result['htp_settings']}; {len(texts)} {source}; batch {args.batch_size}; "
        f"max_length {base.config.max_length}. Text tokens/s, methods interleaved in one run; "
        f"memory = {result['memory_kind']} ({args.memory_n} texts, one child process per method).\n\n"
        "| method | text tokens/s | vs vanilla | peak memory MB | vs vanilla |\n|---|---|---|---|---|\n"
        f"{rows}\n\nTargets: htp throughput >= 0.95x vanilla; htp peak memory <= 1.10x vanilla.\n"
    )
    (args.out / f"encoder_speed{tag}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
