"""Typed configuration of an index and the manifest that records it on disk.

The spec is what a version needs to be re-opened or rebuilt identically; runtime choices
(GPU placement, how many versions to keep) are arguments of `FaissVectorStore.open` instead,
because they belong to the process, not to the data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Metric = Literal["ip", "l2"]
TrainFallback = Literal["exact", "raise"]

OPTIONAL_FIELDS = ("splitting", "encoder_check", "correction_kind")
"""Manifest fields left out of the checksum while null, so that a manifest written before one
existed still verifies (it has no such key; the model fills in null)."""

FORMAT_VERSION = 2
"""2: a version names immutable segments (see `indexes.segments`); 1: one full copy per version."""


class IndexParams(BaseModel):
    """Build and search knobs; every default targets recall@10 >= 0.95 against exact search."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW neighbours per node")
    hnsw_ef_construction: int = Field(64, ge=8, description="HNSW build beam width")
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW search beam width")
    nlist: int | None = Field(None, ge=1, description="IVF lists; None: ~4*sqrt(count)")
    nprobe: int | None = Field(None, ge=1, description="IVF lists probed; None: ~4*sqrt(nlist)")
    pq_m: int | None = Field(None, ge=1, description="PQ sub-quantizers; None: dim/8")
    pq_nbits: int | None = Field(None, ge=4, le=8, description="bits per PQ code; None: from count")
    refine_k_factor: float = Field(8.0, ge=1.0, description="IVF-PQ candidates re-ranked exactly")
    train_fallback: TrainFallback = Field(
        "exact",
        description="before a kind that needs training has enough vectors: serve exact search "
        "('exact') or refuse the add with IndexTrainingError ('raise')",
    )
    min_train_vectors: int | None = Field(None, ge=1, description="override the training floor")
    max_tombstone_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="rebuild kinds that cannot remove beyond this"
    )
    retrain_growth: float = Field(
        4.0, gt=1.0, description="re-train IVF when the count grew by this factor since training"
    )
    auto_ivf_rows: int = Field(
        16_384, ge=1, description="kind 'auto': segments with this many rows are written as IVF, "
        "and so are segments of auto_ivf_segment_rows once the index holds this many rows"
    )
    auto_ivf_segment_rows: int = Field(
        2_048, ge=1, description="kind 'auto': in an index of at least auto_ivf_rows rows, "
        "segments with this many rows are written as IVF too (exact search reads every flat row)"
    )
    auto_target_recall: float = Field(
        0.97, gt=0.0, le=1.0, description="kind 'auto': recall@10 an IVF segment's nprobe is "
        "calibrated to reach against exact search"
    )
    exact_filter_threshold: int = Field(
        2048, ge=0, description="filters allowing at most this many vectors search exactly"
    )


class IndexSpec(BaseModel):
    """What the vectors are: dimension, metric and index kind (a name or a FAISS factory string)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(ge=1)
    metric: Metric = "ip"
    index_kind: str = "auto"
    params: IndexParams = IndexParams()

    @field_validator("index_kind")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("index_kind must be a kind name or a FAISS factory string")
        return value


class FileRecord(BaseModel):
    """Size and sha256 of one file of a version, checked when the version is opened."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    bytes: int


class NamedFile(BaseModel):
    """A file shared between versions, by its path relative to the index directory."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    bytes: int


class SegmentRecord(BaseModel):
    """One immutable segment a version names, and which of its rows that version deleted."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="folder under segments/")
    rows: int = Field(ge=0, description="rows stored, deleted ones included")
    min_id: int
    max_id: int
    structure: str = Field(description="FAISS classes of the segment's vectors")
    trained: bool = True
    files: dict[str, FileRecord] = Field(description="the segment's files, checksummed at write")
    deletes: NamedFile | None = Field(None, description="sorted int64 ids deleted (tombstones)")
    deleted: int = Field(0, ge=0, description="rows of this segment the version deleted")

    @property
    def live(self) -> int:
        """Rows of the segment this version serves."""
        return self.rows - self.deleted


