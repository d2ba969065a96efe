"""Prefect flow over the rebuild pipeline: plan, embedding batches as tasks, then write,
verify and switch. The old version serves until the switch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llama_index.core.schema import TextNode
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.dask_runner import prefect_api_for_local_workers
from flows.runtime import cached_embedding, settings_from, task_runner_for
from pipelines.index_access import index_lock
from pipelines.ingest import embed_batch_isolated, node_batches
from pipelines.rebuild import RebuildPlan, plan_rebuild, target_encoder, write_rebuild
from pipelines.settings import Settings


def _target(index_dir: str, settings: dict[str, Any], overrides: dict[str, Any]) -> Settings:
    config = settings_from(settings)
    return config.model_copy(update={"encoder": target_encoder(Path(index_dir), config, overrides)})


@task(name="plan-rebuild", retries=1, cache_policy=NO_CACHE)
def plan_task(index_dir: str, settings: dict[str, Any], index_kind: str | None, source: str | None) -> RebuildPlan:
    config = settings_from(settings)
    return plan_rebuild(Path(index_dir), config, cached_embedding(config.encoder), index_kind=index_kind, source=source)


@task(name="embed-batch", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def embed_batch_task(batch: list[TextNode], settings: dict[str, Any]) -> tuple[list[TextNode], dict[str, str]]:
    return embed_batch_isolated(batch, cached_embedding(settings_from(settings).encoder))


@task(name="write-verify-switch", retries=1, cache_policy=NO_CACHE)
def write_task(index_dir: str, plan: RebuildPlan, nodes: list[TextNode], errors: dict[str, str], settings: dict[str, Any]):
    config = settings_from(settings)
    return write_rebuild(Path(index_dir), plan, nodes, errors, config, cached_embedding(config.encoder))


@flow(name="htp-index-rebuild", log_prints=True)
def rebuild_flow_body(
    index_dir: str, settings: dict[str, Any] | None = None, encoder_overrides: dict[str, Any] | None = None,
    index_kind: str | None = None, source: str | None = None,
) -> dict[str, Any]:
    """Re-embed every node of ``index_dir`` into a new version, then switch to it."""
    began = time.perf_counter()
    base = settings_from(settings or {})
    with index_lock(Path(index_dir), base.lock_timeout):
        target = _target(index_dir, settings or {}, encoder_overrides or {}).model_dump(mode="json")
        plan = plan_task(index_dir, target, index_kind, source)
        futures = embed_batch_task.map(node_batches(plan.by_doc, base.nodes_per_batch), settings=unmapped(target))
        nodes: list[TextNode] = []
        errors: dict[str, str] = {}
        for embedded, batch_errors in futures.result():
            nodes += embedded
            errors.update(batch_errors)
        stats = write_task(index_dir, plan, nodes, errors, target)
    stats.seconds = time.perf_counter() - began
    create_markdown_artifact(markdown=stats.to_markdown(f"Rebuild {index_dir}"), key="rebuild-stats")
    return stats.to_json()


def rebuild_flow(index_dir: str, settings: dict[str, Any] | None = None, *, encoder_overrides: dict[str, Any] | None = None,
                 index_kind: str | None = None, source: str | None = None, task_runner: str | None = None) -> dict[str, Any]:
    """Run the rebuild flow with the chosen task runner."""
    runner = task_runner_for(task_runner)
    with prefect_api_for_local_workers(task_runner):
        return rebuild_flow_body.with_options(task_runner=runner)(index_dir, settings, encoder_overrides, index_kind, source)
