"""Writing a results Markdown file without losing what people wrote in it.

A benchmark regenerates its table, but the committed file also carries hand-written
``## Notes`` sections (runs compared side by side, what changed between stops): rewriting the
file must keep them, or every re-run erases the history the table is read with.
"""

from __future__ import annotations

from pathlib import Path

NOTES = "## Notes"


def kept_notes(text: str) -> str:
    """Everything from the first line starting with ``## Notes`` on ('' when there is none)."""
    if text.startswith(NOTES):
        return text
    at = text.find("\n" + NOTES)
    return text[at + 1 :] if at >= 0 else ""


def write_markdown(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (folders made), followed by the notes of the file it replaces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = kept_notes(path.read_text(encoding="utf-8")) if path.is_file() else ""
    body = text.rstrip("\n") + "\n"
    path.write_text(body + ("\n" + notes if notes else ""), encoding="utf-8")
