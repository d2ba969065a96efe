"""``ingest``: bring an index in line with a source, in this process (see :mod:`pipelines.engine`).

Only new and changed documents are embedded; re-running on unchanged input embeds nothing and
writes no new version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from htp_embed.llama_index import HTPEmbedding
from pipelines.engine import IndexSession, InProcess, Progress
from pipelines.runs import RunStats
from pipelines.settings import Settings
from pipelines.sources import require_source

log = logging.getLogger(__name__)


def ingest(
    source: str | Path | Iterable[str] | dict[str, str],
    index_dir: str | Path,
    settings: Settings | None = None,
    *,
    embedding: HTPEmbedding | None = None,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> RunStats:
    """Ingest ``source`` into the index at ``index_dir`` (created if missing); returns the run's
    statistics. ``embedding`` reuses a loaded model; ``progress``/``on_total`` report nodes
    embedded and the total to embed."""
    began = time.perf_counter()
    require_source(source)
    encoder = embedding.encoder if embedding is not None else None
    with IndexSession.open(index_dir, settings, encoder=encoder) as session:
        stats = session.ingest(source, InProcess(progress, on_total))
    stats.seconds = time.perf_counter() - began
    log.info("ingest into %s: %s", index_dir, {k: v for k, v in stats.to_json().items() if k != "errors"})
    return stats
