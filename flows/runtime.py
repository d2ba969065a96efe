"""What every flow shares: settings passed as JSON, one model per worker, task runners."""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from htp_embed import EncoderConfig
from htp_embed.llama_index import HTPEmbedding
from pipelines.index_access import encoder_settings_for
from pipelines.settings import Settings

_MODELS: dict[str, HTPEmbedding] = {}
_MODELS_LOCK = threading.Lock()
_LOADS = 0  # models this process has loaded: a worker that loads per task is a bug


def settings_from(data: dict[str, Any]) -> Settings:
    """Settings travel between tasks (and machines) as JSON-ready dicts."""
    return Settings.model_validate(data) if data else Settings()


def cached_embedding(config: EncoderConfig) -> HTPEmbedding:
    """The embedding for ``config``, loaded at most once per process (a Dask worker, say)."""
    global _LOADS
    key = config.model_dump_json()
    with _MODELS_LOCK:
        if key not in _MODELS:
            apply_torch_threads()
            _MODELS[key] = HTPEmbedding(config=config)
            _LOADS += 1
        return _MODELS[key]


def apply_torch_threads() -> None:
    """Use the torch thread count a Dask worker was started with (its share of the cores).

    Set explicitly because ``OMP_NUM_THREADS`` only counts if it is there before torch starts
    its thread pool, which a worker that imported torch early may already have done.
    """
    from flows.dask_runner import TORCH_THREADS_ENV

    threads = os.environ.get(TORCH_THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


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


def embedding_for(index_dir: str | Path, settings: dict[str, Any]) -> tuple[HTPEmbedding, Settings]:
    """The index's encoder (see :func:`encoder_settings_for`), cached per process, and the
    settings with that encoder filled in."""
    config = settings_from(settings)
    encoder = encoder_settings_for(Path(index_dir), config)
    return cached_embedding(encoder), config.model_copy(update={"encoder": encoder})


def task_runner_for(name: str | None):
    """'thread' (default: one worker, since a CPU encoder already uses every core), 'thread=N',
    or 'dask' / 'dask=N' / 'dask=ADDRESS' (see :mod:`flows.dask_runner`)."""
    if name in (None, "", "thread"):
        return ThreadPoolTaskRunner(max_workers=1)
    if name.startswith("thread="):
        return ThreadPoolTaskRunner(max_workers=int(name.split("=", 1)[1]))
    if name == "dask" or name.startswith("dask="):
        from flows.dask_runner import dask_task_runner

        return dask_task_runner(name)
    raise ValueError(
        f"unknown task runner {name!r}; use 'thread', 'thread=N', 'dask', 'dask=N' or 'dask=ADDRESS'"
    )
