"""Errors raised by the pipelines: one family with the index layer's (:class:`HtpIndexError`),
so the command line and the HTTP service show any of them as a message, not a traceback."""

from __future__ import annotations

from indexes import HtpIndexError


class IndexBusyError(HtpIndexError, RuntimeError):
    """Another ingest or rebuild holds the index's writer lock."""


class IndexNotWritableError(HtpIndexError, PermissionError):
    """A writer (ingest, rebuild, compact, restore, migrate) cannot take the writer lock in the
    index folder: the folder is read-only, another user's, or on a read-only file system. Asking
    again unchanged fails again: bad usage (exit 2), where a busy index is a retry's (exit 1)."""


class OptionConflictError(HtpIndexError, ValueError):
    """Options that cannot go together, or that ask an existing index for what only a rebuild
    changes: bad usage, which the command line reports with exit code 2, not as a failed run."""


class SettingsFileError(OptionConflictError):
    """The settings file is not valid TOML (named, with the line and column TOML gives)."""


class SettingsFileNotFoundError(SettingsFileError, FileNotFoundError):
    """``--config`` or ``HTP_INDEX_CONFIG`` names no file: bad usage wherever settings are read
    (``eval --pipeline`` reported it as a failed run, exit 1, where every other command said 2)."""


class IndexKindMismatchError(OptionConflictError):
    """An option asks an existing index for a kind it was not built as (only rebuild changes it)."""


class RebuildVerificationError(HtpIndexError, RuntimeError):
    """The new version did not pass its checks; the old version stays live."""


class DocumentRejected(HtpIndexError, ValueError):
    """Raised by a reader for a document it cannot turn into text (reported, never indexed)."""


class EmptySourceError(HtpIndexError, ValueError):
    """A source that yields no readable document would delete every document of the index (an
    unmounted share, an emptied folder on a scheduled run, a file caught mid-rewrite): refused,
    nothing changed."""


class MetricMismatchError(OptionConflictError):
    """An option asks an existing index for another distance than it was built with."""


class CorrectionMismatchError(OptionConflictError):
    """An option asks an existing index for another vector correction than its vectors have
    (the correction is fitted when a version is first filled; only a rebuild changes it)."""


class VersionNotKeptError(OptionConflictError):
    """A version asked for (``restore --version N``) that the index does not keep."""


class SplittingMismatchError(OptionConflictError):
    """An option asks an existing index to split documents otherwise than its nodes were split
    (only a rebuild from the source re-splits them all)."""


class EncoderDriftError(HtpIndexError, RuntimeError):
    """The encoder in hand embeds an index's check texts unlike the encoder that built it
    (`pipelines.encoder_check`): its tokenizer, config or code changed unnamed by its identity."""


class DatasetError(HtpIndexError, ValueError):
    """An evaluation dataset that cannot be read as its format says (a judgement line without
    three fields, a record without its text, two different grades for one pair): refused by
    file and line, since dropping or guessing would change the figures without a word."""


class ServiceAddressError(OptionConflictError):
    """``serve`` cannot listen where it is told: a port below 1024 without the right, or an
    address this machine does not have (bad usage; a port in use is a failed run instead)."""


class PortInUseError(HtpIndexError, RuntimeError):
    """``serve``'s port is taken (a failed run: it may be free later)."""
