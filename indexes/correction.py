"""A per-index correction of the vectors' geometry (anisotropy), frozen per index version.

Mean-pooled hidden states of small decoders share one dominant direction: every document has
a cosine of 0.95 or more with every other, so rankings hang on small residual differences and
every hit scores about 0.95. Subtracting a mean and re-normalising spreads them out. The
statistics must come from what an index has, not from evaluation queries:

* ``query_mean``: the mean of *pseudo-queries*, sentences of the corpus embedded the way
  queries are (with the query instruction), because queries and documents sit in different
  places (a document mean does not centre queries);
* ``doc_mean``: the mean of the document vectors, subtracted from documents at ingest.

Removing top principal directions too ("all-but-the-top"), per-dimension scaling and whitening
were measured as well and did not help.

The correction is fitted once, when an index version is first filled, and stored with it
(``correction.json``, checksummed like every file of a version); later ingests apply the same
statistics so all vectors stay comparable, and ``rebuild`` fits new ones. Which variant is used
was chosen on the development split: ``benchmarks/results/quality/correction.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

CORRECTION_FILE = "correction.json"


def _normalised(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class VectorCorrection(BaseModel):
    """Centring (and optionally removing top directions) applied to queries and documents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["center"] = "center"
    query_mean: list[float] = Field(description="subtracted from every query vector")
    doc_mean: list[float] = Field(description="subtracted from every document vector at ingest")
    fitted_on: int = Field(ge=0, description="document vectors the statistics were computed from")
    pseudo_queries: int = Field(ge=0, description="pseudo-queries behind query_mean")
    residual_mean_norm: float = Field(
        0.0, ge=0.0, description="norm of the mean of the corrected documents when fitted: the "
        "baseline against which drift is measured"
    )

    _query_mean: np.ndarray = PrivateAttr()
    _doc_mean: np.ndarray = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        """Keep the means as arrays: queries are corrected on the search path."""
        self._query_mean = np.asarray(self.query_mean, dtype=np.float32)
        self._doc_mean = np.asarray(self.doc_mean, dtype=np.float32)

    def __eq__(self, other: object) -> bool:
        """Equal statistics (the cached arrays are derived from them)."""
        return isinstance(other, VectorCorrection) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    @property
    def dim(self) -> int:
        return len(self.query_mean)

    @classmethod
    def fit(cls, doc_vectors: np.ndarray, pseudo_query_vectors: np.ndarray) -> VectorCorrection:
        """Centre on the documents' mean and the pseudo-queries' mean."""
        docs = np.asarray(doc_vectors, dtype=np.float32)
        doc_mean = docs.mean(0)
        residual = _normalised(docs - doc_mean).mean(0)
        return cls(
            query_mean=np.asarray(pseudo_query_vectors, dtype=np.float32).mean(0).tolist(),
            doc_mean=doc_mean.tolist(),
            fitted_on=len(docs),
            pseudo_queries=len(pseudo_query_vectors),
            residual_mean_norm=float(np.linalg.norm(residual)),
        )

    def queries(self, x: np.ndarray) -> np.ndarray:
        """Corrected, L2-normalised query vectors."""
        return _normalised(np.asarray(x, dtype=np.float32) - self._query_mean)

    def documents(self, x: np.ndarray) -> np.ndarray:
        """Corrected, L2-normalised document vectors."""
        return _normalised(np.asarray(x, dtype=np.float32) - self._doc_mean)

    def summary(self) -> dict[str, Any]:
        """What ``htp-index info`` shows: the variant and what it was fitted on (no vectors)."""
        return {
            "kind": self.kind,
            "fitted_on": self.fitted_on,
            "pseudo_queries": self.pseudo_queries,
            "query_mean_norm": round(float(np.linalg.norm(self.query_mean)), 4),
            "doc_mean_norm": round(float(np.linalg.norm(self.doc_mean)), 4),
            "residual_mean_norm": round(self.residual_mean_norm, 4),
        }

    def drift(self, stored: np.ndarray) -> dict[str, Any]:
        """How far the corrected vectors now stored have moved from the fit: the norm of their
        mean (about ``residual_mean_norm`` right after fitting; it grows as the corpus drifts
        away from the one the statistics came from, and ``rebuild`` refits)."""
        now = float(np.linalg.norm(np.asarray(stored, dtype=np.float32).mean(0))) if len(stored) else 0.0
        return {
            "vectors": int(len(stored)),
            "mean_norm_at_fit": round(self.residual_mean_norm, 4),
            "mean_norm_now": round(now, 4),
            "drift": round(now - self.residual_mean_norm, 4),
        }

    def save(self, path: Path) -> None:
        """Write as JSON (no pickle)."""
        path.write_text(json.dumps(self.model_dump(mode="json")), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> VectorCorrection:
        """Read what :meth:`save` wrote."""
        return cls.model_validate_json(path.read_text(encoding="utf-8"))
