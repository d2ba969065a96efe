"""Errors raised by the index layer.

Every message names the thing that is wrong and what to do about it, so that the command line
and the HTTP server can show it as is instead of a traceback. Each class takes a plain message
like any exception; the ``at``/``for_file``/``between``/``too_few`` builders write the standard
messages and fill the structured attributes.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from tokenize import TokenError
from typing import Any

#: What ``np.load`` raises on a damaged ``.npy`` file: its header is a Python literal parsed with
#: ``tokenize``/``ast``, so bytes flipped there raise ``TokenError`` or ``SyntaxError``, neither a
#: ValueError (a query answered "('EOF in multi-line statement', (2, 0))" naming no file).
UNREADABLE_ARRAY: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, TokenError, EOFError)

class HtpIndexError(Exception):
    """Base class of every error raised by `indexes`."""


class IndexNotFoundError(HtpIndexError, FileNotFoundError):
    """No index (no ``CURRENT`` pointer) exists at the given directory."""

    #: Made by :meth:`at`: nothing at ``path`` is an index, so a caller may say how it creates one
    #: (the command line says ``htp-index ingest``, not the Python API this message names first).
    nothing_there: bool = False

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    @classmethod
    def at(cls, path: str | Path) -> IndexNotFoundError:
        """The standard error for a directory without an index."""
        error = cls(
            f"no index at {path} (no CURRENT file); create one with "
            f"FaissVectorStore.create(...) or `htp-index ingest SOURCE --index {path}`",
            path=path,
        )
        error.nothing_there = True
        return error


class IndexExistsError(HtpIndexError, FileExistsError):
    """``create`` was asked to bind a directory that already holds an index."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    @classmethod
    def at(cls, path: str | Path) -> IndexExistsError:
        """The standard error for creating over an existing index."""
        return cls(
            f"an index already exists at {path}; open it with FaissVectorStore.open(...), "
            "or pass overwrite=True to start a new, empty version there",
            path=path,
        )


class IndexCorruptedError(HtpIndexError):
    """A file of a persisted version is missing, truncated or fails its checksum."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    @classmethod
    def for_file(cls, path: str | Path, problem: str) -> IndexCorruptedError:
        """The standard error naming the damaged file and the way out, with the commands
        spelled for the index that holds it (the service and apps show the message as it is)."""
        return cls(f"{path} is corrupted: {problem}. {damage_advice(_index_dir_of(Path(path)))}", path=path)

    @classmethod
    def unreadable(cls, path: str | Path, problem: str, exc: BaseException) -> HtpIndexError:
        """`for_file`, unless the system refused the read for want of file descriptors or
        memory: that says nothing of the file, and the advice to restore a backup or an older
        version would undo a healthy index (``ulimit -n 32`` made every segment "corrupted")."""
        limit = system_limit(exc)
        if limit is not None:
            return SystemLimitError(f"could not read {path}: {limit}; the index is not damaged, "
                                    "run the command again once the limit is raised", path=path)
        return cls.for_file(path, problem)


def system_limit(exc: BaseException) -> str | None:
    """What to do when ``exc`` is the system refusing a resource (file descriptors, memory), as
    an errno or, from FAISS and SQLite, as text; None for any other error."""
    return _SYSTEM_LIMITS.get(getattr(exc, "errno", None)) or next(
        (advice for text, advice in _SYSTEM_LIMIT_TEXTS if text in str(exc)), None)


class SystemLimitError(HtpIndexError, OSError):
    """A file of the index could not be read because the process ran out of a system resource
    (open files, memory); the index itself is intact and a retry within a higher limit works."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


_OPEN_FILES = ("the process may open no more files (raise `ulimit -n`: each segment of an index keeps a "
               "few files open)")
_SYSTEM_LIMITS = {errno.EMFILE: _OPEN_FILES, errno.ENFILE: "the system may open no more files",
                  errno.ENOMEM: "out of memory"}
# FAISS and SQLite report them as text, without an errno
_SYSTEM_LIMIT_TEXTS = ((os.strerror(errno.EMFILE), _OPEN_FILES), (os.strerror(errno.ENOMEM), "out of memory"))


