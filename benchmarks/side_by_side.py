"""Two ways of running the encoder, timed alternately in one process (shared by benchmarks).

Machines are noisy (shared cores): timing one path and then the other puts a load spike on one
of them. Here every round runs both, the order alternating round by round, and the figures
that matter are the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SideBySide:
    """What :func:`alternate` measured, per path name."""

    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # one query at a time
    doc_seconds: dict[str, list[float]] = field(default_factory=dict)  # the documents, per round
    # the same, in this process's CPU time: steadier than wall time where a busy host takes
    # cores away (a neighbour's load shows in wall time only)
    doc_cpu_seconds: dict[str, list[float]] = field(default_factory=dict)
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # queries, documents

    def rows(self, doc_tokens: int) -> dict[str, dict[str, float]]:
        """p50 / p95 query latency and document tokens/s per path."""
        rows = {}
        for path, times in self.latency_ms.items():
            rows[path] = {"query_p50_ms": float(np.percentile(times, 50)), "query_p95_ms": float(np.percentile(times, 95)),
                          "doc_tokens_per_s": doc_tokens / statistics.median(self.doc_seconds[path]),
                          "doc_tokens_per_cpu_s": doc_tokens / statistics.median(self.doc_cpu_seconds[path])}
        return rows

    def min_cosine(self, first: str, second: str, which: int) -> float:
        """The least cosine between two paths' vectors (``which``: 0 queries, 1 documents)."""
        return float(np.min(np.sum(self.vectors[first][which] * self.vectors[second][which], axis=1)))

    def compared(self, baseline: str, contender: str, doc_tokens: int) -> dict[str, Any]:
        """Each path's row, the contender's speed-ups over the baseline (query p50, document
        tokens/s) and the least cosines between their vectors: a result's shared fields."""
        rows = self.rows(doc_tokens)
        return {
            "paths": rows,
            "query_speedup": rows[baseline]["query_p50_ms"] / rows[contender]["query_p50_ms"],
            "doc_speedup": rows[contender]["doc_tokens_per_s"] / rows[baseline]["doc_tokens_per_s"],
            "min_cosine_queries": self.min_cosine(baseline, contender, 0),
            "min_cosine_docs": self.min_cosine(baseline, contender, 1),
        }


def add_arguments(parser: argparse.ArgumentParser, results: Path, what: str) -> None:
    """The options every side-by-side benchmark takes (``what``: what a path is called)."""
    parser.add_argument("--rounds", type=int, default=4, help=f"rounds per {what} (the order alternates)")
    parser.add_argument("--queries", type=int, default=40, help="single queries timed per round")
    parser.add_argument("--docs", type=int, default=16, help="abstracts embedded per round")
    parser.add_argument("--dtype", default="auto", help="the encoder's dtype (auto: as the product decides)")
    parser.add_argument("--out", type=Path, default=results, help="folder the JSON and Markdown results go to")


def alternate(paths: dict[str, Callable[[], Any]], texts: list[str], docs: list[str], rounds: int) -> SideBySide:
    """Run every path ``rounds`` times, alternating the order. A path is a function that sets
    it up (if it must) and returns the encoder to use. Each round times ``texts`` embedded one
    query at a time and ``docs`` embedded as documents in the encoder's own batches; a first,
    untimed round warms up and keeps each path's vectors."""
    measured = SideBySide({name: [] for name in paths}, {name: [] for name in paths}, {name: [] for name in paths})
    for name, use in paths.items():
        encoder = use()
        measured.vectors[name] = (encoder.encode_queries(texts), encoder.encode_documents(docs))
    names = list(paths)
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            encoder = paths[name]()
            for text in texts:
                began = time.perf_counter()
                encoder.encode_queries([text])
                measured.latency_ms[name].append((time.perf_counter() - began) * 1000)
            began, began_cpu = time.perf_counter(), time.process_time()
            encoder.encode_documents(docs)
            measured.doc_seconds[name].append(time.perf_counter() - began)
            measured.doc_cpu_seconds[name].append(time.process_time() - began_cpu)
        shown = ", ".join(f"{name} {statistics.median(measured.latency_ms[name]):.1f} ms" for name in names)
        print(f"round {round_ + 1}: query p50 {shown}", flush=True)
    return measured
