"""``rebuild``: re-embed an index into a new version, verify it, then switch atomically.

Used after changing the model, method, K policy, layers or index kind. The live version keeps
serving (readers never see a half-built index); the new version is written beside it and
becomes live only when it persists. The steps are :class:`pipelines.engine.IndexSession`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from htp_embed.llama_index import HTPEmbedding
from indexes import FaissVectorStore, IndexNotFoundError
from pipelines.engine import IndexSession, InProcess, Progress
from pipelines.errors import OptionConflictError
from pipelines.identity_check import warn_ignored_encoder_settings
from pipelines.runs import RunStats
from pipelines.settings import Settings, load_settings

log = logging.getLogger(__name__)


def rebuild(
    index_dir: str | Path,
    settings: Settings | None = None,
    *,
    encoder_overrides: dict[str, Any] | None = None,
    index_kind: str | None = None,
    source: str | Path | None = None,
    embedding: HTPEmbedding | None = None,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
    keep_vectors: bool = False,
) -> RunStats:
    """Re-embed the index at ``index_dir`` with a (possibly) new encoder and index kind.

    By default the stored nodes are re-embedded as they are; with ``source`` the documents are
    re-read and re-split (use this when the new model's window differs). ``added`` in the
    returned statistics counts the documents re-embedded. ``keep_vectors`` re-uses the stored
    vectors instead (see :meth:`IndexSession.rebuild_keeping_vectors`); it cannot change the
    encoder.
    """
    settings = settings or load_settings()
    if not FaissVectorStore.exists(index_dir):
        raise IndexNotFoundError(f"no index at {index_dir} to rebuild; create one with htp-index ingest", path=index_dir)
    overrides = {key: value for key, value in (encoder_overrides or {}).items() if value is not None}
    if keep_vectors and (source is not None or overrides):
        raise OptionConflictError("--keep-vectors re-uses the stored vectors, so it cannot change the "
                         "encoder or re-read a source; drop it to re-embed")
    began = time.perf_counter()
    encoder = embedding.encoder if embedding is not None else None
    with IndexSession.open(index_dir, settings, encoder_overrides=overrides, encoder=encoder) as session:
        if keep_vectors:
            # An encoder asked by flag is refused above; one from the settings file or the
            # environment (ambient, as for a query) is said, not silently passed over.
            warn_ignored_encoder_settings(Path(index_dir), session.live_store.encoder, settings,
                                          "its stored vectors are kept as that encoder made them",
                                          "drop --keep-vectors to re-embed with them")
            stats = session.rebuild_keeping_vectors(index_kind)
        else:
            stats = session.rebuild(index_kind=index_kind, source=source, runner=InProcess(progress, on_total))
    stats.seconds = time.perf_counter() - began
    log.info("rebuilt %s as version %s", index_dir, stats.version)
    return stats
