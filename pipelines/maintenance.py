"""Index maintenance a person runs: merge segments, migrate an old layout, verify every byte.

Writers (`compact`, `migrate`, `restore`) take the same writer lock as ingest and rebuild, so
they never race one; `verify` only reads. None of them loads the encoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from indexes import (
    FaissVectorStore,
    HtpIndexError,
    IndexCorruptedError,
    IndexNotFoundError,
    persist,
    verify,
)

from .errors import VersionNotKeptError
from .lock import index_lock
from .settings import Settings, load_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompactStats:
    """What `compact_index` did."""

    merges: int
    segments_before: int
    segments_after: int
    deleted_rows_dropped: int
    version: int


def _open(index_dir: Path, keep_versions: int, version: int | None = None) -> FaissVectorStore:
    if not FaissVectorStore.exists(index_dir):
        raise IndexNotFoundError.at(index_dir)
    return FaissVectorStore.open(index_dir, version=version, use_gpu=False, keep_versions=keep_versions)


def compact_index(
    index_dir: Path, settings: Settings | None = None, *, everything: bool = True
) -> CompactStats:
    """Merge the index's segments and drop deleted rows (all of them with ``everything``,
    otherwise only the merges the policy has due), committing one new version. ``settings``
    (default: loaded as every command loads them) give ``keep_versions`` and
    ``lock_timeout``: the clean-up after the commit keeps as many versions as ingest does."""
    settings = settings or load_settings()
    lock_timeout, keep_versions = settings.lock_timeout, settings.keep_versions
    with index_lock(index_dir, lock_timeout):
        store = _open(index_dir, keep_versions)
        before = store.segment_count
        deleted = store.manifest.tombstones if store.manifest else 0
        try:
            merges = store.compact(everything=everything)
            version = store.persist() if merges else store.version
        except BaseException:
            store.discard_uncommitted()  # a failed commit put its merged segments back in staging
            raise
        if not merges:  # nothing to commit: still remove what a crashed writer left behind
            persist.collect_garbage_now(index_dir, keep_versions)
        after_deleted = store.manifest.tombstones if store.manifest else 0
        return CompactStats(merges, before, store.segment_count, deleted - after_deleted, version)


def restore_index(index_dir: Path, version: int, settings: Settings | None = None) -> int:
    """Make a kept older ``version`` live again (a roll-back, e.g. when the live version's files
    are damaged): commits a new version equal to it; returns the new version's number.

    The live version itself is left as it is (its number returned): a copy of it would change
    nothing, and the oldest kept version, a real restore point, would make room for it."""
    settings = settings or load_settings()
    with index_lock(index_dir, settings.lock_timeout):
        try:
            live = FaissVectorStore.current_version(index_dir)
        except IndexCorruptedError as exc:
            if not persist.is_damaged_pointer(index_dir, exc):
                raise
            # what the damage advice says to do: a kept version made live writes CURRENT anew
            log.warning("%s is damaged; making version %d live writes it anew", exc.path, version)
            live = None
        if live == version:
            return version
        _require_kept(index_dir, version)
        if live is not None and version > live:
            # versions count up and a restore commits a new one, so a folder past the live
            # version is a write killed before its switch: never acknowledged, never served
            raise VersionNotKeptError(
                f"version {version} of {index_dir} was never live: a write that stopped before its switch "
                f"left it, and the next write removes it; the live version is {live}")
        if live is not None and _same_content(index_dir, version, live):
            # a restore asked again after it switched (it was killed, or run twice): another
            # identical version would push a real restore point out of the kept ones
            log.info("version %d of %s already holds version %d's content: nothing to restore", live, index_dir, version)
            return live
        # the version the user rolls back: one a program commits meanwhile (the API takes no
        # lock) is refused, not dropped
        return _open(index_dir, settings.keep_versions, version).restore(over=live)


def _same_content(index_dir: Path, version: int, other: int) -> bool:
    """Whether two versions' manifests name the same segments, deletions, documents and
    settings (all but their number, time and checksum): a restore's copy of a version does."""
    try:
        first, second = (persist.read_manifest(index_dir, v).to_dict() for v in (version, other))
    except HtpIndexError:  # a damaged one is not the same; the restore reads and reports it
        return False
    own = ("version", "created_at", "checksum")
    return {k: v for k, v in first.items() if k not in own} == {k: v for k, v in second.items() if k not in own}


def migrate_index(index_dir: Path, settings: Settings | None = None) -> int | None:
    """Rewrite an index of the format-1 layout as segments; returns the new version, or None
    when the index already has segments."""
    settings = settings or load_settings()
    with index_lock(index_dir, settings.lock_timeout):
        manifest = FaissVectorStore.read_manifest(index_dir)
        if manifest.format_version >= 2:
            return None
        return _open(index_dir, settings.keep_versions).migrate()


def verify_index(index_dir: Path, version: int | None = None) -> dict[str, int]:
    """Hash every file the live version (or ``version``) names against its manifest."""
    if version is not None and FaissVectorStore.exists(index_dir) and version != persist.current_version(index_dir):
        _require_kept(index_dir, version)  # not "corrupted: the version directory is missing"
    return verify(index_dir, version)


def _require_kept(index_dir: Path, version: int) -> None:
    kept = persist.list_versions(index_dir)
    if version not in kept:
        # it was reported as a corrupted index ("the version directory is missing")
        raise VersionNotKeptError(
            f"the index at {index_dir} does not keep version {version}; it keeps "
            f"{', '.join(map(str, kept)) or 'none'} (settings' keep_versions: the newest are kept; a restore "
            "of the oldest kept version pushes it out, so the live version may already hold its content)")
