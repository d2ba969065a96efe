"""The writer's lock on an index directory: one ingest or rebuild at a time.

Readers never take it: they read the last persisted version, which writers never modify.
The holder writes who it is beside the lock (process, host, command, since when), so a writer
that has to wait says whom it waits for, and one that gives up names it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from indexes.errors import IndexNotFoundError
from pipelines.errors import IndexBusyError, IndexNotWritableError

log = logging.getLogger(__name__)

LOCK_NAME = ".ingest.lock"
HOLDER_NAME = ".ingest.lock.holder"


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
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError) as exc:  # a file where a folder above it must be
        blocker = next((p for p in index_dir.parents if p.exists() and not p.is_dir()), exc.filename)
        raise IndexNotFoundError(f"cannot make the index folder {index_dir}: {blocker} is a file, not a folder",
                                 path=index_dir) from exc
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        raise IndexNotWritableError(
            f"cannot make the index folder {index_dir}: {exc.strerror} ({exc.filename}); choose an "
            "--index folder this user can write") from exc
    lock = FileLock(str(index_dir / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting up to %.0f s for the writer lock on %s, held by %s", timeout, index_dir,
                 lock_holder(index_dir))
        try:
            lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise IndexBusyError(
                f"another writer holds {index_dir}: {lock_holder(index_dir)} (waited {timeout:.0f} s for "
                f"{index_dir / LOCK_NAME}); try again when it has finished"
            ) from exc
    except OSError as exc:  # after Timeout, itself an OSError
        # A bare "[Errno 13] Permission denied: '.../.ingest.lock'" (exit 1) was all it said.
        if exc.errno not in _UNWRITABLE:
            raise
        raise _not_writable(index_dir, exc) from exc
    try:
        _write_holder(index_dir)
        yield
    finally:
        with suppress(OSError):
            (index_dir / HOLDER_NAME).unlink()
        lock.release()


#: What creating the lock file raises in a folder this user cannot write.
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _not_writable(index_dir: Path, exc: OSError) -> IndexNotWritableError:
    return IndexNotWritableError(
        f"cannot take the writer lock on {index_dir}: the index folder is not writable by this user "
        f"({exc.strerror}: {exc.filename or index_dir / LOCK_NAME}); writing to it needs a user who "
        "may write the folder, or a copy of the index elsewhere (queries only read it)")


def check_writable(index_dir: Path) -> None:
    """Raise :func:`index_lock`'s :class:`IndexNotWritableError` for an existing index folder
    whose lock file this user cannot open, before a writer loads a model and shows progress
    (a rebuild drew its bar, then failed on the lock). Takes no lock."""
    if not index_dir.is_dir():
        return
    try:
        with open(index_dir / LOCK_NAME, "a"):  # what FileLock opens; another's flock is no matter
            pass
    except OSError as exc:
        if exc.errno in _UNWRITABLE:
            raise _not_writable(index_dir, exc) from exc


def lock_holder(index_dir: Path) -> str:
    """Who holds the writer lock, as its holder recorded it ("an unknown process" when it did
    not: an htp-index from before, or one that has only just taken the lock)."""
    try:
        holder = json.loads((index_dir / HOLDER_NAME).read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"process {holder['pid']} on {holder['host']} ({holder['command']}) since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def _write_holder(index_dir: Path) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "python"}
    # Written in place, not renamed in: only the holder writes it, a reader that catches it
    # half-written says "an unknown process", and a rename here would be one more step among
    # the commit's own (the crash tests kill at the first os.replace, the switch of CURRENT).
    with suppress(OSError):  # who holds the lock is a courtesy; the lock itself is what serialises
        (index_dir / HOLDER_NAME).write_text(json.dumps(holder), encoding="utf-8")