def _index_dir_of(path: Path) -> Path | None:
    """The index directory holding ``path``: the nearest folder (``path`` itself included) with
    a ``CURRENT`` pointer or a ``versions`` folder (persist's names; a legacy index has both)."""
    for folder in (path, *path.parents):
        if (folder / "CURRENT").is_file() or (folder / "versions").is_dir():
            return folder
    return None


#: What to do about a damaged file, wherever one is reported. Not `htp-index rebuild`, which the
#: message used to name: it reads the live version first, so it fails on the same file.
DAMAGE_ADVICE = (
    "Put the file back from a backup; or make a kept older version that does not name it live "
    "again with `htp-index restore --index PATH --version N` (`htp-index verify --index PATH "
    "--version N` checks one; versions share unchanged segments); or ingest the sources into a "
    "new index directory"
)


def damage_advice(index_dir: str | Path | None) -> str:
    """:data:`DAMAGE_ADVICE` with the commands naming ``index_dir`` (``PATH`` when unknown)."""
    return DAMAGE_ADVICE if index_dir is None else DAMAGE_ADVICE.replace("PATH", str(index_dir))


class IndexPathTooLongError(HtpIndexError, ValueError):
    """An index file's path is longer than SQLite can open: bad usage (a shorter path works),
    where SQLite said only "unable to open database file", and an ingest blamed the disk."""


class IndexConflictError(HtpIndexError):
    """Another writer committed a version since this store read the one it changed."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    @classmethod
    def overtaken(cls, path: str | Path, base: int | None, live: int | None) -> IndexConflictError:
        """The standard error: name both versions and what to do."""
        return cls(
            f"the index at {path} moved to version {live} while this store held changes made "
            f"against version {base}; nothing was written. Reopen the index and apply the "
            "changes again (one writer at a time: the `htp-index` commands take a lock for this)",
            path=path,
        )


class EncoderMismatchError(HtpIndexError):
    """The caller's encoder configuration differs from the one the index was built with."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        stored: dict[str, Any] | None = None,
        expected: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.stored = stored
        self.expected = expected

    @classmethod
    def between(
        cls, path: str | Path, stored: dict[str, Any], expected: dict[str, Any]
    ) -> EncoderMismatchError:
        """The standard error naming both encoder configurations."""
        return cls(
            f"index at {path} was built with encoder {_compact(stored)}, but encoder "
            f"{_compact(expected)} was requested; vectors from different encoders cannot be "
            f"mixed. Run `htp-index rebuild --index {path}` to re-embed it with the new "
            "encoder, or use the encoder the index was built with",
            path=path,
            stored=stored,
            expected=expected,
        )


class IndexTrainingError(HtpIndexError):
    """An index kind that must be trained (IVF, PQ) got too few vectors to train on."""

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        needed: int | None = None,
        available: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.needed = needed
        self.available = available

    @classmethod
    def too_few(
        cls, kind: str, needed: int, available: int, detail: str = ""
    ) -> IndexTrainingError:
        """The standard error saying how many vectors are needed and what else to do."""
        why = f" ({detail})" if detail else ""
        return cls(
            f"index kind {kind!r} needs at least {needed} vectors to train, but only "
            f"{available} are available{why}. Add at least {needed} vectors in the first batch, "
            "or create the store with params={'train_fallback': 'exact'} (the default) to "
            "serve exact search until enough vectors exist, or use index_kind='flat'",
            kind=kind,
            needed=needed,
            available=available,
        )


class UnsupportedIndexKindError(HtpIndexError, ValueError):
    """An ``index_kind`` that is neither a named kind nor a factory string FAISS can build for
    the index's width: bad usage, refused before anything is written."""


class UnsupportedFilterError(HtpIndexError, ValueError):
    """A metadata filter uses an operator or value shape this store does not evaluate."""


def _compact(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


class SparseIndexMissingError(HtpIndexError):
    """Keyword or hybrid search was asked of an index written before it had a keyword table."""

    @classmethod
    def at(cls, path: str | Path, mode: str) -> SparseIndexMissingError:
        """The standard error, naming the command that adds the keyword side."""
        return cls(
            f"the index at {path} has no keyword index (it was written before htp-index had "
            f"one), so {mode!r} search is not available; it still serves dense search. Add "
            f"the keyword side with `htp-index rebuild --index {path} --keep-vectors` (no "
            "re-embedding)"
        )
