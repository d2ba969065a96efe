"""Load test of the HTTP query service on loopback, with an ingest switching versions under it.

Builds an index of the bundled sample corpus with the default model, starts
``htp-index serve`` as its own process, and runs N concurrent clients (asyncio + httpx) sending
``POST /query`` for D seconds. Halfway through, a separate ``htp-index ingest`` process adds a
document, so the service must switch to a new version while under load. Reports requests,
errors, throughput and latency percentiles, and which index versions answered.

Writes benchmarks/results/load_test.{json,md}.

    python benchmarks/load_test.py [--clients 20] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUERIES = [
    "how does the index stay consistent after a crash",
    "what is hierarchical token prepending",
    "which model is used by default",
    "how are documents split into nodes",
    "can I query the index from another process",
    "what happens to deleted files",
    "sentence embeddings from decoder-only language models",
    "how is retrieval quality measured",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "htp_cli", *args]


async def client(http: httpx.AsyncClient, url: str, worker: int, stop: asyncio.Event,
                 log: list[tuple[float, float, int, int | None]]) -> None:
    """One client: query after query until ``stop``; records (start, latency, status, version)."""
    i = worker
    while not stop.is_set():
        began = time.monotonic()
        try:
            response = await http.post(url, json={"query": QUERIES[i % len(QUERIES)], "top_k": 5})
            status = response.status_code
            version = response.json().get("version") if status == 200 else None
        except httpx.HTTPError:
            status, version = -1, None
        log.append((began, time.monotonic() - began, status, version))
        i += 1


def measure(work: Path, max_batch: int, clients: int, seconds: float, env: dict[str, str]) -> dict:
    """One run: a fresh index, the service with ``max_batch``, the clients, a concurrent ingest."""
    from pipelines.sample_corpus import sample_dir

    source = work / f"docs-{max_batch}"
    shutil.copytree(sample_dir(), source)
    index = work / f"index-{max_batch}"
    quiet = {"env": env, "check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(command("ingest", str(source), "--index", str(index), "--json"), **quiet)
    port = free_port()
    server = subprocess.Popen(command("serve", "--index", str(index), "--port", str(port), "--reload-interval", "0.5",
                                      "--max-batch", str(max_batch)),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start: {server.stderr.read() if server.stderr else ''}")
            time.sleep(0.5)
        httpx.post(f"{base}/query", json={"query": "warm up", "top_k": 1}, timeout=60)
        first_version = httpx.get(f"{base}/health").json()["version"]
        # Another process ingests a new document while the clients run; the load lasts at
        # least `seconds` and until the new version has served for a few seconds.
        (source / "late-arrival.md").write_text("# Late arrival\n\nThis document arrives while the service is under load.\n")

        async def scenario() -> tuple[list, float, float]:
            loop = asyncio.get_running_loop()

            def ingest_now() -> tuple[float, float]:
                began = time.monotonic()
                subprocess.run(command("ingest", str(source), "--index", str(index), "--json"), **quiet)
                return began, time.monotonic()

            log: list[tuple[float, float, int, int | None]] = []
            stop = asyncio.Event()
            limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
            async with httpx.AsyncClient(timeout=120, limits=limits) as http:
                tasks = [asyncio.create_task(client(http, f"{base}/query", w, stop, log)) for w in range(clients)]
                ingest_task = loop.run_in_executor(None, ingest_now)
                await asyncio.sleep(seconds)
                ingest_began, ingest_ended = await ingest_task
                while not any(e[3] not in (None, first_version) for e in log[-clients:]):
                    await asyncio.sleep(0.5)
                await asyncio.sleep(3)
                stop.set()
                await asyncio.gather(*tasks)
            return log, ingest_began, ingest_ended

        started = time.monotonic()
        log, ingest_began, ingest_ended = asyncio.run(scenario())
        elapsed = time.monotonic() - started
        health = httpx.get(f"{base}/health").json()
    finally:
        server.terminate()
        server.wait(30)

    latencies = np.array([entry[1] for entry in log]) * 1000
    statuses = Counter(entry[2] for entry in log)
    during_ingest = [e for e in log if ingest_began <= e[0] <= ingest_ended]
    return {
        "max_batch": max_batch, "clients": clients, "seconds": elapsed,
        "requests": len(log), "errors": len(log) - statuses.get(200, 0), "statuses": dict(statuses),
        "throughput_rps": len(log) / elapsed,
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p90": float(np.percentile(latencies, 90)),
                       "p99": float(np.percentile(latencies, 99)), "max": float(latencies.max())},
        "versions_served": dict(Counter(e[3] for e in log if e[3] is not None)),
        "first_version": first_version, "final_version": health["version"],
        "requests_during_ingest": len(during_ingest),
        "errors_during_ingest": sum(e[2] != 200 for e in during_ingest),
        "ingest_seconds": ingest_ended - ingest_began, "model": health["encoder"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=30, help="least duration of each run")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[32, 1],
                        help="service settings to compare, one run each (32: batched, 1: one query per pass)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="htp-load-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        runs = [measure(work, max_batch, args.clients, args.seconds, env) for max_batch in args.max_batch]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs[-1]
    result = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "runs": runs}
    if len(runs) > 1:  # one --max-batch has nothing to compare with
        result["throughput_ratio_first_vs_last"] = runs[0]["throughput_rps"] / base["throughput_rps"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_test.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for run in runs:
        lat = run["latency_ms"]
        rows.append(
            f"| {run['max_batch']} | {run['requests']} | {run['errors']} | {run['errors_during_ingest']} of "
            f"{run['requests_during_ingest']} | {run['throughput_rps']:.1f} req/s | {lat['p50']:.0f} ms | "
            f"{lat['p90']:.0f} ms | {lat['p99']:.0f} ms | {lat['max']:.0f} ms | "
            f"{', '.join(f'v{k}: {v}' for k, v in sorted(run['versions_served'].items()))} |")
    table = (
        f"# Service load test ({result['machine']}, loopback)\n\n"
        f"`htp-index serve` on the bundled sample corpus, {runs[0]['model']}; {args.clients} concurrent clients, "
        f"top_k=5, at least {args.seconds:.0f} s per run; during each run a separate `htp-index ingest` process "
        "(model load included) adds a document and switches the index to a new version. One run per "
        "`--max-batch`, back to back.\n\n"
        "| max batch | requests | errors | errors during the ingest | throughput | p50 | p90 | p99 | max | versions that answered |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    if len(runs) > 1:
        table += (f"\nThroughput, max batch {runs[0]['max_batch']} vs {base['max_batch']}: "
                  f"{result['throughput_ratio_first_vs_last']:.2f}x.\n")
    from results_file import write_markdown

    write_markdown(args.out / "load_test.md", table)
    print(table)


if __name__ == "__main__":
    main()
