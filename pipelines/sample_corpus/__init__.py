"""A small bundled sample corpus for the demo and for tests that need real text.

Written for this project (no third-party text): a few pages about htp-index itself and some
general-knowledge notes, in Markdown and plain text, so a fresh install can ingest and query
something meaningful with no data at hand.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def sample_dir() -> Path:
    """The directory holding the sample documents."""
    return Path(str(files(__name__))) / "docs"


def sample_texts() -> list[str]:
    """The sample documents' texts, in file-name order."""
    return [p.read_text(encoding="utf-8") for p in sorted(sample_dir().iterdir()) if p.suffix in (".md", ".txt")]
