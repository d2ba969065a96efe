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

Kind ``adapter`` adds a linear map ``A`` after centring, applied to queries and documents alike
(``normalise(A @ centred)``): fitted on the corpus alone by contrastive training on
pseudo-query -> source-node pairs (`pipelines.adapter`), it raises dense retrieval on the
development split (SciFact train, full corpus) from 45.4 to 52.2 NDCG@10 but leaves hybrid
search where it was, so it is opt-in (``correction = "adapter"``). The matrix is stored in the
same JSON file as base64 float32 (no pickle), checksummed like every file of a version.

The correction is fitted once, when an index version is first filled, and stored with it
(``correction.json``, checksummed like every file of a version); later ingests apply the same
statistics so all vectors stay comparable, and ``rebuild`` fits new ones. Which variant is used
was chosen on the development split: ``benchmarks/results/quality/correction.md``.
"""

from __future__ import annotations

import base64
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
    """Centring (and, for kind ``adapter``, a linear map) applied to queries and documents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["center", "adapter"] = "center"
    query_mean: list[float] = Field(description="subtracted from every query vector")
    doc_mean: list[float] = Field(description="subtracted from every document vector at ingest")
    fitted_on: int = Field(ge=0, description="document vectors the statistics were computed from")
    pseudo_queries: int = Field(ge=0, description="pseudo-queries behind query_mean")
    residual_mean_norm: float = Field(
        0.0, ge=0.0, description="norm of the mean of the corrected documents when fitted: the "
        "baseline against which drift is measured"
    )

    adapter: str | None = Field(
        None, description="kind 'adapter': the d x d map applied after centring, row-major float32, base64"
    )
    adapter_pairs: int = Field(0, ge=0, description="pseudo-query -> node pairs the adapter was fitted on")
    adapter_epochs: int = Field(0, ge=0, description="training epochs kept (early stopping on held-out pairs)")
    adapter_heldout_mrr: tuple[float, float] | None = Field(
        None, description="held-out pseudo-queries' MRR of their source node without / with the adapter"
    )

    _query_mean: np.ndarray = PrivateAttr()
    _doc_mean: np.ndarray = PrivateAttr()
    _adapter: np.ndarray | None = PrivateAttr(None)

    def model_post_init(self, context: Any) -> None:
        """Keep the means (and the map) as arrays: queries are corrected on the search path."""
        self._query_mean = np.asarray(self.query_mean, dtype=np.float32)
        self._doc_mean = np.asarray(self.doc_mean, dtype=np.float32)
        if (self.kind == "adapter") != (self.adapter is not None):
            raise ValueError("a correction of kind 'adapter' carries an adapter matrix, and only it does")
        if self.adapter is not None:
            flat = np.frombuffer(base64.b64decode(self.adapter), dtype="<f4")
            if flat.size != self.dim * self.dim:
                raise ValueError(f"the adapter holds {flat.size} values, not {self.dim} x {self.dim}")
            self._adapter = flat.reshape(self.dim, self.dim).astype(np.float32)

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

    def with_adapter(
        self, matrix: np.ndarray, doc_vectors: np.ndarray, *, pairs: int, epochs: int,
        heldout_mrr: tuple[float, float],
    ) -> VectorCorrection:
        """This centring followed by ``matrix`` (kind ``adapter``), with the drift baseline
        measured on ``doc_vectors`` (the raw vectors it was fitted on) as adapted."""
        matrix = np.ascontiguousarray(matrix, dtype="<f4")
        if matrix.shape != (self.dim, self.dim) or not np.isfinite(matrix).all():
            raise ValueError(f"an adapter must be a finite {self.dim} x {self.dim} matrix, not {matrix.shape}")
        fields = {**self.model_dump(), "kind": "adapter", "adapter": base64.b64encode(matrix.tobytes()).decode("ascii"),
                  "adapter_pairs": pairs, "adapter_epochs": epochs,
                  "adapter_heldout_mrr": (round(heldout_mrr[0], 4), round(heldout_mrr[1], 4))}
        adapted = _normalised(self.centred_documents(doc_vectors) @ matrix.T)
        return VectorCorrection(**{**fields, "residual_mean_norm": float(np.linalg.norm(adapted.mean(0)))})

    def centred_queries(self, x: np.ndarray) -> np.ndarray:
        """Query vectors centred and normalised, before any adapter (what the adapter is fitted on)."""
        return _normalised(np.asarray(x, dtype=np.float32) - self._query_mean)

    def centred_documents(self, x: np.ndarray) -> np.ndarray:
        """Document vectors centred and normalised, before any adapter."""
        return _normalised(np.asarray(x, dtype=np.float32) - self._doc_mean)

    def queries(self, x: np.ndarray) -> np.ndarray:
        """Corrected, L2-normalised query vectors."""
        return self._adapted(self.centred_queries(x))

    def documents(self, x: np.ndarray) -> np.ndarray:
        """Corrected, L2-normalised document vectors."""
        return self._adapted(self.centred_documents(x))

    def _adapted(self, centred: np.ndarray) -> np.ndarray:
        return centred if self._adapter is None else _normalised(centred @ self._adapter.T)

    def summary(self) -> dict[str, Any]:
        """What ``htp-index info`` shows: the variant and what it was fitted on (no vectors)."""
        return {
            "kind": self.kind,
            "fitted_on": self.fitted_on,
            "pseudo_queries": self.pseudo_queries,
            "query_mean_norm": round(float(np.linalg.norm(self.query_mean)), 4),
            "doc_mean_norm": round(float(np.linalg.norm(self.doc_mean)), 4),
            "residual_mean_norm": round(self.residual_mean_norm, 4),
            **({"adapter_pairs": self.adapter_pairs, "adapter_epochs": self.adapter_epochs,
                "adapter_heldout_mrr": self.adapter_heldout_mrr,
                "adapter_distance_from_identity": round(float(np.linalg.norm(self._adapter - np.eye(self.dim))), 3)}
               if self._adapter is not None else {}),
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
