"""Shared setup of the quality study: the SciFact subsample, model loading, result recording.

Every table script records rows as soon as they are measured (atomic rewrite of a JSON file),
so an interrupted run loses nothing; re-running a script re-scores from the embedding cache.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from htp_embed import HTPEncoder  # noqa: E402
from pipelines.beir import BeirDataset  # noqa: E402
from pipelines.evaluation import EmbeddingCache, evaluate, prepare_dataset  # noqa: E402

SCIFACT = Path(os.environ.get("HTP_EVAL_SCIFACT", ROOT.parent / "shared" / "data" / "scifact"))
SPLIT = "train"
# CPU is shared (~140-550 tokens/s): 150 queries share 166 judged abstracts; 100 random
# others make 266 documents (~81k tokens, one pass over every layer in 3-10 minutes).
SAMPLE: dict[str, Any] = {"max_queries": 150, "max_docs": 100, "seed": 0}
MAX_LENGTH = 512
RESULTS = ROOT / "benchmarks" / "results" / "quality"


def load_sample(**overrides: Any) -> BeirDataset:
    return prepare_dataset(SCIFACT, SPLIT, **{**SAMPLE, **overrides})


def load_base(model: str, method: str = "vanilla", **settings: Any) -> HTPEncoder:
    """The model at full depth (exit_layer=None) so that one pass can fill every exit layer."""
    # attention_sink="off": the tables' plain variants predate the option; the sink variants
    # add the same token explicitly (multi_exit.with_sink_prefix), so cached vectors stay valid.
    settings = {"max_length": MAX_LENGTH, "batch_size": 8, "exit_layer": None, "attention_sink": "off", **settings}
    return HTPEncoder(model=model, method=method, **settings)


def dev_halves(qids: list[str]) -> dict[str, set[str]]:
    """All queries and the two fixed halves of the development split: settings are chosen on
    A, and B shows whether the choice holds on queries that did not choose it."""
    import random

    half_a = set(random.Random(7).sample(sorted(qids), len(qids) // 2))
    return {"all": set(qids), "A": half_a, "B": set(qids) - half_a}


def score_by_half(qrels: dict, run: dict, halves: dict[str, set[str]]) -> dict[str, dict[str, float]]:
    """Each half's mean metrics (x100, 2 decimals) for a run."""
    from pipelines.evaluation import score_run

    scores = {}
    for half, keep in halves.items():
        means, _ = score_run({q: v for q, v in qrels.items() if q in keep}, {q: v for q, v in run.items() if q in keep})
        scores[half] = {m: round(100 * v, 2) for m, v in means.items()}
    return scores


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, default=str)
    os.chmod(tmp, 0o644)  # mkstemp creates owner-only files; results are for everyone to read
    os.replace(tmp, path)


def read_table(table: str) -> list[dict[str, Any]]:
    path = RESULTS / f"{table}.json"
    return json.loads(path.read_text()) if path.exists() else []


def read_per_query(table: str) -> dict[str, dict[str, float]]:
    path = RESULTS / "per_query" / f"{table}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record(table: str, label: str, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Store one row (replacing an older row with the same label) and its per-query NDCG@10."""
    per_query = result.pop("per_query", None)
    row = {"label": label, **extra, **{k: v for k, v in result.items() if k != "cache"}}
    rows = [r for r in read_table(table) if r["label"] != label] + [row]
    _write_json(RESULTS / f"{table}.json", rows)
    if per_query is not None:
        scores = read_per_query(table)
        scores[label] = {q: v["ndcg@10"] for q, v in per_query.items()}
        _write_json(RESULTS / "per_query" / f"{table}.json", scores)
    print(f"[{table}] {label:60s} ndcg@10={row['ndcg@10']:.4f} r@100={row['recall@100']:.4f} "
          f"({row['queries']} q, {row['docs']} docs, {row['seconds']}s)", flush=True)
    return row


def score(table: str, label: str, dataset: BeirDataset, retriever: Any, **extra: Any) -> dict[str, Any]:
    """Evaluate with per-query output and record the row."""
    result = evaluate(dataset, SPLIT, retriever, per_query=True, cache_dir=None)
    return record(table, label, result, **extra)


def cache() -> EmbeddingCache:
    return EmbeddingCache()
