"""Whether the encoder in hand still gives the vectors an index was built with.

Why: an index accepts an encoder by its identity (the weights' fingerprint, the method and its
settings; :mod:`htp_embed.identity`), and the identity names neither the tokenizer, nor the
config fields outside the architecture, nor htp-index's own arithmetic. A tokenizer edited in a
user's model folder, a changed ``config.json``, or an upgrade that changed how vectors are
computed passes the identity, and then embeds queries and new documents unlike the stored ones:
worse results, and nothing says so. So each index version records what its encoder gave for a few
fixed texts, as documents and as queries (before the index's vector correction), and the paths
that rely on it compare the encoder in hand with that record:

* the ingest engine before it adds to an index: a failed check refuses the write (one index
  would hold vectors of two encoders; a rebuild is the way out);
* the HTTP service when it loads a version: a failed check is logged as an error and shown by
  ``/health`` (status ``degraded``); it keeps answering, since the stored vectors are intact, and
  says so in each dense or hybrid answer's ``warnings`` (an app that only queries reads no health);
* a one-shot ``htp-index query`` does not check (it would load spaCy on the cold path); ``htp-index
  info`` says whether a check is recorded.

``MIN_COSINE`` leaves room for the arithmetic the identity allows to differ: bfloat16 against
float32, packed or fused kernels, another CPU (cosines of 0.99995 and above measured between
them); a changed tokenizer or model moves a vector far more. The texts are stored with the
vectors, so a later release may check other texts without failing older records.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipelines.errors import EncoderDriftError

#: Two documents of several sentences (HTP's blocks and summaries, one with non-ASCII text for
#: the tokenizer's normalisation) and two queries.
CHECK_DOCUMENTS = (
    "Hierarchical token prepending lets early tokens see later sentences. Each block of sentences "
    "gets a summary token, and the encoder reads the summaries at an early exit layer.",
    "Kinase inhibitors reduced tumour growth in mice treated in Zürich. The effect held across "
    "three cell lines, but not in vitro; naïve controls grew as before.",
)
CHECK_QUERIES = ("How do summary tokens help early words?", "Do kinase inhibitors slow tumour growth?")
#: Least cosine between a recorded vector and the encoder's own for the same text.
MIN_COSINE = 0.999


class CheckedEncoder(Protocol):
    """What the check needs of an encoder (``HTPEncoder`` has it)."""

    def encode_documents(self, texts: list[str]) -> np.ndarray: ...

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class EncoderCheck:
    """How closely the encoder in hand reproduced an index's recorded vectors."""

    min_cosine: float

    @property
    def passed(self) -> bool:
        return self.min_cosine >= MIN_COSINE

    def summary(self) -> dict[str, Any]:
        """The JSON-ready form ``/health`` shows."""
        return {"passed": self.passed, "min_cosine": round(self.min_cosine, 6), "needed": MIN_COSINE}


def record_check(encoder: CheckedEncoder) -> dict[str, Any]:
    """The record an index version keeps: the check texts and this encoder's vectors of them."""
    documents, queries = _vectors(encoder, list(CHECK_DOCUMENTS), list(CHECK_QUERIES))
    return {"documents": list(CHECK_DOCUMENTS), "queries": list(CHECK_QUERIES),
            "document_vectors": _packed(documents), "query_vectors": _packed(queries)}


def compare(encoder: CheckedEncoder, recorded: dict[str, Any]) -> EncoderCheck:
    """Embed the recorded texts with ``encoder`` and compare with the recorded vectors."""
    documents, queries = _vectors(encoder, list(recorded["documents"]), list(recorded["queries"]))
    cosines = [np.sum(_unpacked(recorded[key], now.shape) * now, axis=1)
               for key, now in (("document_vectors", documents), ("query_vectors", queries))]
    return EncoderCheck(float(np.min(np.concatenate(cosines))))


def require_same_vectors(encoder: CheckedEncoder, recorded: dict[str, Any] | None, where: str) -> EncoderCheck | None:
    """Raise :class:`EncoderDriftError` unless ``encoder`` reproduces the index's record (None:
    the index records no check, nothing to compare)."""
    if recorded is None:
        return None
    check = compare(encoder, recorded)
    if not check.passed:
        raise EncoderDriftError(
            f"the encoder embeds the check texts recorded by {where} unlike the encoder that built it "
            f"(least cosine {check.min_cosine:.4f}, needed {MIN_COSINE}): its tokenizer, config or "
            "code changed in a way its identity does not name, so new vectors would not match the "
            f"stored ones. Rebuild the index with this encoder (`htp-index rebuild --index {where}`), "
            "or restore the model folder or htp-index version that built it")
    return check


def _vectors(encoder: CheckedEncoder, documents: list[str], queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _normalised(encoder.encode_documents(documents)), _normalised(encoder.encode_queries(queries))


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _packed(vectors: np.ndarray) -> str:
    """float16, base64: ~1.7 KB a vector of 640 in the manifest; rounding moves a cosine by
    less than 1e-6."""
    return base64.b64encode(vectors.astype("<f2").tobytes()).decode("ascii")


def _unpacked(text: str, shape: tuple[int, ...]) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float32)
    if values.size != int(np.prod(shape)):  # another width: a different model altogether
        return np.zeros(shape, dtype=np.float32)
    return _normalised(values.reshape(shape))
