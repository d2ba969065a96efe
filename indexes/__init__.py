"""FAISS vector stores for LlamaIndex: stable ids, deletes, filters, GPU, versioned persistence.

``from indexes import FaissVectorStore`` is the entry point; see `indexes.store`.
This package never imports ``htp_embed``, ``pipelines`` or ``flows``.
"""

from . import fusion, sparse
from .correction import VectorCorrection
from .errors import (
    EncoderMismatchError,
    HtpIndexError,
    IndexCorruptedError,
    IndexExistsError,
    IndexNotFoundError,
    IndexTrainingError,
    SparseIndexMissingError,
    UnsupportedFilterError,
)
from .gpu import GpuSelection, Placement, UseGpu
from .persist import current_version, exists, read_manifest
from .spec import IndexParams, IndexSpec, Manifest, Metric, same_encoder
from .store import FaissVectorStore

__all__ = [
    "EncoderMismatchError",
    "FaissVectorStore",
    "GpuSelection",
    "HtpIndexError",
    "IndexCorruptedError",
    "IndexExistsError",
    "IndexNotFoundError",
    "IndexParams",
    "IndexSpec",
    "IndexTrainingError",
    "Manifest",
    "Metric",
    "Placement",
    "SparseIndexMissingError",
    "UnsupportedFilterError",
    "UseGpu",
    "VectorCorrection",
    "current_version",
    "exists",
    "fusion",
    "read_manifest",
    "same_encoder",
    "sparse",
]
