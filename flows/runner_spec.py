"""The spelling of ``--task-runner`` checked without building the runner, so a typo is a usage
error before any work (it ran the plan first and failed with exit 1 as if the run had).
Standard library only: the CLI checks it without importing Prefect or Dask."""

from __future__ import annotations

RUNNERS = "'thread', 'thread=N', 'dask', 'dask=N' or 'dask=ADDRESS'"


def check_task_runner(name: str) -> str:
    """``name`` when it spells a task runner; otherwise ValueError naming the ones that do."""
    if name == "dask" or name.startswith("dask="):
        from flows.dask_runner import parse_dask_spec

        parse_dask_spec(name)
        return name
    if name == "thread":
        return name
    if name.startswith("thread="):
        workers = name.split("=", 1)[1].strip()
        if workers.isdigit() and int(workers) >= 1:
            return name
        raise ValueError(f"{name!r}: 'thread=N' takes a whole number of workers, at least 1")
    raise ValueError(f"unknown task runner {name!r}; use {RUNNERS}")
