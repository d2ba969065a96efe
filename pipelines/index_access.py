"""Opening an index together with the encoder that built it, and the writer's lock.

An index records its encoder's identity in its manifest. Writers and readers load exactly that
encoder, so `htp-index ingest docs --index idx` keeps working on an index built with other
settings than today's defaults; asking for a *different* encoder explicitly is refused with a
message pointing to `rebuild`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from htp_embed import EncoderConfig, config_from_identity
from htp_embed.llama_index import HTPEmbedding
from indexes import FaissVectorStore
from pipelines.settings import Settings

log = logging.getLogger(__name__)

LOCK_NAME = ".ingest.lock"


class IndexBusyError(RuntimeError):
    """Another ingest or rebuild holds the index's lock."""


class IndexKindMismatchError(ValueError):
    """An option asks an existing index for a kind it was not built as (only rebuild changes it)."""


@contextmanager
def index_lock(index_dir: Path, timeout: float) -> Iterator[None]:
    """Exclusive writer lock on an index directory (waits up to ``timeout`` seconds).

    Readers never take it: they read the last persisted version, which writers never modify.
    """
    index_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(index_dir / LOCK_NAME))
    try:
        lock.acquire(timeout=timeout)
    except Timeout as exc:
        raise IndexBusyError(
            f"another ingest or rebuild is writing {index_dir} (waited {timeout:.0f} s for "
            f"{index_dir / LOCK_NAME}); try again when it has finished"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def encoder_settings_for(index_dir: Path, settings: Settings) -> EncoderConfig:
    """The encoder to use on an existing index: the one recorded in its manifest, with any
    setting given explicitly (file, environment, option) applied on top; if that changes the
    encoder, opening the store refuses it and says to rebuild."""
    if not FaissVectorStore.exists(index_dir):
        return settings.encoder
    identity = FaissVectorStore.read_manifest(index_dir).encoder
    recorded = config_from_identity(identity, **settings.runtime_encoder_settings())
    return EncoderConfig(**{**recorded.model_dump(), **settings.explicit_encoder_settings()})


def load_embedding(
    index_dir: Path, settings: Settings, embedding: HTPEmbedding | None = None
) -> tuple[HTPEmbedding, Settings]:
    """The embedding model for ``index_dir`` (loaded unless given) and the settings it implies."""
    config = encoder_settings_for(index_dir, settings)
    settings = settings.model_copy(update={"encoder": config})
    if embedding is None:
        embedding = HTPEmbedding(config=config)
    return embedding, settings


def open_or_create_store(index_dir: Path, settings: Settings, embedding: HTPEmbedding) -> FaissVectorStore:
    """The index at ``index_dir`` (refusing a different encoder), or a new empty one."""
    placement = settings.faiss_placement()
    if FaissVectorStore.exists(index_dir):
        store = FaissVectorStore.open(
            index_dir, expected_encoder=embedding.identity(), keep_versions=settings.keep_versions, **placement
        )
        if "index_kind" in settings.model_fields_set and settings.index_kind != store.index_kind:
            raise IndexKindMismatchError(
                f"the index at {index_dir} is a {store.index_kind!r} index; to make it "
                f"{settings.index_kind!r}, run `htp-index rebuild --index {index_dir} --index-kind "
                f"{settings.index_kind} --keep-vectors` (no re-embedding)"
            )
        return store
    log.info("creating a new %s index at %s", settings.index_kind, index_dir)
    return FaissVectorStore.create(
        index_dir, dim=embedding.dim, encoder=embedding.identity(), metric=settings.metric,
        index_kind=settings.index_kind, keep_versions=settings.keep_versions, **placement,
    )
