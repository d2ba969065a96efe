"""What an ingest or rebuild plans, and what it did: plain data that crosses task boundaries.

These types carry no store, model or path to look anything up from, so a Prefect task (or a
Dask worker) can receive and return them as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.schema import TextNode

from pipelines.file_stats import FileRecords
from pipelines.sources import SourceDocument, SourceError, SourceItem, SourceUnchanged

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """What a run did; printed by the CLI, published as a Prefect artifact."""

    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    failed: int = 0
    nodes_embedded: int = 0
    #: nodes cut to the encoder's window: their vectors stand for their beginnings only (fixed K
    #: with many short sentences makes more blocks than the window budgets)
    nodes_truncated: int = 0
    tokens: int = 0
    seconds: float = 0.0
    version: int | None = None
    count: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)

    def fail(self, doc_id: str, error: str) -> None:
        self.failed += 1
        self.errors.append({"doc_id": doc_id, "error": error})
        log.warning("document %s failed: %s", doc_id, error)

    def fail_all(self, errors: dict[str, str]) -> None:
        for doc_id, error in errors.items():
            self.fail(doc_id, error)

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added, "updated": self.updated, "deleted": self.deleted,
            "unchanged": self.unchanged, "failed": self.failed,
            "nodes_embedded": self.nodes_embedded, "nodes_truncated": self.nodes_truncated, "tokens": self.tokens,
            "seconds": round(self.seconds, 3), "version": self.version, "count": self.count,
            "errors": self.errors,
        }

    def to_markdown(self, title: str = "Ingest run") -> str:
        rows = "\n".join(
            f"| {key} | {value} |" for key, value in self.to_json().items() if key != "errors"
        )
        errors = "\n".join(f"- `{e['doc_id']}`: {e['error']}" for e in self.errors[:50])
        more = f"\n- … and {len(self.errors) - 50} more" if len(self.errors) > 50 else ""
        return f"# {title}\n\n| stat | value |\n|---|---|\n{rows}\n" + (
            f"\n## Failed documents\n{errors}{more}\n" if self.errors else ""
        )


@dataclass
class IngestPlan:
    """The diff of a source against an index."""

    new: list[SourceDocument] = field(default_factory=list)
    changed: list[SourceDocument] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    errors: list[SourceError] = field(default_factory=list)
    #: the folder's files as this run saw them, recorded once their documents are indexed
    files: FileRecords | None = None

    @property
    def to_embed(self) -> list[SourceDocument]:
        return self.new + self.changed

    @property
    def changes_anything(self) -> bool:
        return bool(self.to_embed or self.deleted)


def plan_ingest(items: Iterable[SourceItem], known: dict[str, str], *, delete_missing: bool = True) -> IngestPlan:
    """Classify each source document as new, changed or unchanged against ``known`` hashes, and
    known documents missing from the source as deleted.

    A document that fails to read keeps its indexed version: a broken file must not erase what
    was good yesterday; so does every document under an error's ``covers`` prefix (a folder
    that could not be listed, a JSONL line whose ``_id`` could not be read).
    """
    plan = IngestPlan()
    seen: set[str] = set()
    for item in items:
        seen.add(item.doc_id)
        if isinstance(item, SourceError):
            plan.errors.append(item)
        elif isinstance(item, SourceUnchanged):
            if known.get(item.doc_id) == item.content_hash:
                plan.unchanged.append(item.doc_id)
            else:  # vouched for against these very hashes: cannot happen, and must not delete it
                plan.errors.append(SourceError(item.doc_id, "its file was taken as unchanged but the index "
                                               "holds another version; it is read again next run"))
        elif item.doc_id not in known:
            plan.new.append(item)
        elif known[item.doc_id] != item.content_hash:
            plan.changed.append(item)
        else:
            plan.unchanged.append(item.doc_id)
    if delete_missing:
        covered = tuple({error.covers for error in plan.errors if error.covers is not None})
        plan.deleted = sorted(doc_id for doc_id in set(known) - seen if not doc_id.startswith(covered))
    return plan


@dataclass
class SplitNodes:
    """The nodes of each document, and the documents that could not be split (id -> why)."""

    by_doc: dict[str, list[TextNode]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def total_nodes(self) -> int:
        return sum(len(nodes) for nodes in self.by_doc.values())

    def batches(self, nodes_per_batch: int) -> list[list[TextNode]]:
        """Whole documents grouped into batches of about ``nodes_per_batch`` nodes: the unit of
        fan-out, and of isolation when a batch fails."""
        batches: list[list[TextNode]] = [[]]
        for nodes in self.by_doc.values():
            if batches[-1] and len(batches[-1]) + len(nodes) > nodes_per_batch:
                batches.append([])
            batches[-1].extend(nodes)
        return [batch for batch in batches if batch]


@dataclass
class RebuildPlan:
    """What a rebuild re-embeds (the stored nodes, or a re-read source) and into which index
    kind (the encoder is the session's); ``hashes`` are the documents' content hashes to record."""

    index_kind: str
    nodes: SplitNodes
    hashes: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)
    #: how the nodes were split, to record in the new version (None: not known)
    splitting: dict[str, int] | None = None
    #: indexed documents the new version leaves out (gone from the re-read source)
    deleted: list[str] = field(default_factory=list)
    #: the live version's documents: a re-embedded one of them counts as updated, not added
    indexed: frozenset[str] = frozenset()
    #: the live version read: a version another writer commits meanwhile stops the switch
    base_version: int | None = None
