"""One query at a time through the HTTP service: what a RAG app waits for when the service is idle.

    python benchmarks/service_latency.py [--queries 150] [--nodes 100000] [--compare-implementation]
                                         [--compare-http] [--against CHECKOUT]

Two indexes, each served by its own ``htp-index serve`` process (default settings, batching
on), one client sending one ``POST /query`` after the other (top 5), the three modes rotating
query by query so that noise on the machine hits them alike:

* ``demo``: the bundled sample corpus ingested with the default settings (the demo's index);
* ``N nodes``: an index of N nodes built through the store API (``store_scale.build``: real
  SciFact sentences as texts, clustered synthetic vectors) recorded as made by the default
  encoder, so the service loads the real model and embeds every query; only the vectors are
  synthetic, which is what a latency figure needs.

Beside the service figures, the same queries are embedded in this process with the same encoder
(``encode_queries`` of one text): the part of a dense or hybrid query that is the model's, and
the floor below which the service cannot go. ``--compare-implementation`` and ``--compare-http``
add pairs of services run at once, queries alternating between them (the encoder's own forward
pass vs transformers' class; uvicorn's h11 vs httptools parser); so does ``--against CHECKOUT``,
this code against another checkout's (a before/after that separate runs are too noisy for). Writes
``benchmarks/results/service_latency.{json,md}`` (``--out`` for another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from load_test import command, free_port
from machine import cpu_model
from store_scale import build, queries

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("dense", "sparse", "hybrid")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def start_server(index: Path, env: dict[str, str], http: str | None = None) -> tuple[subprocess.Popen, str]:
    """``htp-index serve`` on ``index``, once its /health answers: the process and its base URL.
    ``http`` names uvicorn's HTTP parser ("h11", "httptools") for the same app, started by hand."""
    port = free_port()
    if http is None:
        argv = command("serve", "--index", str(index), "--port", str(port))
    else:
        argv = [sys.executable, "-c", "import uvicorn; from pipelines.service import create_app; "
                f"uvicorn.run(create_app({str(index)!r}), host='127.0.0.1', port={port}, http={http!r}, "
                "log_level='warning')"]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the service did not start: {server.stderr.read() if server.stderr else ''}")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(30)


def serve_and_measure(index: Path, texts: list[str], env: dict[str, str]) -> dict:
    """Start the service on ``index``, warm it up, then time each text in each mode."""
    server, base = start_server(index, env)
    try:
        latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
        with httpx.Client(base_url=base, timeout=60) as http:
            for text in texts[:5]:  # warm-up: first calls allocate and fault weights in
                for mode in MODES:
                    http.post("/query", json={"query": text, "top_k": 5, "mode": mode}).raise_for_status()
            for i, text in enumerate(texts):
                for mode in MODES[i % 3:] + MODES[: i % 3]:
                    began = time.perf_counter()
                    response = http.post("/query", json={"query": text, "top_k": 5, "mode": mode})
                    latencies[mode].append((time.perf_counter() - began) * 1000)
                    response.raise_for_status()
            health = http.get("/health").json()
    finally:
        stop_server(server)
    return {"encoder": health["encoder"],
            **{mode: {"p50": pct(v, 50), "p95": pct(v, 95), "n": len(v)} for mode, v in latencies.items()}}


def compare_services(index: Path, texts: list[str], services: dict[str, tuple[dict[str, str], str | None]],
                     mode: str = "hybrid") -> dict:
    """p50/p95 of two services on ``index`` at once (name -> environment and HTTP parser, see
    :func:`start_server`), the client alternating between them query by query (the order
    flipping each time), so that load on the machine falls on both alike; ``ratio`` is the
    median over queries of the second's latency over the first's."""
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for name, (env, http) in services.items():
            servers[name] = start_server(index, env, http)
        latencies: dict[str, list[float]] = {name: [] for name in servers}
        clients = {name: httpx.Client(base_url=base, timeout=60) for name, (_, base) in servers.items()}
        names = list(servers)
        for text in texts[:5]:
            for name in names:
                clients[name].post("/query", json={"query": text, "top_k": 5, "mode": mode}).raise_for_status()
        for i, text in enumerate(texts):
            for name in (names if i % 2 == 0 else names[::-1]):
                began = time.perf_counter()
                response = clients[name].post("/query", json={"query": text, "top_k": 5, "mode": mode})
                latencies[name].append((time.perf_counter() - began) * 1000)
                response.raise_for_status()
        for client in clients.values():
            client.close()
    finally:
        for server, _ in servers.values():
            stop_server(server)
    rows = {name: {"p50": pct(v, 50), "p95": pct(v, 95), "n": len(v)} for name, v in latencies.items()}
    first, second = names
    ratio = statistics.median(b / a for a, b in zip(latencies[first], latencies[second], strict=True))
    return {**rows, "ratio": ratio}


