"""The writer's lock on an index directory: one ingest or rebuild at a time.

Readers never take it: they read the last persisted version, which writers never modify.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from indexes.errors import IndexNotFoundError
from pipelines.errors import IndexBusyError

LOCK_NAME = ".ingest.lock"


@contextmanager
def index_lock(index_dir: Path, timeout: float, *, create: bool = False) -> Iterator[None]:
    """Exclusive writer lock on ``index_dir`` (waits up to ``timeout`` seconds). Only a writer
    that may start an index (``create``: ingest) makes the folder: compact, restore or migrate
    given a mistyped path made an empty folder holding only the lock file, where they should say
    there is no index there."""
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexNotFoundError(f"{index_dir} is a file, not an index folder", path=index_dir)
    if not create and not index_dir.is_dir():
        raise IndexNotFoundError.at(index_dir)
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
