"""Fitting an index's vector correction from its own corpus (see `indexes.correction`).

The statistics come from the documents being indexed and nothing else: the document mean of
their vectors, and the mean of *pseudo-queries*, sentences sampled from the documents and
embedded with the query instruction, so that queries are centred on where queries lie.
Evaluation queries are never used (that was the +10 of the earlier study, which no deployment
could have). Fitting happens when an index version is first filled (the first ingest of a new
index, or a rebuild) and is then frozen with that version.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from htp_embed import HTPEncoder
from indexes import VectorCorrection

log = logging.getLogger(__name__)

CorrectionKind = Literal["center", "none"]
PSEUDO_QUERIES = 1024
MIN_DOCUMENTS = 8
"""Fewer document vectors than this give no stable document mean: no correction is fitted."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def pseudo_queries(texts: Sequence[str], n: int = PSEUDO_QUERIES, seed: int = 0) -> list[str]:
    """Up to ``n`` sentences of 6-40 words from ``texts`` (a fixed-seed sample), the length of
    typical queries; texts without such sentences contribute their first 40 words."""
    sentences = [
        sentence.strip()
        for text in texts
        for sentence in _SENTENCE_END.split(text)
        if 6 <= len(sentence.split()) <= 40
    ]
    if not sentences:
        sentences = [" ".join(text.split()[:40]) for text in texts if text.strip()]
    if len(sentences) > n:
        sentences = random.Random(seed).sample(sentences, n)
    return sentences


def fit_correction(
    doc_vectors: np.ndarray, texts: Sequence[str], encoder: HTPEncoder, *, kind: CorrectionKind = "center"
) -> VectorCorrection | None:
    """The correction fitted on the documents' raw vectors and texts, or None (``kind`` "none",
    or too few documents for a stable mean)."""
    if kind == "none":
        return None
    if len(doc_vectors) < MIN_DOCUMENTS:
        log.warning("only %d document vectors: no vector correction fitted (needs %d); run "
                    "`htp-index rebuild` once the index holds more", len(doc_vectors), MIN_DOCUMENTS)
        return None
    return VectorCorrection.fit(doc_vectors, encoder.encode_queries(pseudo_queries(texts)))
