"""Prefect flow over the ingest pipeline: the same steps as :func:`pipelines.ingest.ingest`,
each a task with retries, embedding batches fanned out through the flow's task runner.

Ad-hoc runs need no server (Prefect starts a temporary local one). The writer lock is held by
the flow itself for the whole run, so two flows on one index never interleave.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llama_index.core.schema import TextNode
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.dask_runner import prefect_api_for_local_workers
from flows.runtime import cached_embedding, embedding_for, settings_from, task_runner_for
from htp_embed import EncoderConfig
from indexes import EncoderMismatchError
from indexes.spec import canonical_encoder
from pipelines.chunking import embed_text
from pipelines.index_access import encoder_settings_for, index_lock, open_or_create_store
from pipelines.ingest import (
    IngestPlan,
    RunStats,
    apply_changes,
    embed_batch_isolated,
    ensure_correction,
    node_batches,
    node_vectors,
    plan_ingest,
    split_all,
)
from pipelines.sources import iter_source


@task(name="plan", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def plan_task(source: str, index_dir: str, settings: dict[str, Any]) -> IngestPlan:
    """Read the source and diff it against the index's document hashes."""
    embedding, config = embedding_for(index_dir, settings)
    store = open_or_create_store(Path(index_dir), config, embedding)
    items = iter_source(source, max_bytes=int(config.max_document_mb * 2**20))
    plan = plan_ingest(items, store.doc_hashes(), delete_missing=config.delete_missing)
    get_run_logger().info(
        "plan: %d new, %d changed, %d deleted, %d unchanged, %d unreadable",
        len(plan.new), len(plan.changed), len(plan.deleted), len(plan.unchanged), len(plan.errors),
    )
    return plan


@task(name="split", retries=1, cache_policy=NO_CACHE)
def split_task(plan: IngestPlan, index_dir: str, settings: dict[str, Any]) -> tuple[list[list[TextNode]], dict[str, str]]:
    """Split the documents to embed into nodes, grouped into embedding batches."""
    embedding, config = embedding_for(index_dir, settings)
    stats = RunStats()
    by_doc, _ = split_all(plan.to_embed, config, embedding, stats)
    errors = {e["doc_id"]: e["error"] for e in stats.errors}
    return node_batches(by_doc, config.nodes_per_batch), errors


@task(name="embed-batch", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def embed_batch_task(batch: list[TextNode], encoder: dict[str, Any]) -> tuple[list[TextNode], dict[str, str], dict[str, Any]]:
    """Embed one batch of nodes (the unit a task runner fans out) with exactly the encoder the
    flow resolved from the index; the model is loaded once per worker process. A worker never
    looks at the index (on a remote machine it is not there); it returns its encoder's identity
    so the apply step can check the vectors are the index's kind."""
    embedding = cached_embedding(EncoderConfig.model_validate(encoder))
    embedded, errors = embed_batch_isolated(batch, embedding)
    return embedded, errors, embedding.identity()


@task(name="apply-and-persist", retries=1, cache_policy=NO_CACHE)
def apply_task(plan: IngestPlan, nodes: list[TextNode], errors: dict[str, str], identities: list[dict[str, Any]],
               index_dir: str, settings: dict[str, Any]) -> RunStats:
    """Check the vectors came from the index's encoder, write the changes into the store and
    persist a new version atomically."""
    embedding, config = embedding_for(index_dir, settings)
    store = open_or_create_store(Path(index_dir), config, embedding)
    for identity in identities:
        if canonical_encoder(identity) != canonical_encoder(store.encoder):
            raise EncoderMismatchError.between(Path(index_dir), store.encoder, identity)
    stats = RunStats()
    for error in plan.errors:
        stats.fail(error.doc_id, error.error)
    for doc_id, error in errors.items():
        stats.fail(doc_id, error)
    ensure_correction(store, node_vectors(nodes), [embed_text(n) for n in nodes], embedding, config)
    apply_changes(store, plan, nodes, set(errors), stats)
    if plan.to_embed or plan.deleted or store.version is None:
        stats.version = store.persist()
    else:
        stats.version = store.version
    stats.count = store.count
    return stats


@flow(name="htp-index-ingest", log_prints=True)
def ingest_flow_body(source: str, index_dir: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Incrementally ingest ``source`` into the index at ``index_dir``."""
    began = time.perf_counter()
    config = settings_from(settings or {})
    settings = config.to_transport()
    with index_lock(Path(index_dir), config.lock_timeout):
        # Resolved once, here where the index is, and shipped whole to every worker.
        encoder = encoder_settings_for(Path(index_dir), config).model_dump(mode="json")
        plan = plan_task(source, index_dir, settings)
        batches, errors = split_task(plan, index_dir, settings)
        futures = embed_batch_task.map(batches, encoder=unmapped(encoder))
        nodes: list[TextNode] = []
        identities: list[dict[str, Any]] = []
        for embedded, batch_errors, identity in futures.result():
            nodes += embedded
            errors.update(batch_errors)
            identities.append(identity)
        stats = apply_task(plan, nodes, errors, identities, index_dir, settings)
    stats.seconds = time.perf_counter() - began
    create_markdown_artifact(
        markdown=stats.to_markdown(f"Ingest {source} -> {index_dir}"),
        key="ingest-stats", description="documents added/updated/deleted/unchanged/failed",
    )
    return stats.to_json()


def ingest_flow(source: str, index_dir: str, settings: dict[str, Any] | None = None, *, task_runner: str | None = None) -> dict[str, Any]:
    """Run the ingest flow with the chosen task runner ('thread' by default, or 'dask[=ADDRESS]')."""
    runner = task_runner_for(task_runner)
    with prefect_api_for_local_workers(task_runner):
        return ingest_flow_body.with_options(task_runner=runner)(source, index_dir, settings)
