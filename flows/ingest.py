"""Prefect flow over ingest: the steps of :meth:`pipelines.engine.IndexSession.ingest`, each a
task with retries, embedding batches fanned out through the flow's task runner.

Ad-hoc runs need no server (Prefect starts a temporary local one). The session holds the
writer lock for the whole run, so two flows on one index never interleave.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.runtime import (
    PrefectSteps,
    cached_encoder,
    finished,
    own_logs_in_the_run,
    publish_stats,
    ready_task_runner,
    settings_from,
)
from flows.temporary_server import temporary_prefect_api
from pipelines.engine import IndexSession
from pipelines.sources import require_source


@flow(name="htp-index-ingest", log_prints=True)
def ingest_flow_body(source: str, index_dir: str, settings: dict[str, Any] | None = None) -> Any:
    """Incrementally ingest ``source`` into the index at ``index_dir``; ``settings`` as
    :meth:`Settings.to_transport` writes them."""
    began = time.perf_counter()
    require_source(source)
    with own_logs_in_the_run(), IndexSession.open(index_dir, settings_from(settings), load_encoder=cached_encoder) as session:
        stats = session.ingest(source, PrefectSteps())
    stats.seconds = time.perf_counter() - began
    publish_stats(stats, "ingest", f"Ingest {source} -> {index_dir}", index_dir)
    return finished(stats)


def ingest_flow(source: str, index_dir: str, settings: dict[str, Any] | None = None, *, task_runner: str | None = None) -> dict[str, Any]:
    """Run the ingest flow with the chosen task runner ('thread' by default, or 'dask[=ADDRESS]')."""
    with temporary_prefect_api(task_runner):
        return ingest_flow_body.with_options(task_runner=ready_task_runner(task_runner))(source, index_dir, settings)