def encode_floor(index: Path, texts: list[str]) -> dict:
    """p50/p95 of embedding one query text in-process with the index's encoder."""
    from pipelines.query import open_index

    encoder = open_index(index).encoder
    for text in texts[:5]:
        encoder.encode_queries([text])
    times = []
    for text in texts:
        began = time.perf_counter()
        encoder.encode_queries([text])
        times.append((time.perf_counter() - began) * 1000)
    return {"p50": pct(times, 50), "p95": pct(times, 95), "dtype": str(encoder.dtype).removeprefix("torch.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=150, help="query texts per mode and index")
    parser.add_argument("--nodes", type=int, default=100_000, help="size of the larger index (0: demo only)")
    parser.add_argument("--compare-implementation", action="store_true",
                        help="also serve the demo index with implementation='transformers' beside the default, "
                        "hybrid queries alternating between the two")
    parser.add_argument("--compare-http", action="store_true",
                        help="also serve each index twice, with uvicorn's pure-Python HTTP parser (h11) and with "
                        "httptools, queries alternating between the two, hybrid and sparse")
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="also serve each index with another checkout of htp-index (its root folder, e.g. a "
                        "git worktree of an earlier commit) beside this one, hybrid queries alternating between them")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()

    from htp_embed import HTPEncoder
    from pipelines.sample_corpus import sample_dir

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # OpenMP waits as htp-index sets it
    texts = queries(args.queries)
    work = Path(tempfile.mkdtemp(prefix="htp-latency-"))
    rows = []
    try:
        demo = work / "demo"
        subprocess.run(command("ingest", str(sample_dir()), "--index", str(demo), "--json"), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        indexes = [("demo (bundled sample)", demo)]
        if args.nodes:
            large = work / "large"
            build(large, args.nodes, 20_000, encoder=HTPEncoder(show_progress=False).identity())
            indexes.append((f"{args.nodes:,} nodes", large))
        for label, index in indexes:
            from indexes import read_manifest

            nodes = read_manifest(index).count
            measured = serve_and_measure(index, texts, env)
            floor = encode_floor(index, texts)
            rows.append({"index": label, "nodes": nodes, **measured, "encode_only": floor})
            print(f"{label}: " + ", ".join(f"{m} p50 {measured[m]['p50']:.1f} ms" for m in MODES)
                  + f"; encode only p50 {floor['p50']:.1f} ms", flush=True)
        compared = None
        if args.compare_implementation:
            transformers = {**env, "HTP_INDEX_ENCODER__IMPLEMENTATION": "transformers"}
            compared = compare_services(demo, texts, {"native": (env, None), "transformers": (transformers, None)})
        against = []
        if args.against:
            this = {**env, "PYTHONPATH": str(ROOT)}
            other = {**env, "PYTHONPATH": str(args.against.resolve())}
            for label, index in indexes:
                pair = compare_services(index, texts, {"against": (other, None), "this": (this, None)})
                against.append({"index": label, **pair})
                print(f"{label}, hybrid: {args.against} p50 {pair['against']['p50']:.2f} ms, this checkout "
                      f"{pair['this']['p50']:.2f} ms, median per-query ratio {pair['ratio']:.3f}", flush=True)
        parsers = []
        if args.compare_http:
            for label, index in indexes:
                for mode in ("hybrid", "sparse"):
                    pair = compare_services(index, texts, {"h11": (env, "h11"), "httptools": (env, "httptools")}, mode)
                    parsers.append({"index": label, "mode": mode, **pair})
                    print(f"{label}, {mode}: h11 p50 {pair['h11']['p50']:.2f} ms, httptools {pair['httptools']['p50']:.2f} ms, "
                          f"median per-query ratio {pair['ratio']:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0],
              "queries": len(texts), "rows": rows, "implementations": compared, "http_parsers": parsers,
              "against": {"checkout": str(args.against), "rows": against} if args.against else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# One query at a time through `htp-index serve` ({result['cpu']}, {result['cores']} cores)", "",
        f"{len(texts)} SciFact queries per mode, modes rotating, one client, top 5, loopback HTTP; "
        f"encoder {rows[0]['encoder']} in {rows[0]['encode_only']['dtype']}. "
        "`encode only`: the same texts embedded in-process, one at a time.", "",
        "| index | nodes | dense p50 / p95 | sparse p50 / p95 | hybrid p50 / p95 | encode only p50 / p95 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row[m]['p50']:.1f} / {row[m]['p95']:.1f} ms" for m in MODES]
        enc = row["encode_only"]
        lines.append(f"| {row['index']} | {row['nodes']:,} | " + " | ".join(cells)
                     + f" | {enc['p50']:.1f} / {enc['p95']:.1f} ms |")
    lines.append("")
    lines.append(f"Median of the hybrid/encode-only ratio: "
                 f"{statistics.median(r['hybrid']['p50'] / r['encode_only']['p50'] for r in rows):.2f}x.")
    if compared:
        lines += ["", "Demo index, hybrid, two services at once (queries alternating between them): "
                  f"own forward pass {compared['native']['p50']:.1f} / {compared['native']['p95']:.1f} ms, "
                  f"transformers' class {compared['transformers']['p50']:.1f} / "
                  f"{compared['transformers']['p95']:.1f} ms (p50 / p95): transformers/own per-query median "
                  f"{compared['ratio']:.2f}x."]
    if against:
        lines += ["", f"Against another checkout (`{args.against}`), two services on each index at once, hybrid "
                  "queries alternating between them (both share the cores):", "",
                  "| index | other p50 / p95 | this p50 / p95 | median per-query this/other |", "|---|---|---|---|"]
        for p in against:
            lines.append(f"| {p['index']} | {p['against']['p50']:.1f} / {p['against']['p95']:.1f} ms | "
                         f"{p['this']['p50']:.1f} / {p['this']['p95']:.1f} ms | {p['ratio']:.3f} |")
    if parsers:
        lines += ["", "uvicorn's HTTP parser, two services on each index at once (queries alternating between "
                  "them; both share the 2 cores, so absolute figures are above one service's):", "",
                  "| index | mode | h11 p50 / p95 | httptools p50 / p95 | median per-query httptools/h11 |",
                  "|---|---|---|---|---|"]
        for p in parsers:
            lines.append(f"| {p['index']} | {p['mode']} | {p['h11']['p50']:.2f} / {p['h11']['p95']:.2f} ms | "
                         f"{p['httptools']['p50']:.2f} / {p['httptools']['p95']:.2f} ms | {p['ratio']:.3f} |")
    from results_file import write_markdown

    write_markdown(args.out / "service_latency.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
