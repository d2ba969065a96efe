"""FAISS vector stores for LlamaIndex: stable ids, deletes, filters, GPU, keyword and hybrid
search, and versions made of immutable segments.

``from indexes import FaissVectorStore`` is the entry point (LlamaIndex's vector store, see
`indexes.store`) and `SegmentStore` its engine without LlamaIndex (`indexes.segment_store`,
what a query opens). A commit is
read in one module, `indexes.persist`; a segment in `indexes.segments`; merges in
`indexes.merge_policy`; keyword search in `indexes.keywords`.
This package never imports ``htp_embed``, ``pipelines`` or ``flows``.
"""

from . import fusion, keywords, sparse
from .correction import VectorCorrection
from .errors import (
    EncoderMismatchError,
    HtpIndexError,
    IndexConflictError,
    IndexCorruptedError,
    IndexExistsError,
    IndexNotFoundError,
    IndexTrainingError,
    SparseIndexMissingError,
    SystemLimitError,
    UnsupportedFilterError,
    UnsupportedIndexKindError,
)
from .gpu import GpuSelection, Placement, UseGpu
from .merge_policy import MergePolicy
from .persist import current_version, exists, read_manifest, verify
from .segment_store import SegmentStore
from .spec import IndexParams, IndexSpec, Manifest, Metric, same_encoder


def __getattr__(name: str) -> object:
    """``FaissVectorStore`` on first use: it imports LlamaIndex (~1 s), which a query opening
    a `SegmentStore` does without."""
    if name == "FaissVectorStore":
        from .store import FaissVectorStore

        return FaissVectorStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EncoderMismatchError",
    "FaissVectorStore",
    "GpuSelection",
    "HtpIndexError",
    "IndexConflictError",
    "IndexCorruptedError",
    "IndexExistsError",
    "IndexNotFoundError",
    "IndexParams",
    "IndexSpec",
    "IndexTrainingError",
    "MergePolicy",
    "Manifest",
    "Metric",
    "Placement",
    "SegmentStore",
    "SparseIndexMissingError",
    "SystemLimitError",
    "UnsupportedFilterError",
    "UnsupportedIndexKindError",
    "UseGpu",
    "VectorCorrection",
    "current_version",
    "exists",
    "fusion",
    "keywords",
    "read_manifest",
    "same_encoder",
    "sparse",
    "verify",
]
