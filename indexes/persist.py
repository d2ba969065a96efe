"""The commit point of an index: versions, the CURRENT pointer, and what they may delete.

Layout of one index directory::

    DIR/
      CURRENT                      # "v000007\\n": the live version
      .lock                        # filelock serialising commits
      versions/
        v000006/manifest.json      # older versions kept for rollback (keep_versions)
        v000007/manifest.json      # names the version's segments, tombstones and docs log
        v000007/correction.json    # the version's vector correction (small, copied)
        .tmp-<pid>@<host>~<random>/  # a version being written (never read)
      segments/seg-…/              # immutable segments shared by the versions naming them
      docs/v…-base|delta-….json    # the document-hash log (`indexes.doclog`)

A commit (`commit`), under the lock: publishes the new segments (rename from their staging
folders), writes the changed tombstone files and a docs delta, stages the manifest in a
temporary directory, renames it into ``versions/``, and only then makes it live by rewriting
``CURRENT`` (temp file + fsync + ``os.replace``, the one ``os.replace`` of a commit). A crash at
any moment leaves ``CURRENT`` naming a complete version; nothing a live version names is ever
rewritten. After the switch, `collect_garbage` removes versions beyond ``keep_versions`` and
every segment, tombstone and docs file no kept version names, so space follows the kept
versions and a crash's leftovers go at the next commit.

Version directories of the format-1 layout (``index.faiss`` + ``docstore.sqlite``, a full copy
each) are read by `indexes.store` to migrate them and collected like any other version.
Only FAISS's own format, JSON, numpy's ``.npy`` and SQLite are written: nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import ValidationError

from .doclog import DOCS_DIR
from .errors import HtpIndexError, IndexConflictError, IndexCorruptedError, IndexNotFoundError
from .segments import (
    DELETES_PREFIX,
    SEGMENTS_DIR,
    TMP_PREFIX,
    fsync_path,
    make_shared_dir,
    segments_dir,
    staging_prefix,
)
from .spec import FORMAT_VERSION, OPTIONAL_FIELDS, FileRecord, Manifest, NamedFile

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
LOCK_FILE = ".lock"
INDEX_FILE = "index.faiss"
DOCSTORE_FILE = "docstore.sqlite"
MANIFEST_FILE = "manifest.json"
CORRECTION_NAME = "correction.json"
STALE_TMP_SECONDS = 3600
_VERSION_RE = re.compile(r"^v(\d{6,})$")


def version_name(version: int) -> str:
    """Directory name of a version number (``v000007``)."""
    return f"v{version:06d}"


def version_dir(root: str | Path, version: int) -> Path:
    """Path of one version's directory."""
    return Path(root) / VERSIONS_DIR / version_name(version)


