"""The FAISS side of a store: one CPU index holding every vector under our stable int64 ids.

Training fallback (IVF, IVF-PQ and factory strings that must be trained):

1. Until the kind's training floor (`kinds.min_train_vectors`, 624 for the named IVF kinds) is
   reached, vectors wait in an exact ``IDMap2,Flat`` *staging* index and searches are exact,
   which at that size is both the most accurate and fast enough. With
   ``train_fallback='raise'`` an add that leaves fewer vectors raises `IndexTrainingError`.
2. The add that reaches the floor trains the real kind on every vector held (``nlist`` chosen
   from that count) and moves them in.
3. When the count has grown ``retrain_growth``-fold since training, `maintenance_reason` asks
   for a re-train (the store runs it at persist), so ``nlist`` keeps following the count.

Deletes: flat and IVF remove vectors for real. HNSW and IndexRefine cannot, so their ids become
*tombstones*: still in the structure, excluded from every search by an ``IDSelector``, and
dropped by a rebuild from the reconstructed live vectors once they exceed
``max_tombstone_fraction`` of the index (checked at persist, or `rebuild` on demand).

Filters arrive as the set of allowed ids. Sets of at most ``exact_filter_threshold`` ids are
searched exactly over their reconstructed vectors (cheaper than walking a graph for a handful of
ids, and always complete), as are sets an IVF search would scan more rows than to answer (its
probe grows with the share of rows a filter leaves out); larger sets go through the ANN index
with an ``IDSelectorBatch`` inside the search. A post-check re-runs exactly any row where the ANN search came back short
or with an id outside the allowed set, so a filtered or deleted vector is never returned.

Small query batches (an HTTP request) run FAISS on a single OpenMP thread: see
``SINGLE_THREAD_MAX_QUERIES``.

GPU (see `gpu`): a replica of the master serves unfiltered searches. GPU indexes take no
``IDSelector``, so filtered searches fall back to exact search over the allowed subset's
vectors reconstructed from the CPU master, and a replica is only built from a master without
tombstones (the master is compacted first).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import faiss
import numpy as np

from . import gpu, kinds
from .errors import IndexTrainingError
from .spec import IndexSpec

logger = logging.getLogger(__name__)

EXACT_BLOCK = 16384
# Batches this small search on one OpenMP thread: FAISS opens a parallel region even for one
# query (IndexIDMap2 label translation, HNSW), and when the cores are busy (the query encoder,
# other requests) waking the team costs ~10 ms, 25x the search itself on a 2-core machine.
SINGLE_THREAD_MAX_QUERIES = 16
# Training sets up to this many floats train on one thread for the same reason: PQ training runs
# thousands of tiny k-means steps, each a parallel region (5183 x 384 IVF-PQ: 50 s -> 5 s here).
SINGLE_THREAD_MAX_TRAIN_FLOATS = 8_000_000
Maintenance = Literal["compact", "retrain"]


class VectorIndex:
    """A FAISS index plus the state FAISS does not keep: training stage, tombstones, replica."""

    def __init__(
        self,
        spec: IndexSpec,
        index: faiss.Index,
        *,
        trained: bool,
        trained_on: int = 0,
        tombstones: np.ndarray | None = None,
        placement: gpu.Placement | None = None,
    ) -> None:
        self.spec = spec
        self.index = index
        self.trained = trained
        self.trained_on = trained_on
        self.min_train = kinds.min_train_vectors(spec)
        self.needs_training = kinds.needs_training(spec)
        self._dead: set[int] = set() if tombstones is None else {int(i) for i in tombstones}
        self._dead_arr: np.ndarray | None = None
        self._dead_selector: tuple[np.ndarray, faiss.IDSelector, faiss.IDSelector] | None = None
        self.placement = placement or gpu.Placement(reason="default")
        self._replica: gpu.Replica | None = None
        self._replica_stale = True

    @classmethod
    def empty(cls, spec: IndexSpec, placement: gpu.Placement | None = None) -> VectorIndex:
        """A new index holding nothing: the real kind, or the staging flat if it needs training."""
        if kinds.needs_training(spec):
            return cls(spec, kinds.build_staging(spec), trained=False, placement=placement)
        return cls(spec, kinds.build_index(spec, 0), trained=True, placement=placement)

    @classmethod
    def restore(
        cls,
        spec: IndexSpec,
        index: faiss.Index,
        *,
        trained: bool,
        trained_on: int,
        live_ids: np.ndarray,
        placement: gpu.Placement | None = None,
    ) -> VectorIndex:
        """Wrap a loaded index; the ids it holds beyond `live_ids` become tombstones.

        Raises ValueError when the index and the live id set cannot both be right.
        """
        if index.d != spec.dim:
            raise ValueError(f"index has dimension {index.d}, the manifest says {spec.dim}")
        if index.metric_type != kinds.metric_type(spec.metric):
            raise ValueError(f"index metric differs from the manifest's {spec.metric!r}")
        stored = kinds.stored_ids(index)
        live = np.asarray(live_ids, dtype=np.int64)
        missing = np.setdiff1d(live, stored)
        if missing.size:
            raise ValueError(f"{missing.size} ids listed in the docstore have no vector")
        dead = np.setdiff1d(stored, live)
        if dead.size and kinds.removal_mode(index) == "native":
            raise ValueError(f"{dead.size} vectors have no docstore row")
        return cls(
            spec,
            index,
            trained=trained,
            trained_on=trained_on,
            tombstones=dead,
            placement=placement,
        )

    # ----------------------------------------------------------------- state

    @property
    def ntotal(self) -> int:
        """Vectors in the structure, tombstones included."""
        return int(self.index.ntotal)

    @property
    def count(self) -> int:
        """Live (searchable) vectors."""
        return self.ntotal - len(self._dead)

    @property
    def tombstones(self) -> int:
        """Deleted vectors still inside a structure that cannot remove them."""
        return len(self._dead)

    @property
    def structure(self) -> str:
        """FAISS classes of the current structure, e.g. ``IndexIDMap2 > IndexHNSWFlat``."""
        return kinds.describe(self.index)

    def live_ids(self) -> np.ndarray:
        """Ids of every live vector."""
        ids = kinds.stored_ids(self.index)
        if self._dead:
            ids = ids[~np.isin(ids, self._dead_array())]
        return ids

    def _dead_array(self) -> np.ndarray:
        """The tombstoned ids, sorted (kept until the tombstones change)."""
        if self._dead_arr is None:
            self._dead_arr = np.sort(np.fromiter(self._dead, dtype=np.int64, count=len(self._dead)))
        return self._dead_arr

    def _is_dead(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` are tombstoned: a binary search each, not a pass over every
        tombstone as ``np.isin`` makes (a search checks its k hits)."""
        return members(self._dead_array(), ids)

    def _live_selector(self) -> faiss.IDSelector:
        """An IDSelector passing every id but the tombstoned ones, built once per set of
        tombstones: building it (a hash set of every tombstone) on every search cost 0.43 ms a
        query with 20,000 tombstones, more than the IVF search itself."""
        dead = self._dead_array()
        cached = self._dead_selector
        if cached is None or cached[0] is not dead:
            inner = faiss.IDSelectorBatch(dead)
            cached = (dead, inner, faiss.IDSelectorNot(inner))  # the array and inner selector kept alive
            self._dead_selector = cached
        return cached[2]

    # ------------------------------------------------------------- mutation

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Add vectors `x` under `ids` (training the kind when this add reaches its floor)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(ids) == 0:
            return
        if not self.trained:
            total = self.ntotal + len(ids)
            if total >= self.min_train:
                held = self.live_ids()
                all_ids = np.concatenate([held, ids])
                all_x = np.concatenate([self.reconstruct(held), x]) if len(held) else x
                self._train_and_fill(all_ids, all_x)
                return
            if self.spec.params.train_fallback == "raise":
                raise IndexTrainingError.too_few(self.spec.index_kind, self.min_train, total)
        self.index.add_with_ids(x, ids)
        self._replica_add(ids, x)

    def remove(self, ids: np.ndarray) -> None:
        """Delete `ids`: for real where the structure can, as tombstones where it cannot."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if kinds.removal_mode(self.index) == "native":
            kinds.remove_ids(self.index, ids)
        else:
            self._dead.update(int(i) for i in ids)
            self._dead_arr = None
        self._replica_stale = True

    def reset(self) -> None:
        """Drop every vector (the kind goes back to staging if it needs training)."""
        fresh = VectorIndex.empty(self.spec, self.placement)
        self.index, self.trained, self.trained_on = fresh.index, fresh.trained, 0
        self._dead, self._dead_arr = set(), None
        self._replica_stale = True

    def _train_and_fill(self, ids: np.ndarray, x: np.ndarray) -> None:
        index = kinds.build_index(self.spec, len(ids))
        small = x.size <= SINGLE_THREAD_MAX_TRAIN_FLOATS
        try:
            with _omp_threads(1 if small else None):
                index.train(x)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            raise IndexTrainingError.too_few(
                self.spec.index_kind, max(self.min_train, len(ids) + 1), len(ids), detail
            ) from exc
        index.add_with_ids(x, ids)
        self.index, self.trained, self.trained_on = index, True, len(ids)
        self._dead, self._dead_arr = set(), None
        self._replica_stale = True
        logger.info("trained %s on %d vectors: %s", self.spec.index_kind, len(ids), self.structure)

    def train(self) -> None:
        """Train (or re-train) the kind on the vectors held now; needs the training floor."""
        if not self.needs_training:
            return
        live = self.live_ids()
        if len(live) < self.min_train:
            raise IndexTrainingError.too_few(self.spec.index_kind, self.min_train, len(live))
        self._train_and_fill(live, self.reconstruct(live))

    def maintenance_reason(self) -> Maintenance | None:
        """Why the structure should be rebuilt now, if it should."""
        p = self.spec.params
        if self._dead and len(self._dead) > p.max_tombstone_fraction * max(self.ntotal, 1):
            return "compact"
        chooses_from_count = kinds.is_named(self.spec.index_kind) and p.nlist is None
        if (
            self.trained
            and chooses_from_count
            and self.needs_training
            and self.count >= p.retrain_growth * max(self.trained_on, 1)
        ):
            return "retrain"
        return None

    def rebuild(self, *, retrain: bool = False) -> None:
        """Rebuild from the live vectors: drops tombstones; `retrain` re-learns IVF/PQ too."""
        live = self.live_ids()
        x = self.reconstruct(live) if len(live) else np.empty((0, self.spec.dim), np.float32)
        if self.needs_training and (retrain or not self.trained):
            if len(live) >= self.min_train:
                self._train_and_fill(live, x)
                return
            if self.spec.params.train_fallback == "exact" or not self.trained:
                staging = kinds.build_staging(self.spec)
                if len(live):
                    staging.add_with_ids(x, live)
                self.index, self.trained, self.trained_on = staging, False, 0
                self._dead, self._dead_arr = set(), None
                self._replica_stale = True
                return
        # Same structure, same training (centroids kept), without the dead vectors.
        fresh = (
            faiss.clone_index(self.index)
            if self.needs_training and self.trained
            else kinds.build_index(self.spec, len(live))
        )
        fresh.reset()
        if len(live):
            fresh.add_with_ids(x, live)
        self.index = fresh
        self._dead, self._dead_arr = set(), None
        self._replica_stale = True

    # --------------------------------------------------------------- reading

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of `ids` (exact for our named kinds; lossy for bare PQ codes)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.empty((0, self.spec.dim), dtype=np.float32)
        return self.index.reconstruct_batch(ids)

    def search(
        self,
        xq: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` (scores, ids) per query row, restricted to `allowed` ids when given.

        Missing results are id -1. Scores are FAISS's: inner product, or squared L2.
        """
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        nq = len(xq)
        if k <= 0 or self.count == 0 or nq == 0:
            return self._empty(nq, max(k, 0))
        with _omp_threads(1 if nq <= SINGLE_THREAD_MAX_QUERIES else None):
            return self._search(
                xq, k, allowed, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor
            )

    def _search(
        self,
        xq: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
        *,
        nprobe: int | None,
        ef_search: int | None,
        k_factor: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        nq = len(xq)
        knobs = {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor}
        replica = self._ready_replica()
        keep: list[Any] = []
        if allowed is not None:
            allowed = _ascending_unique(np.asarray(allowed, dtype=np.int64))
            if self._dead:
                allowed = allowed[~self._is_dead(allowed)]
            if len(allowed) == 0:
                return self._empty(nq, k)
            if (
                len(allowed) <= self.spec.params.exact_filter_threshold
                or replica is not None
                or (knobs["nprobe"] is None and len(allowed) <= self._rows_probed(k, len(allowed)))
            ):
                # Small sets: exact is cheaper than an ANN walk and never misses. GPU indexes
                # take no IDSelector: search the subset exactly from the CPU master instead.
                # An IVF probe grown for a selective filter would scan more rows than it allows.
                return self.exact_search(xq, k, allowed)
            sel: faiss.IDSelector | None = faiss.IDSelectorBatch(allowed)
        elif self._dead:
            sel = self._live_selector()
        else:
            sel = None
            if replica is not None and not any(v is not None for v in knobs.values()):
                # A short answer is widened on the CPU master (rows of that query only).
                scores, ids = self._widened(xq, k, *replica.index.search(xq, k), None, knobs)
                return self._verified(xq, k, scores, ids, None)
        if knobs["nprobe"] is None:
            ivf, _ = kinds.approximate_parts(self.index)
            if ivf is not None:  # tombstones or a filter leave a share of each list searchable
                searchable = self.count if allowed is None else len(allowed)
                knobs["nprobe"] = kinds.probes_for(ivf, k, searchable / max(self.ntotal, 1))
        params, held = kinds.search_parameters(self.index, sel, **knobs)
        keep.extend(held)
        scores, ids = self.index.search(xq, k, params=params)
        if allowed is None:
            scores, ids = self._widened(xq, k, scores, ids, sel, knobs)
        return self._verified(xq, k, scores, ids, allowed)

    def _rows_probed(self, k: int, searchable: int) -> float:
        """Rows an IVF search for top ``k`` scans when ``searchable`` rows may be returned (the
        probe grows as they get fewer: `kinds.probes_for`); 0 for other structures, whose
        filtered search keeps its usual path."""
        ivf, _ = kinds.approximate_parts(self.index)
        if ivf is None or ivf.nlist <= 0:
            return 0.0
        probe = kinds.probes_for(ivf, k, searchable / max(self.ntotal, 1))
        return probe * ivf.ntotal / ivf.nlist

    def _widened(
        self, xq: np.ndarray, k: int, scores: np.ndarray, ids: np.ndarray,
        sel: faiss.IDSelector | None, knobs: dict[str, Any],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries an approximate structure answered short (fewer than k hits while more rows
        are live: an IVF probe tuned for k=10 over lists of a few dozen rows, tombstones)
        searched again with 4x the probe (IVF lists, HNSW efSearch) until complete or the probe
        covers everything; :meth:`_verified` redoes what is still short exactly. Widening is
        cheap next to the exact pass over the segment it used to take (hybrid queries ask for
        100 dense candidates: p50 5 -> 25 ms at 100k rows)."""
        want = min(k, self.count)
        short = (ids >= 0).sum(axis=1) < want
        if not short.any():  # the usual case: no structure to look into
            return scores, ids
        ivf, hnsw = kinds.approximate_parts(self.index)
        if ivf is None and hnsw is None:
            return scores, ids
        nprobe = int(knobs.get("nprobe") or (ivf.nprobe if ivf is not None else 0))
        ef = int(knobs.get("ef_search") or (hnsw.hnsw.efSearch if hnsw is not None else 0))
        scores, ids = scores.copy(), ids.copy()
        while short.any():
            wider_ivf = ivf is not None and nprobe < ivf.nlist
            wider_hnsw = hnsw is not None and ef < self.ntotal
            if not (wider_ivf or wider_hnsw):
                break
            if wider_ivf:
                nprobe = min(nprobe * 4, int(ivf.nlist))
            if wider_hnsw:
                ef = min(max(ef, k) * 4, self.ntotal)
            params, keep = kinds.search_parameters(
                self.index, sel, nprobe=nprobe or None, ef_search=ef or None, k_factor=knobs.get("k_factor")
            )
            rows = np.flatnonzero(short)
            scores[rows], ids[rows] = self.index.search(xq[rows], k, params=params)
            del keep
            short = (ids >= 0).sum(axis=1) < want
        return scores, ids

    def exact_search(
        self, xq: np.ndarray, k: int, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-`k` over the vectors of `ids` only, streamed in blocks."""
        metric = kinds.metric_type(self.spec.metric)
        heap = faiss.ResultHeap(len(xq), k, keep_max=metric == faiss.METRIC_INNER_PRODUCT)
        for start in range(0, len(ids), EXACT_BLOCK):
            block = ids[start : start + EXACT_BLOCK]
            scores, pos = faiss.knn(xq, self.reconstruct(block), min(k, len(block)), metric=metric)
            heap.add_result(scores, np.where(pos >= 0, block[np.maximum(pos, 0)], -1))
        heap.finalize()
        return heap.D, heap.I

    def _verified(
        self,
        xq: np.ndarray,
        k: int,
        scores: np.ndarray,
        ids: np.ndarray,
        allowed: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        # Belt and braces: whatever the structure did with the selector, never hand out an id
        # outside the allowed set, and do not come back short when more matches exist.
        # An approximate structure comes back short when the lists or graph nodes it visits
        # hold fewer than k rows (few rows per IVF list, nprobe tuned for k=10, tombstones):
        # those rows are redone exactly too, as filtered ones are.
        found = ids >= 0
        if allowed is not None:
            outside = found & ~members(allowed, ids)
            short = found.sum(axis=1) < min(k, len(allowed))
        else:
            outside = found & self._is_dead(ids) if self._dead else np.zeros_like(found)
            short = found.sum(axis=1) < min(k, self.count)
        bad = outside.any(axis=1) | short
        if bad.any():
            subset = allowed if allowed is not None else self.live_ids()
            logger.debug("redoing %d of %d rows exactly", int(bad.sum()), len(ids))
            scores, ids = scores.copy(), ids.copy()
            scores[bad], ids[bad] = self.exact_search(xq[bad], k, subset)
        return scores, ids

    def _empty(self, nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((nq, k), dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)

    # ------------------------------------------------------------------- GPU

    def _ready_replica(self) -> gpu.Replica | None:
        if not self.placement.on_gpu:
            return None
        if self._replica is not None and not self._replica_stale:
            return self._replica
        if self._dead:
            self.rebuild()
        try:
            self._replica = gpu.clone_to_gpu(self.index, self.placement)
        except Exception as exc:  # e.g. HNSW and IndexRefine have no GPU version
            logger.warning(
                "index %s cannot be searched on %s (%s); searching on the CPU",
                self.structure,
                self.placement.describe(),
                str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
            )
            self.placement = gpu.Placement(reason=f"{self.structure} cannot be cloned to GPU")
            self._replica = None
            return None
        ivf = faiss.try_extract_index_ivf(self.index)
        gpu.set_nprobe(self._replica, ivf.nprobe if ivf is not None else None)
        self._replica_stale = False
        return self._replica

    def _replica_add(self, ids: np.ndarray, x: np.ndarray) -> None:
        if self._replica is None or self._replica_stale:
            return
        try:
            self._replica.index.add_with_ids(x, ids)
        except Exception:  # a replica that cannot add is simply re-cloned before next search
            self._replica_stale = True


@contextmanager
def _omp_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` OpenMP threads (None: leave FAISS's setting alone)."""
    if count is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _ascending_unique(ids: np.ndarray) -> np.ndarray:
    """``ids`` sorted without repeats: as they are when they already are (the store hands each
    segment its allowed ids so), where ``np.unique`` spent 0.5 ms a segment hashing 6,000 ids
    on every filtered search."""
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return ids
    return np.unique(ids)


def members(ascending: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` are in ``ascending`` (sorted, unique): a binary search each (np.isin
    sorts both)."""
    if len(ascending) == 0:
        return np.zeros(np.shape(ids), dtype=bool)
    at = np.minimum(np.searchsorted(ascending, ids), len(ascending) - 1)
    return ascending[at] == ids
