"""What counts as text to search with or for, shared by every layer above (the store's own
query checks, ingest's readers, the query path), so that all of them refuse the same inputs."""

from __future__ import annotations

import unicodedata

# Unicode category Cc is exactly U+0000-001F and U+007F-009F; tabs and line breaks stay.
_DROP_CONTROLS = {c: None for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n\r\f\v"}
# Controls that separate what they stand between: NEL (U+0085, a line break in EBCDIC-born and
# some cp1252-misread text) and the file, group and record separators are line breaks to
# str.splitlines, the unit separator (U+001F) a field separator. Deleted, they glued the words
# on either side into one ("zqxone\x85zqxtwo" found by neither word).
_CLEAN_CONTROLS = {**_DROP_CONTROLS, 0x85: "\n", 0x1C: "\n", 0x1D: "\n", 0x1E: "\n", 0x1F: " "}

#: Unicode categories that carry nothing to search for: controls, format characters
#: (zero-width spaces and joiners, BOMs) and space separators.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def has_visible_text(text: str) -> bool:
    """Whether ``text`` holds a character that is not a control, format (zero-width) or space
    character: what a document, and a query, needs to be about anything."""
    return any(unicodedata.category(ch) not in INVISIBLE_CATEGORIES for ch in text)


def lone_surrogate_at(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate (half of a UTF-16 pair, not a character, and not
    valid UTF-8), or None: a query holding one is refused on every path."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def lone_surrogate_problem(text: str, what: str) -> str | None:
    """Why a query ``text`` (called ``what``) cannot be searched when it holds a lone surrogate,
    or None: the one wording of every query path's refusal."""
    at = lone_surrogate_at(text)
    if at is None:
        return None
    return (f"{what} holds a lone surrogate ({ascii(text[at])}) at character {at}, which is not a "
            "character; send the query as valid UTF-8 text")


def drop_controls(text: str) -> str:
    """``text`` without control characters (tabs and line breaks kept, the separators among them
    made line breaks or a space) and soft hyphens: how ingest reads every document, and so how a
    query is searched, or "light\u00adhouse" and "cat\x00purrs" would be embedded unlike the
    same words in a document. ``str.translate`` keeps this cheap on 20 MB files."""
    return text.translate(_CLEAN_CONTROLS).replace("\u00ad", "")


def count_controls(text: str) -> int:
    """How many control characters (but tabs and line breaks) ``text`` holds: a text that is
    mostly controls is a binary file."""
    return len(text) - len(text.translate(_DROP_CONTROLS))