class Manifest(BaseModel):
    """The JSON record of one persisted version (``manifest.json``): the commit point.

    Format 2 names the version's ``segments`` (shared with other versions, never copied),
    its document-hash log ``docs`` and its ``correction``; format 1 listed whole-copy ``files``.
    """

    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    version: int = 0
    created_at: str
    encoder: dict[str, Any]
    dim: int
    metric: Metric
    index_kind: str
    index_structure: str = Field(description="FAISS classes actually persisted, outer to inner")
    trained: bool
    trained_on: int = 0
    count: int
    next_id: int
    tombstones: int = 0
    params: IndexParams
    files: dict[str, FileRecord] = Field(default_factory=dict, description="format 1 only")
    segments: list[SegmentRecord] = Field(default_factory=list)
    docs: list[NamedFile] = Field(
        default_factory=list, description="document-hash log: a base, then deltas, replayed in order"
    )
    correction: FileRecord | None = Field(None, description="correction.json beside the manifest")
    splitting: dict[str, int] | None = Field(
        None, description="how the pipeline split documents into nodes (chunk_size, chunk_overlap); "
        "None: not recorded (an index written before it was)"
    )
    encoder_check: dict[str, Any] | None = Field(
        None, description="what the encoder that built the index gave for a few fixed texts (the "
        "pipeline's `pipelines.encoder_check`); the store keeps it from version to version. None: "
        "not recorded (an index written before it was)"
    )
    correction_kind: str | None = Field(
        None, description="the vector correction the pipeline chose for the index ('center', 'adapter' "
        "or 'none'), kept from version to version so that a later run under other defaults keeps it "
        "(an index built with 'none', or too small for one yet, holds no correction.json to say so). "
        "None: not recorded (an index written before it was)"
    )
    faiss_version: str
    checksum: str = ""

    def body_checksum(self, written: dict[str, Any] | None = None) -> str:
        """sha256 of the manifest without its own checksum field (detects edits and bit rot).

        ``written``: the JSON object read from the manifest's file, to verify what was written
        rather than this model's dump of it. The two differ when the model gained a field
        since (``IndexParams.auto_ivf_segment_rows`` did: its default entered the dump of every
        older manifest, whose checksum then failed, so no index written before it opened).
        """
        exclude = {"checksum"}
        for optional in OPTIONAL_FIELDS:
            if getattr(self, optional) is None:  # written as null: not part of the checksum
                exclude.add(optional)
        if self.format_version < 2:  # fields format 1 did not have are not part of its checksum
            exclude |= {"segments", "docs", "correction"}
        body = self.model_dump(mode="json") if written is None else written
        canonical = json.dumps({key: value for key, value in body.items() if key not in exclude},
                               sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def sealed(self) -> Manifest:
        """A copy carrying its body checksum."""
        return self.model_copy(update={"checksum": self.body_checksum()})

    def __getitem__(self, key: str) -> Any:
        """JSON-style access (``manifest["count"]``), as if reading manifest.json."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """JSON-style access with a default."""
        return self.to_dict().get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as the JSON object written to disk. A ``correction_kind`` of None is
        left out: releases before it count a null one into the checksum, and would call the
        file corrupted (``splitting`` and ``encoder_check`` came with the rule that skips them)."""
        return self.model_dump(mode="json", exclude=None if self.correction_kind else {"correction_kind"})

    @property
    def spec(self) -> IndexSpec:
        """The index spec this version was built from."""
        return IndexSpec(
            dim=self.dim, metric=self.metric, index_kind=self.index_kind, params=self.params
        )


def canonical_encoder(encoder: dict[str, Any]) -> str:
    """Canonical JSON of an encoder description, so that key order never causes a mismatch."""
    return json.dumps(encoder, sort_keys=True, separators=(",", ":"), default=str)


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two encoder descriptions are the same encoder: the one comparison every layer
    uses (the store on open, ingest on the vectors it receives, readers reusing a model)."""
    return canonical_encoder(a) == canonical_encoder(b)
