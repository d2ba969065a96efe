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

Both fuse within a fixed window per side, the top `CANDIDATES` hits (the depth the defaults were
tuned at): a side's scores are normalised by its window's range, and a hit below the window
adds to a score only as a tie-break, as if it were missing. A deeper list (a caller asking for
more than `CANDIDATES` results) then extends the ranking below the window without moving what
is above it: when the range came from the whole list, asking for 160 results instead of 100
lowered the sparse side's bottom score and reordered the first ten.

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


def _ranked_hits(hits: Sequence[Scored]) -> list[Scored]:
    """``hits`` best first (a stable sort: ties keep the side's own order)."""
    return sorted(hits, key=lambda item: -item[1])


def _normalised(ranked: Sequence[Scored], floor: float, window: int | None = None) -> list[float]:
    """Each score of a best-first list mapped by its window's floored range: the window's top
    is 1 and its bottom (at most ``floor`` times a positive top) 0."""
    if not ranked:
        return []
    scores = [score for _, score in ranked]
    inside = scores if window is None else scores[:window]
    top, bottom = inside[0], inside[-1]
    if top > 0:
        bottom = min(bottom, floor * top)
    span = top - bottom
    if span <= 0:
        return [1.0 if score >= top else score - top for score in scores]
    return [(score - bottom) / span for score in scores]


def _combined(sides: Sequence[tuple[list[Scored], list[float], int | None]]) -> list[Scored]:
    """Sum each side's values over its hits, best first, ties by id. A hit ranked below its
    side's window adds nothing to the score, as a missing one does; a hit in no window comes
    after those in one, ordered by all its values (the tail a deeper list extends)."""
    primary: dict[int, float] = {}
    extended: dict[int, float] = {}
    windowed: set[int] = set()
    for ranked, values, window in sides:
        for rank, ((key, _), value) in enumerate(zip(ranked, values, strict=True)):
            inside = window is None or rank < window
            primary[key] = primary.get(key, 0.0) + (value if inside else 0.0)
            extended[key] = extended.get(key, 0.0) + value
            if inside:
                windowed.add(key)
    order = sorted(primary, key=lambda key: (-primary[key], key not in windowed,
                                             0.0 if key in windowed else -extended[key], key))
    return [(key, primary[key]) for key in order]


def convex(
    dense: Sequence[Scored], sparse: Sequence[Scored], alpha: float, floor: float = DEFAULT_FLOOR,
    dense_window: int | None = None, sparse_window: int | None = None,
) -> list[Scored]:
    """Convex combination of floored min-max normalised scores, best first; each side counts
    its best ``*_window`` hits (None: the whole list)."""
    sides = []
    for hits, weight, window in ((dense, alpha, dense_window), (sparse, 1.0 - alpha, sparse_window)):
        ranked = _ranked_hits(hits)
        sides.append((ranked, [weight * value for value in _normalised(ranked, floor, window)], window))
    return _combined(sides)


def rrf(
    dense: Sequence[Scored], sparse: Sequence[Scored], alpha: float, k: int = DEFAULT_RRF_K,
    dense_window: int | None = None, sparse_window: int | None = None,
) -> list[Scored]:
    """Weighted reciprocal-rank fusion (ranks from 1), best first; each side counts its best
    ``*_window`` hits (None: the whole list)."""
    sides = []
    for hits, weight, window in ((dense, alpha, dense_window), (sparse, 1.0 - alpha, sparse_window)):
        ranked = _ranked_hits(hits)
        sides.append((ranked, [weight / (k + rank) for rank in range(1, len(ranked) + 1)], window))
    return _combined(sides)


def fuse(
    dense: Sequence[Scored],
    sparse: Sequence[Scored],
    *,
    method: Fusion = DEFAULT_FUSION,
    alpha: float | None = None,
    floor: float = DEFAULT_FLOOR,
    rrf_k: int = DEFAULT_RRF_K,
    dense_window: int | None = CANDIDATES,
    sparse_window: int | None = CANDIDATES,
) -> list[Scored]:
    """The fused ranking of two candidate lists; ``alpha`` None takes the tuned default. Each
    side counts its best ``*_window`` hits (None: all of them; see the module's note)."""
    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 (keywords only) and 1 (dense only), not {alpha}")
    # A side weighted 0 adds nothing to any score: its candidates would only pad the list at
    # 0, after the other side's hits, in id order.
    if alpha == 0.0:
        dense = ()
    elif alpha == 1.0:
        sparse = ()
    windows = {"dense_window": dense_window, "sparse_window": sparse_window}
    if method == "convex":
        return convex(dense, sparse, alpha, floor, **windows)
    if method == "rrf":
        return rrf(dense, sparse, alpha, rrf_k, **windows)
    raise ValueError(f"unknown fusion {method!r}; use 'convex' or 'rrf'")
