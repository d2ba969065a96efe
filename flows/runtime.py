"""What every flow shares: settings passed as JSON, one model per worker, task runners."""

from __future__ import annotations

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


def settings_from(data: dict[str, Any]) -> Settings:
    """Settings travel between tasks (and machines) as JSON-ready dicts."""
    return Settings.model_validate(data) if data else Settings()


def cached_embedding(config: EncoderConfig) -> HTPEmbedding:
    """The embedding for ``config``, loaded at most once per process (a Dask worker, say)."""
    key = config.model_dump_json()
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = HTPEmbedding(config=config)
        return _MODELS[key]


def embedding_for(index_dir: str | Path, settings: dict[str, Any]) -> tuple[HTPEmbedding, Settings]:
    """The index's encoder (see :func:`encoder_settings_for`), cached per process, and the
    settings with that encoder filled in."""
    config = settings_from(settings)
    encoder = encoder_settings_for(Path(index_dir), config)
    return cached_embedding(encoder), config.model_copy(update={"encoder": encoder})


def task_runner_for(name: str | None):
    """'thread' (default: one worker, since a CPU encoder already uses every core) or
    'dask' / 'dask=ADDRESS' (a LocalCluster, or an existing cluster's scheduler)."""
    if name in (None, "", "thread"):
        return ThreadPoolTaskRunner(max_workers=1)
    if name.startswith("thread="):
        return ThreadPoolTaskRunner(max_workers=int(name.split("=", 1)[1]))
    if name == "dask" or name.startswith("dask="):
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise RuntimeError('the dask task runner needs: pip install "htp-index[dist]"') from exc
        address = name.split("=", 1)[1] if "=" in name else None
        return DaskTaskRunner(address=address) if address else DaskTaskRunner()
    raise ValueError(f"unknown task runner {name!r}; use 'thread', 'thread=N', 'dask' or 'dask=ADDRESS'")
