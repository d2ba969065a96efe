"""Prefect flow over rebuild: the steps of :meth:`pipelines.engine.IndexSession.rebuild` as
tasks, embedding batches fanned out. The old version serves until the switch."""

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


@flow(name="htp-index-rebuild", log_prints=True)
def rebuild_flow_body(
    index_dir: str, settings: dict[str, Any] | None = None, encoder_overrides: dict[str, Any] | None = None,
    index_kind: str | None = None, source: str | None = None,
) -> Any:
    """Re-embed every node of ``index_dir`` into a new version, then switch to it."""
    began = time.perf_counter()
    with own_logs_in_the_run(), IndexSession.open(
        index_dir, settings_from(settings), encoder_overrides=encoder_overrides, load_encoder=cached_encoder
    ) as session:
        stats = session.rebuild(index_kind=index_kind, source=source, runner=PrefectSteps())
    stats.seconds = time.perf_counter() - began
    publish_stats(stats, "rebuild", f"Rebuild {index_dir}", index_dir)
    return finished(stats)


def rebuild_flow(index_dir: str, settings: dict[str, Any] | None = None, *, encoder_overrides: dict[str, Any] | None = None,
                 index_kind: str | None = None, source: str | None = None, task_runner: str | None = None) -> dict[str, Any]:
    """Run the rebuild flow with the chosen task runner."""
    with temporary_prefect_api(task_runner):
        return rebuild_flow_body.with_options(task_runner=ready_task_runner(task_runner))(
            index_dir, settings, encoder_overrides, index_kind, source
        )
