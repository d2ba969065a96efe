"""Durability of a write: a file's bytes, or a directory's entries (what makes a rename
survive a power loss), flushed to the disk."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories make renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_shared_dir(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` given the mode the umask allows (0755 under umask 022) instead of
    its 0700: a staging folder is renamed into the index as it is, and an index written by one
    user (an ingest job) could not be read by a service running as another."""
    import tempfile

    made = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(made, 0o777 & ~current_umask())
    return made


def current_umask() -> int:
    """This process's umask: from /proc on Linux (setting it to read it, the fallback, would
    briefly change the mode of files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
