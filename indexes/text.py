"""What counts as text to search with or for, shared by every layer above (the store's own
query checks, ingest's readers, the query path), so that all of them refuse the same inputs."""

from __future__ import annotations

import unicodedata

#: Unicode categories that carry nothing to search for: controls, format characters
#: (zero-width spaces and joiners, BOMs) and space separators.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def has_visible_text(text: str) -> bool:
    """Whether ``text`` holds a character that is not a control, format (zero-width) or space
    character: what a document, and a query, needs to be about anything."""
    return any(unicodedata.category(ch) not in INVISIBLE_CATEGORIES for ch in text)
