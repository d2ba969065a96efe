"""What every flow shares: settings in transit, one model per worker process, task runners,
and :class:`PrefectSteps`, which runs an :class:`~pipelines.engine.IndexSession`'s steps as
Prefect tasks."""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from llama_index.core.schema import TextNode
from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runner_spec import check_task_runner
from htp_embed import EncoderConfig, HTPEncoder
from pipelines.engine import EmbeddedBatch, IndexSession, embed_batch
from pipelines.runs import RunStats
from pipelines.settings import Settings

T = TypeVar("T")
_ENCODERS: dict[str, HTPEncoder] = {}
_ENCODERS_LOCK = threading.Lock()
_LOADS = 0  # models this process has loaded: a worker that loads per task is a bug

# Retries per step: reading a source and embedding may hit passing trouble (a network share,
# a worker lost); applying is retried once, which is safe since nothing is live until persist
# and the retry opens the index afresh (IndexSession.apply), not the store the failure changed.
STEP_RETRIES = {"plan": 2, "split": 1, "apply-and-persist": 1, "plan-rebuild": 1, "write-verify-switch": 1}


def settings_from(data: dict[str, Any] | None) -> Settings:
    """Settings arrive as :meth:`Settings.to_transport` JSON (a deployment's parameters are
    JSON), which is all the run uses (``{}``: every default); None means this process's own
    settings (its ``htp-index.toml`` and environment)."""
    return Settings.from_data(data) if data is not None else Settings()


def cached_encoder(config: EncoderConfig) -> HTPEncoder:
    """The encoder for ``config``, loaded at most once per process (a Dask worker, say)."""
    global _LOADS
    key = config.model_dump_json()
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            apply_torch_threads()
            _ENCODERS[key] = HTPEncoder(config)
            _LOADS += 1
        return _ENCODERS[key]


