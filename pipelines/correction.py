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
from pipelines.adapter import fit_linear_adapter

log = logging.getLogger(__name__)

CorrectionKind = Literal["center", "adapter", "none"]
PSEUDO_QUERIES = 1024
ADAPTER_PAIRS_PER_NODE = 2
ADAPTER_PAIRS = 16_384
"""An adapter is fitted on up to `ADAPTER_PAIRS_PER_NODE` pseudo-query pairs per node, and never
more than `ADAPTER_PAIRS` (so the cost stops growing with the corpus). Dense NDCG@10 on the
development split (5,697 nodes) rose with pairs: 51.2 at one per node (5,697), 51.8 at 8,192,
52.2 at two per node, 52.4 at 16,384 (``benchmarks/results/quality/adapter_pairs.md``). Two per
node cost about a fifth of the nodes' own embedding time there (249 s to embed the pseudo-queries
and fit, ``adapter.md``, against ~1,160 s to ingest the abstracts on the same 2 cores); shorter
pseudo-queries (6-20 words) were twice as fast to embed but scored lower at equal cost (51.4 at
two per node)."""
MIN_DOCUMENTS = 8
"""Fewer document vectors than this give no stable document mean: no correction is fitted."""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def pseudo_queries(texts: Sequence[str], n: int = PSEUDO_QUERIES, seed: int = 0) -> list[str]:
    """Up to ``n`` sentences of 6-40 words from ``texts`` (a fixed-seed sample), the length of
    typical queries; a text without such a sentence contributes its first 40 words."""
    return [sentence for _, sentence in pseudo_query_pairs(texts, n, seed)]


def pseudo_query_pairs(
    texts: Sequence[str], n: int = PSEUDO_QUERIES, seed: int = 0, max_words: int = 40
) -> list[tuple[int, str]]:
    """`pseudo_queries` with the index of the text each sentence came from (sentences of at
    most ``max_words`` words; ``benchmarks/quality/adapter_pairs.py`` compares shorter ones).

    Every non-empty text contributes, so that the pseudo-queries' mean is taken over the same
    corpus as the documents' mean. When only texts with prose sentences contributed, a corpus
    mostly of unpunctuated text (logs, tables, code, one huge line) got a query mean from its
    few prose texts alone: centring queries on those texts' own direction put them at ranks
    42-193 of 257 in dense search, where no correction ranked them first (stop 42's trial)."""
    pairs = []
    for i, text in enumerate(texts):
        found = [(i, sentence.strip()) for sentence in _SENTENCE_END.split(text)
                 if 6 <= len(sentence.split()) <= max_words]
        if not found and text.strip():
            found = [(i, " ".join(text.split()[:max_words]))]
        pairs.extend(found)
    if len(pairs) > n:
        pairs = random.Random(seed).sample(pairs, n)
    return pairs


def fit_correction(
    doc_vectors: np.ndarray, texts: Sequence[str], encoder: HTPEncoder, *, kind: CorrectionKind = "center"
) -> VectorCorrection | None:
    """The correction fitted on the documents' raw vectors and texts (``texts[i]`` is the text
    of ``doc_vectors[i]``), or None (``kind`` "none", or too few documents for a stable mean).
    Kind "adapter" falls back to "center" when the corpus gives too few pairs."""
    if kind == "none":
        return None
    if len(doc_vectors) < MIN_DOCUMENTS:
        log.warning("only %d document vectors: no vector correction fitted yet (needs %d); the ingest "
                    "that brings the index to %d fits it", len(doc_vectors), MIN_DOCUMENTS, MIN_DOCUMENTS)
        return None
    if kind == "center":
        return VectorCorrection.fit(doc_vectors, encoder.encode_queries(pseudo_queries(texts)))
    pairs = pseudo_query_pairs(texts, min(ADAPTER_PAIRS, max(PSEUDO_QUERIES, ADAPTER_PAIRS_PER_NODE * len(doc_vectors))))
    pseudo = encoder.encode_queries([sentence for _, sentence in pairs])
    centring = VectorCorrection.fit(doc_vectors, pseudo)
    fitted = fit_linear_adapter(
        centring.centred_queries(pseudo), centring.centred_documents(doc_vectors),
        np.asarray([source for source, _ in pairs]),
    )
    if fitted is None:
        return centring
    return centring.with_adapter(fitted.matrix, doc_vectors, pairs=fitted.pairs, epochs=fitted.epochs,
                                 heldout_mrr=fitted.heldout_mrr)
