"""Versioned index directories: write a new version beside the live one, then switch a pointer.

Layout of one index directory::

    DIR/
      CURRENT                      # "v000007\\n": the live version
      .lock                        # filelock serialising writers' commits
      versions/
        v000006/ ...               # older versions kept for rollback (keep_versions)
        v000007/
          index.faiss              # FAISS native format (CPU index)
          docstore.sqlite          # SQLite: nodes, docs, state
          manifest.json            # encoder, dim, metric, kind, counts, sha256 of both files
        .tmp-<pid>@<host>~<random>/  # a version being written (never read)

A version is written into a temporary directory (files fsynced), renamed into ``versions/``
and only then made live by rewriting ``CURRENT`` (temp file + fsync + ``os.replace``). A crash
at any moment leaves ``CURRENT`` naming a complete version; the live version is never touched.
Only FAISS's own format, JSON and SQLite are written: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock
from pydantic import ValidationError

from .errors import HtpIndexError, IndexCorruptedError, IndexNotFoundError
from .spec import FORMAT_VERSION, FileRecord, Manifest

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
LOCK_FILE = ".lock"
INDEX_FILE = "index.faiss"
DOCSTORE_FILE = "docstore.sqlite"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
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
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexCorruptedError.for_file(pointer, f"cannot read it ({exc})") from exc
    match = _VERSION_RE.match(text)
    if not match:
        raise IndexCorruptedError.for_file(
            pointer, f"it should name a version like v000001, not {text!r}"
        )
    return int(match.group(1))


def exists(root: str | Path) -> bool:
    """Whether `root` holds an index (a CURRENT pointer)."""
    return (Path(root) / CURRENT_FILE).is_file()


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
        raise IndexCorruptedError.for_file(path, f"it is not valid JSON ({exc})") from exc
    if isinstance(raw, dict) and int(raw.get("format_version", 0)) > FORMAT_VERSION:
        raise HtpIndexError(
            f"{path} has format {raw['format_version']}, newer than this htp-index reads "
            f"({FORMAT_VERSION}); upgrade htp-index"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise IndexCorruptedError.for_file(
            path, f"fields are missing or invalid ({exc.errors()[0]})"
        ) from exc
    if manifest.checksum != manifest.body_checksum():
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
    """Size and checksum of a written file."""
    return FileRecord(sha256=sha256_file(path), bytes=path.stat().st_size)


def verify_files(vdir: Path, manifest: Manifest) -> None:
    """Check every file the manifest lists; raise IndexCorruptedError naming the first bad one."""
    for name, record in sorted(manifest.files.items()):
        path = vdir / name
        if not path.is_file():
            raise IndexCorruptedError.for_file(path, "the file is missing")
        size = path.stat().st_size
        if size != record.bytes:
            raise IndexCorruptedError.for_file(
                path, f"it has {size} bytes but the manifest recorded {record.bytes} (truncated?)"
            )
        actual = sha256_file(path)
        if actual != record.sha256:
            raise IndexCorruptedError.for_file(
                path, f"sha256 {actual[:12]}… differs from the manifest's {record.sha256[:12]}…"
            )


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories make renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class VersionWriter:
    """Context manager that stages a new version and commits it atomically.

    Write the data files into `path`, then call `commit` with the manifest. Leaving the block
    without committing (an exception) deletes the staging directory; CURRENT is untouched.
    """

    def __init__(self, root: str | Path, keep_versions: int = 3) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.root = Path(root)
        self.keep_versions = keep_versions
        self.path: Path = Path()
        self.version: int | None = None
        self._published: tuple[Path, int] | None = None
        self.manifest: Manifest | None = None

    def __enter__(self) -> VersionWriter:
        base = self.root / VERSIONS_DIR
        base.mkdir(parents=True, exist_ok=True)
        # The writer's pid and host in the name let a later writer tell a crashed writer's
        # leftovers (pid gone) from another writer's work in progress.
        owner = f"{TMP_PREFIX}{os.getpid()}@{socket.gethostname()}~"
        self.path = Path(tempfile.mkdtemp(prefix=owner, dir=base))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.version is None:
            shutil.rmtree(self.path, ignore_errors=True)
            if self._published is not None:
                # Renamed into place but never made live: an orphan nobody will ever open.
                published, number = self._published
                try:
                    live = current_version(self.root)
                except HtpIndexError:
                    live = None
                if live != number:
                    shutil.rmtree(published, ignore_errors=True)

    def commit(self, manifest: Manifest) -> int:
        """Number, seal and publish the staged version; returns its number."""
        names = set(manifest.files)
        for name in names:
            fsync_path(self.path / name)
        with FileLock(str(self.root / LOCK_FILE)):
            live = current_version(self.root) or 0
            version = max([live, *list_versions(self.root)]) + 1
            sealed = manifest.model_copy(update={"version": version}).sealed()
            _write_text_durably(
                self.path / MANIFEST_FILE, json.dumps(sealed.model_dump(mode="json"), indent=2)
            )
            fsync_path(self.path)
            final = version_dir(self.root, version)
            os.rename(self.path, final)
            self._published = (final, version)
            fsync_path(final.parent)
            switch_current(self.root, version)
            self.version = version
            self.manifest = sealed
            self.path = final
            try:
                collect_garbage(self.root, self.keep_versions)
            except OSError:  # the new version is live; old ones go at the next commit
                logger.warning("could not remove old versions of %s", self.root, exc_info=True)
        return version


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


def collect_garbage(root: Path, keep_versions: int) -> list[int]:
    """Delete versions older than the newest `keep_versions` (never the live one)."""
    live = current_version(root)
    versions = list_versions(root)
    doomed = [v for v in versions[:-keep_versions] if v != live] if keep_versions else []
    for version in doomed:
        shutil.rmtree(version_dir(root, version), ignore_errors=True)
    base = root / VERSIONS_DIR
    now = time.time()
    for tmp in base.glob(f"{TMP_PREFIX}*"):
        # Staging directories of dead writers (same host, pid gone) or old ones are leftovers
        # of crashes; recent ones of live writers are work in progress.
        try:
            if _writer_is_dead(tmp.name) or now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass
    if doomed:
        logger.info("removed old versions %s of %s", doomed, root)
    return doomed
