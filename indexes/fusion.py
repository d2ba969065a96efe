"""Fusing the dense (vector) and sparse (BM25) result lists of one query into one ranking.

Two methods, both standard:

* ``convex``: ``alpha * dense + (1 - alpha) * sparse`` over scores min-max normalised per query
  and per side, over that side's candidate list. Plain min-max maps the best candidate to 1
  however weak the list is, so a side whose scores are all nearly equal (noise) would get full
  weight; here the bottom of the range is at most ``floor`` times the top (for positive
  scores), so such a list stays compressed near the top (``floor`` 1 is plain min-max, 0
  divides by the top score). A candidate missing from one side's
  list gets 0 from it (it ranked below everything that side listed).
* ``rrf``: reciprocal-rank fusion, ``alpha / (k + dense rank) + (1 - alpha) / (k + sparse
  rank)``; needs no score calibration but ignores how far apart scores are.

Bruch et al. (TOIS 2023) found convex fusion better than RRF in and out of domain, with a
weight tuned on few queries; the defaults below were chosen on the development split
(SciFact train) only: ``benchmarks/results/quality/pipeline.md``. Reciprocal-rank fusion
scored 2-6 points below convex fusion at every weight there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Fusion = Literal["convex", "rrf"]
Scored = tuple[int, float]

DEFAULT_FUSION: Fusion = "convex"
DEFAULT_ALPHA = 0.3
"""Weight of the dense side (LlamaIndex's convention: 1 = dense only, 0 = keywords only).

Chosen on half A of the SciFact train queries over the full corpus through the product
(``benchmarks/results/quality/pipeline.md``): 0.2 and 0.3 tie there (73.2 NDCG@10), 0.5 loses
2.7; 0.3 holds on half B (70.6, against 68.6 for keywords alone)."""
DEFAULT_FLOOR = 0.5
DEFAULT_RRF_K = 60
CANDIDATES = 100
"""Candidates taken from each side before fusing (the depth the defaults were tuned at)."""


def _normalised(hits: Sequence[Scored], floor: float) -> dict[int, float]:
    if not hits:
        return {}
    scores = [score for _, score in hits]
    top, bottom = max(scores), min(scores)
    if top > 0:
        bottom = min(bottom, floor * top)
    span = top - bottom
    if span <= 0:
        return {key: 1.0 for key, _ in hits}
    return {key: (score - bottom) / span for key, score in hits}


def convex(
    dense: Sequence[Scored], sparse: Sequence[Scored], alpha: float, floor: float = DEFAULT_FLOOR
) -> list[Scored]:
    """Convex combination of floored min-max normalised scores, best first."""
    dense_n, sparse_n = _normalised(dense, floor), _normalised(sparse, floor)
    fused = {key: alpha * value for key, value in dense_n.items()}
    for key, value in sparse_n.items():
        fused[key] = fused.get(key, 0.0) + (1.0 - alpha) * value
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def rrf(
    dense: Sequence[Scored], sparse: Sequence[Scored], alpha: float, k: int = DEFAULT_RRF_K
) -> list[Scored]:
    """Weighted reciprocal-rank fusion (ranks from 1), best first."""
    fused: dict[int, float] = {}
    for hits, weight in ((dense, alpha), (sparse, 1.0 - alpha)):
        ranked = sorted(hits, key=lambda item: -item[1])
        for rank, (key, _) in enumerate(ranked, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def fuse(
    dense: Sequence[Scored],
    sparse: Sequence[Scored],
    *,
    method: Fusion = DEFAULT_FUSION,
    alpha: float | None = None,
    floor: float = DEFAULT_FLOOR,
    rrf_k: int = DEFAULT_RRF_K,
) -> list[Scored]:
    """The fused ranking of two candidate lists; ``alpha`` None takes the tuned default."""
    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 (keywords only) and 1 (dense only), not {alpha}")
    # A side weighted 0 adds nothing to any score: its candidates would only pad the list at
    # 0, after the other side's hits, in id order.
    if alpha == 0.0:
        dense = ()
    elif alpha == 1.0:
        sparse = ()
    if method == "convex":
        return convex(dense, sparse, alpha, floor)
    if method == "rrf":
        return rrf(dense, sparse, alpha, rrf_k)
    raise ValueError(f"unknown fusion {method!r}; use 'convex' or 'rrf'")