@task(name="embed-batch", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def embed_batch_task(batch: list[TextNode], encoder: EncoderConfig) -> EmbeddedBatch:
    """Embed one batch of nodes (the unit a task runner fans out) with exactly the encoder the
    session resolved from the index. A worker never looks at the index (on a remote machine
    it is not there); the batch it returns names its encoder, which the apply step checks."""
    return embed_batch(batch, cached_encoder(encoder))


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Whether a failed step is retried: passing trouble (a share not mounted yet, a file
    being copied, a lost worker) may be gone, but an error about the request itself (options
    that conflict with the index, no index to rebuild, an encoder unlike the index's) says the
    same again: two retries cost ~10 s of waiting and tracebacks for nothing."""
    from indexes import EncoderMismatchError, IndexNotFoundError
    from pipelines.errors import EncoderDriftError, OptionConflictError

    try:
        failure = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no exception to judge: retry as configured
        return True
    return not isinstance(failure, OptionConflictError | IndexNotFoundError | EncoderDriftError | EncoderMismatchError)


class PrefectSteps:
    """Runs each step of a session as a Prefect task (retried, visible in the UI) in the flow's
    process, and fans the embedding batches out through the flow's task runner."""

    def run(self, name: str, step: Callable[..., T], *args: Any) -> T:
        return task(step, name=name, retries=STEP_RETRIES.get(name, 0), retry_delay_seconds=5,
                    retry_condition_fn=worth_retrying, cache_policy=NO_CACHE)(*args)

    def embed(self, batches: list[list[TextNode]], session: IndexSession) -> list[EmbeddedBatch]:
        return embed_batch_task.map(batches, encoder=unmapped(session.settings.encoder)).result()


def apply_torch_threads() -> None:
    """Use the torch thread count a Dask worker was started with (its share of the cores).

    Set explicitly because ``OMP_NUM_THREADS`` only counts if it is there before torch starts
    its thread pool, which a worker that imported torch early may already have done.
    """
    from flows.dask_runner import torch_threads

    threads = torch_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def process_report() -> dict[str, Any]:
    """This process's pid, models loaded, torch threads and peak RSS; run on each Dask worker
    (``client.run(process_report)``) to check that workers load the model once and fit in memory."""
    import torch

    return {
        "pid": os.getpid(),
        "models_loaded": _LOADS,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }


def publish_stats(stats: RunStats, run: str, title: str, index_dir: str) -> None:
    """Publish a run's statistics as a Markdown artifact keyed by the run and the index
    (:func:`artifact_key`), so each index keeps its own series in the Prefect UI's Artifacts."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=stats.to_markdown(title), key=artifact_key(run, index_dir),
                             description=f"documents added/updated/deleted/unchanged/failed in {index_dir}")


def artifact_key(run: str, index_dir: str) -> str:
    """``<run>-stats-<index folder name>-<6 hex digits of its absolute path>``: one key shared
    by every index mixed their runs into one series, whose "latest" was whichever index ran
    last. Prefect keys take lowercase letters, digits and dashes only."""
    import hashlib
    import re
    from pathlib import Path

    path = Path(index_dir).expanduser().resolve()
    name = re.sub(r"[^a-z0-9]+", "-", path.name.lower()).strip("-")[:40] or "index"
    return f"{run}-stats-{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


def finished(stats: RunStats) -> Any:
    """A flow's end: its statistics, as a ``Completed`` state named ``Partial`` when documents
    failed (the command line exits 3 then; a plain Completed showed a good run in the UI, in
    automations and in ``prefect flow-run ls``). Callers still get the statistics back."""
    result = stats.to_json()
    if not stats.failed:
        return result
    from prefect.states import Completed

    first = stats.errors[0] if stats.errors else {"doc_id": "?", "error": "?"}
    return Completed(name="Partial", data=result,
                     message=f"{stats.failed} document(s) failed, e.g. {first['doc_id']}: {first['error']}")


def task_runner_for(name: str | None):
    """'thread' (default: one worker, since a CPU encoder already uses every core), 'thread=N',
    or 'dask' / 'dask=N' / 'dask=ADDRESS' (see :mod:`flows.dask_runner`)."""
    if name in (None, "", "thread"):
        return ThreadPoolTaskRunner(max_workers=1)
    check_task_runner(name)
    if name.startswith("thread="):
        return ThreadPoolTaskRunner(max_workers=int(name.split("=", 1)[1]))
    from flows.dask_runner import dask_task_runner

    return dask_task_runner(name)


def ready_task_runner(name: str | None):
    """:func:`task_runner_for`, with an existing Dask scheduler checked first: it answers and
    has a worker (see :func:`flows.dask_runner.wait_for_scheduler`)."""
    runner = task_runner_for(name)
    if name and name.startswith("dask="):
        from flows.dask_runner import parse_dask_spec, wait_for_scheduler

        address = parse_dask_spec(name).address
        if address:
            wait_for_scheduler(address)
    return runner


#: The packages whose log lines a flow run carries (plan counts, "waiting for the writer lock
#: held by …", the encoder's decisions).
OWN_LOGGERS = ("pipelines", "indexes", "htp_embed", "flows")


class _ToRunLogger(logging.Handler):
    """Hands a record to the flow run's logger: Prefect then stores it with the run (the UI's
    log tab) and prints it on the serving process's console."""

    def __init__(self, run_logger: logging.LoggerAdapter) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_logger.log(record.levelno, "%s: %s", record.name, record.getMessage())
        except Exception:  # a log line must never fail the run
            self.handleError(record)


@contextmanager
def own_logs_in_the_run() -> Iterator[None]:
    """htp-index's own INFO lines in the flow run's log. A scheduled run is a process Prefect
    starts, whose logging nobody configured: they fell below the root logger's WARNING and no
    operator ever saw them, not even the wait for a busy index. Where a command configured
    logging already (an ad-hoc ``--task-runner`` run prints them itself), nothing changes."""
    loggers = [logging.getLogger(name) for name in OWN_LOGGERS]
    if all(logger.getEffectiveLevel() <= logging.INFO for logger in loggers):
        yield
        return
    from prefect.logging import get_run_logger

    handler = _ToRunLogger(get_run_logger())
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:  # not propagated too: a warning would be printed twice
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