def list_versions(root: str | Path) -> list[int]:
    """Version numbers present on disk, ascending."""
    base = Path(root) / VERSIONS_DIR
    if not base.is_dir():
        return []
    found = (_VERSION_RE.match(p.name) for p in base.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def current_version(root: str | Path) -> int | None:
    """The live version number, or None when the directory holds no index."""
    pointer = Path(root) / CURRENT_FILE
    try:
        text = pointer.read_text(encoding="ascii").strip()
    except (FileNotFoundError, NotADirectoryError):  # no folder, or a file where one should be
        kept = _versions_with_manifest(root)
        if kept:
            # a pointer lost with versions kept is damage a restore mends, as an empty one is: the
            # advice to ingest afresh dropped the kept versions
            raise IndexCorruptedError(_missing_pointer_advice(root, kept), path=pointer) from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexCorruptedError.unreadable(pointer, f"cannot read it ({exc})", exc) from exc
    match = _VERSION_RE.match(text)
    if not match:
        raise IndexCorruptedError.for_file(
            pointer, f"it should name a version like v000001, not {text!r}"
        )
    return int(match.group(1))


def _versions_with_manifest(root: str | Path) -> list[int]:
    """Version folders of ``root`` that hold a manifest file, ascending."""
    return [v for v in list_versions(root) if (version_dir(root, v) / MANIFEST_FILE).is_file()]


def _missing_pointer_advice(root: str | Path, kept: list[int]) -> str:
    """What to say of a folder whose CURRENT is gone while versions are kept: restore the newest
    one whose manifest reads (not a fresh ingest, which would start over those versions)."""
    intact = []
    for version in kept:
        try:
            read_manifest(root, version)
        except HtpIndexError:
            continue
        intact.append(version)
    newest = (intact or kept)[-1]
    return (f"CURRENT is missing from {root} but versions {', '.join(map(str, kept))} exist; "
            f"`htp-index restore --index {root} --version {newest}` makes one live")


def is_damaged_pointer(root: str | Path, error: IndexCorruptedError) -> bool:
    """Whether ``error`` is about ``CURRENT`` itself: then no version is known to be live, and
    only making a kept version live (a restore) can mend the index."""
    return error.path == Path(root) / CURRENT_FILE


def manifest_stamp(root: str | Path, version: int) -> tuple[int, int] | None:
    """(inode, mtime) of a version's manifest file, None when it is gone: tells an index
    removed and created again (which starts at version 1 again) from the one a reader loaded."""
    try:
        stat = (version_dir(root, version) / MANIFEST_FILE).stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def exists(root: str | Path) -> bool:
    """Whether `root` holds an index: a CURRENT pointer, or kept versions whose pointer is lost
    (opening one says how to restore it; creating an index over them is refused)."""
    return (Path(root) / CURRENT_FILE).is_file() or bool(_versions_with_manifest(root))


def _sealed_as_written(raw: Any) -> bool:
    """Whether a manifest's JSON object matches its own checksum, by the rule every release so
    far has sealed with (all fields but the checksum and the optional ones left null)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("checksum"), str):
        return False
    body = {key: value for key, value in raw.items()
            if key != "checksum" and not (key in OPTIONAL_FIELDS and value is None)}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest() == raw["checksum"]


def read_manifest(root: str | Path, version: int | None = None) -> Manifest:
    """The manifest of the live version (or of `version`), its own checksum verified."""
    root = Path(root)
    if version is None:
        version = current_version(root)
        if version is None:
            raise IndexNotFoundError.at(root)
    vdir = version_dir(root, version)
    path = vdir / MANIFEST_FILE
    if not vdir.is_dir():
        raise IndexCorruptedError.for_file(vdir, "the version directory is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IndexCorruptedError.for_file(path, "the file is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorruptedError.unreadable(path, f"it is not valid JSON ({exc})", exc) from exc
    if isinstance(raw, dict) and int(raw.get("format_version", 0)) > FORMAT_VERSION:
        raise HtpIndexError(
            f"{path} has format {raw['format_version']}, newer than this htp-index reads "
            f"({FORMAT_VERSION}); upgrade htp-index"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        unknown = [".".join(str(part) for part in error["loc"]) for error in exc.errors()]
        if all(error["type"] == "extra_forbidden" for error in exc.errors()) and _sealed_as_written(raw):
            # Intact, with fields added since this release: a newer htp-index wrote it (such a
            # file was called corrupted, with advice to restore, which undoes the newer writes).
            raise HtpIndexError(
                f"{path} was written by a newer htp-index (its fields {', '.join(unknown)} are unknown "
                "to this one); upgrade htp-index to open it. The index is not damaged"
            ) from exc
        raise IndexCorruptedError.for_file(
            path, f"fields are missing or invalid ({exc.errors()[0]})"
        ) from exc
    if manifest.checksum != manifest.body_checksum(written=raw):
        raise IndexCorruptedError.for_file(path, "its checksum does not match its content")
    if manifest.version != version:
        raise IndexCorruptedError.for_file(
            path, f"it records version {manifest.version}, not {version}"
        )
    return manifest


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> FileRecord:
    """Size and checksum of a written file (computed once, when it is written)."""
    return FileRecord(sha256=sha256_file(path), bytes=path.stat().st_size)


def check_file(path: Path, record: FileRecord | NamedFile) -> None:
    """Size and sha256 of one file against its record; `IndexCorruptedError` naming it. The
    small files a commit carries into the next version (correction, tombstones, document log)
    are checked when read, or the copy would get a fresh checksum and `verify` pass the damage."""
    if not path.is_file():
        raise IndexCorruptedError.for_file(path, "the file is missing")
    size = path.stat().st_size
    if size != record.bytes:
        raise IndexCorruptedError.for_file(
            path, f"it has {size} bytes but the manifest recorded {record.bytes} (truncated?)"
        )
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise IndexCorruptedError.unreadable(path, f"unreadable ({exc})", exc) from exc
    if actual != record.sha256:
        raise IndexCorruptedError.for_file(
            path, f"sha256 {actual[:12]}… differs from the manifest's {record.sha256[:12]}…"
        )


def check_segment_files(folder: Path, files: Mapping[str, FileRecord]) -> None:
    """Hash every file of a segment against its record; raise IndexCorruptedError naming the
    first bad one. A merge runs this on what it reads, as Lucene checks integrity on merge:
    the merged segment gets fresh checksums, so damage it copied would pass `verify` after.
    A file already unlinked (a later version's clean-up; read through the handle this process
    holds) cannot be hashed by name and is passed over."""
    for name, record in sorted(files.items()):
        if (folder / name).exists():
            check_file(folder / name, record)


def verify_files(vdir: Path, manifest: Manifest) -> None:
    """Check every file a format-1 version lists; raise IndexCorruptedError naming the first bad one."""
    for name, record in sorted(manifest.files.items()):
        check_file(vdir / name, record)


def verify(root: str | Path, version: int | None = None) -> dict[str, int]:
    """Read and hash every file a version names (``htp-index verify``); returns what was checked.

    Opening checks only sizes; this is the full check of the bytes against the checksums the
    manifest recorded when each file was written. Raises `IndexCorruptedError` naming the file.
    """
    root = Path(root)
    manifest = read_manifest(root, version)
    vdir = version_dir(root, manifest.version)
    checked = {"files": 0, "bytes": 0}

    def check(path: Path, record: FileRecord | NamedFile) -> None:
        check_file(path, record)
        checked["files"] += 1
        checked["bytes"] += record.bytes

    for name, record in sorted(manifest.files.items()):
        check(vdir / name, record)
    for segment in manifest.segments:
        folder = segments_dir(root) / segment.name
        for name, record in sorted(segment.files.items()):
            check(folder / name, record)
        if segment.deletes is not None:
            check(root / segment.deletes.path, segment.deletes)
    for entry in manifest.docs:
        check(root / entry.path, entry)
    if manifest.correction is not None:
        check(vdir / CORRECTION_NAME, manifest.correction)
    return checked


def _write_text_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def switch_current(root: Path, version: int) -> None:
    """Atomically point CURRENT at `version` (temp file, fsync, os.replace, fsync dir)."""
    tmp = root / f"{CURRENT_FILE}.tmp"
    _write_text_durably(tmp, version_name(version) + "\n")
    os.replace(tmp, root / CURRENT_FILE)
    fsync_path(root)


def commit(
    root: Path,
    *,
    publish: Sequence[tuple[Path, str]],
    build: Callable[[int], Manifest],
    correction_text: str | None,
    keep_versions: int,
    expected_live: int | None,
) -> Manifest:
    """Make a new version live; returns its sealed manifest.

    ``publish`` lists (staging folder, segment name) of the segments this version adds;
    ``build(version)`` writes the version's small shared files (tombstones, docs delta) and
    returns its manifest; ``expected_live`` is the version the caller's changes were made
    against: if another writer committed since, `IndexConflictError` is raised before anything
    is written, so no acknowledged change is ever overwritten (None: replace whatever is live).
    """
    if keep_versions < 1:
        raise ValueError("keep_versions must be at least 1")
    root = Path(root)
    (root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / LOCK_FILE)):
        try:
            live = current_version(root)
        except IndexCorruptedError as exc:
            if expected_live is not None or not is_damaged_pointer(root, exc):
                raise
            live = None  # replacing whatever is live (a restore): the pointer is written anew
        if expected_live is not None and live != expected_live:
            raise IndexConflictError.overtaken(root, expected_live, live)
        listed = list_versions(root)
        version = max([live or 0, *listed]) + 1  # never reuse a number, not even an orphan's
        for orphan in [v for v in listed if live is not None and v > live]:
            # renamed in by a writer killed before its CURRENT switch: never live, never kept
            # (it used to take the place of the real previous version among the kept ones)
            shutil.rmtree(version_dir(root, orphan), ignore_errors=True)
        published: list[tuple[Path, Path]] = []
        staged: Path | None = None
        switched = False
        try:
            for staging, name in publish:
                final = segments_dir(root) / name
                os.rename(staging, final)
                published.append((staging, final))
            if published:
                fsync_path(segments_dir(root))
            manifest = build(version)
            staged = make_shared_dir(root / VERSIONS_DIR, staging_prefix())
            if correction_text is not None:
                _write_text_durably(staged / CORRECTION_NAME, correction_text)
                manifest = manifest.model_copy(
                    update={"correction": file_record(staged / CORRECTION_NAME)}
                )
            sealed = manifest.model_copy(update={"version": version}).sealed()
            _require_named_files(root, sealed)
            _write_text_durably(
                staged / MANIFEST_FILE, json.dumps(sealed.to_dict(), indent=2)
            )
            fsync_path(staged)
            final_vdir = version_dir(root, version)
            os.rename(staged, final_vdir)
            staged = final_vdir
            fsync_path(final_vdir.parent)
            switch_current(root, version)
            switched = True
        finally:
            if not switched:
                # Put everything back as it was: the segments in their staging folders (the
                # caller may retry), no version directory that CURRENT does not name.
                if staged is not None:
                    shutil.rmtree(staged, ignore_errors=True)
                for staging, final in reversed(published):
                    with contextlib.suppress(OSError):
                        os.rename(final, staging)
        try:
            collect_garbage(root, keep_versions)
        except OSError:  # the new version is live; leftovers go at the next commit
            logger.warning("could not remove old files of %s", root, exc_info=True)
    return sealed


def _require_named_files(root: Path, manifest: Manifest) -> None:
    """Refuse to make live a version whose segments, tombstones or docs files are gone (a
    store opened at an old version and restored after later commits collected its files
    used to switch to a version nothing could open)."""
    missing = [f"{SEGMENTS_DIR}/{segment.name}" for segment in manifest.segments
               if not (segments_dir(root) / segment.name).is_dir()]
    missing += [entry.path for segment in manifest.segments if segment.deletes is not None
                for entry in [segment.deletes] if not (root / entry.path).is_file()]
    missing += [entry.path for entry in manifest.docs if not (root / entry.path).is_file()]
    if missing:
        raise IndexConflictError(
            f"{root}: the version being committed names files that are gone ({', '.join(missing[:3])}"
            f"{' …' if len(missing) > 3 else ''}), collected by commits made after the version this "
            "store opened; nothing was changed. Open the index again (at a version that is still "
            "kept) and retry", path=root,
        )


def collect_garbage_now(root: str | Path, keep_versions: int) -> list[int]:
    """`collect_garbage` under the commit lock, for a maintenance run that commits nothing
    (a crash's leftovers must not wait for the next write)."""
    root = Path(root)
    with FileLock(str(root / LOCK_FILE)):
        return collect_garbage(root, keep_versions)


_OWNER_RE = re.compile(re.escape(TMP_PREFIX) + r"(\d+)@(.+)~")


def _writer_is_dead(name: str) -> bool:
    """Whether the staging directory ``name`` belongs to a process of this host that is gone."""
    match = _OWNER_RE.match(name)
    if match is None or match.group(2) != socket.gethostname():
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _leftover(path: Path, now: float) -> bool:
    """Whether a staging folder is a crashed writer's (pid gone) or too old to be in progress."""
    try:
        return _writer_is_dead(path.name) or now - path.stat().st_mtime > STALE_TMP_SECONDS
    except FileNotFoundError:
        return False


def collect_garbage(root: Path, keep_versions: int) -> list[int]:
    """Delete versions older than the newest ``keep_versions`` (never the live one), then every
    segment, tombstone file and docs file that no remaining version names. Call under the lock."""
    root = Path(root)
    live = current_version(root)
    versions = list_versions(root)
    # A version above the live one was never switched to (a writer killed between renaming
    # it in and the CURRENT switch): not one of the kept ones, and deleted with the old.
    switched = [v for v in versions if live is None or v <= live]
    kept = set(switched[-keep_versions:]) | ({live} if live is not None else set())
    doomed = [v for v in versions if v not in kept]
    for version in doomed:
        shutil.rmtree(version_dir(root, version), ignore_errors=True)
    now = time.time()
    for tmp in (root / VERSIONS_DIR).glob(f"{TMP_PREFIX}*"):
        if _leftover(tmp, now):
            shutil.rmtree(tmp, ignore_errors=True)
    named = _named_files(root, sorted(kept))
    if named is not None:
        _collect_shared(root, *named, now=now)
    if doomed:
        logger.info("removed old versions %s of %s", doomed, root)
    return doomed


def _named_files(root: Path, versions: list[int]) -> tuple[set[str], set[str]] | None:
    """(segment names, shared file paths) the given versions name; None if one is unreadable,
    in which case nothing shared may be deleted."""
    segments: set[str] = set()
    files: set[str] = set()
    for version in versions:
        try:
            manifest = read_manifest(root, version)
        except HtpIndexError:
            logger.warning("version %s of %s is unreadable: keeping every segment", version, root)
            return None
        for segment in manifest.segments:
            segments.add(segment.name)
            if segment.deletes is not None:
                files.add(segment.deletes.path)
        files.update(entry.path for entry in manifest.docs)
    return segments, files


def _collect_shared(root: Path, segments: set[str], files: set[str], *, now: float) -> None:
    base = segments_dir(root)
    if base.is_dir():
        for folder in base.iterdir():
            if folder.name.startswith(TMP_PREFIX):
                if _leftover(folder, now):
                    shutil.rmtree(folder, ignore_errors=True)
            elif folder.name not in segments:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for path in folder.glob(f"{DELETES_PREFIX}*"):
                    if f"{SEGMENTS_DIR}/{folder.name}/{path.name}" not in files:
                        path.unlink(missing_ok=True)
                for path in folder.glob(f".{DELETES_PREFIX}*"):
                    path.unlink(missing_ok=True)
    docs = root / DOCS_DIR
    if docs.is_dir():
        for path in docs.iterdir():
            if f"{DOCS_DIR}/{path.name}" not in files:
                path.unlink(missing_ok=True)
