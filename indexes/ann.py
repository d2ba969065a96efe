"""Approximate search where it pays: the ``auto`` kind's large segments become IVF.

Exact (flat) search reads every vector: at 1M 640-d vectors that is 2.5 GB per query, far
from a 10 ms budget. Under ``index_kind="auto"`` (the default), a segment with fewer than
``auto_ivf_rows`` rows stays flat (exact, cheap to write, and small segments are where new
rows land) while the index is small, and a larger one is written as ``IVF,Flat``; once the
index holds ``auto_ivf_rows`` rows, so is every segment of ``auto_ivf_segment_rows`` (only
the smallest, newest segments stay flat; see :func:`wants_ivf`):

* **one quantizer, trained once and shared**: the first large segment trains the coarse
  centroids (k-means on a sample); later large segments copy them from the largest IVF
  segment of the index instead of training again, unless the index has outgrown them
  (the new segment would want more than ``2x`` their lists);
* **nprobe measured, not guessed**: after the vectors are added, held-out rows of the segment
  itself, slightly perturbed, are searched exactly and with growing ``nprobe``; the smallest
  ``nprobe`` whose recall@10 reaches ``auto_target_recall`` is stored in the segment;
* vectors stay exact inside the lists (``Flat``), so scores are the same inner products as
  flat search and reconstruct (merges, rebuilds) is lossless.

A user who pins a kind (flat, hnsw, ivf_flat, ivf_pq, a factory string) gets that kind in
every segment instead (`indexes.kinds`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from . import kinds
from .spec import IndexSpec

logger = logging.getLogger(__name__)

CALIBRATION_QUERIES = 200
NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TRAIN_POINTS_PER_CENTROID = 32


@dataclass(frozen=True)
class IvfBuild:
    """What building a large segment decided."""

    nlist: int
    nprobe: int
    recall: float
    trained: bool


class VectorSource(Protocol):
    """A segment's vectors in ascending id order, readable part by part: a merge's live rows
    come from several segments and need not be gathered into one array to be indexed."""

    def __len__(self) -> int: ...

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors)`` runs, in ascending id order."""
        ...

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at row ``positions`` (in that order)."""
        ...


@dataclass(frozen=True)
class ArrayVectors:
    """A :class:`VectorSource` over one array."""

    ids: np.ndarray
    x: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield self.ids, self.x

    def take(self, positions: np.ndarray) -> np.ndarray:
        return self.x[positions]


def gather(source: VectorSource, dim: int) -> np.ndarray:
    """All of ``source``'s vectors as one float32 array (for kinds that need them at once)."""
    if isinstance(source, ArrayVectors):
        return np.ascontiguousarray(source.x, dtype=np.float32)
    x = np.empty((len(source), dim), dtype=np.float32)
    at = 0
    for _, chunk in source.chunks():
        x[at : at + len(chunk)] = chunk
        at += len(chunk)
    return x


def wants_ivf(spec: IndexSpec, rows: int, index_rows: int = 0) -> bool:
    """Whether a segment of ``rows`` rows, in an index of ``index_rows`` live rows (the
    segment's own included), is written as IVF.

    A segment of ``auto_ivf_rows`` rows always is. Once the index holds that many rows, so is
    any segment of ``auto_ivf_segment_rows`` (and one written exact before is rewritten once,
    as the merge policy's ``outgrown``): a query reads every row of every flat segment,
    and the merge policy lets nine segments of one level stand side by side. An index ingested
    1,500 nodes a commit held nine flat segments of 15,000 rows at 135k nodes: a dense top 5
    took 26.1 ms and a hybrid query's store work 30.5 ms on an Intel Xeon; under this rule,
    1.2 and 4.0 ms at recall@10 0.991 (``benchmarks/results/segment_search.md``). A small index
    stays exact: reading all of it is cheap, and its answers are exact.
    """
    params = spec.params
    if spec.index_kind.lower() != "auto":
        return False
    return rows >= params.auto_ivf_rows or (rows >= params.auto_ivf_segment_rows and index_rows >= params.auto_ivf_rows)


def centroids_of(index: faiss.Index) -> np.ndarray | None:
    """The coarse centroids of an IVF segment index (None for other kinds)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def build_ivf(
    spec: IndexSpec, vectors: VectorSource, shared: np.ndarray | None
) -> tuple[faiss.Index, IvfBuild]:
    """An ``IVF,Flat`` index of ``vectors`` with a calibrated ``nprobe``, added run by run into
    presized lists (:func:`add_presized`): the index's inverted lists are the only full copy
    held, at their exact size (compacting 1M rows: 2.9 GiB of anonymous memory at the peak for
    2.4 GiB of vectors, against 3.7 GiB growing the lists and 5.9 GiB from one array)."""
    metric = kinds.metric_type(spec.metric)
    n = len(vectors)
    wanted = kinds.choose_nlist(n)
    reuse = shared is not None and wanted <= 2 * len(shared)
    rng = np.random.default_rng(n)
    if reuse:
        assert shared is not None
        centroids = np.ascontiguousarray(shared, dtype=np.float32)
    else:
        sample = vectors.take(rng.choice(n, size=min(n, wanted * TRAIN_POINTS_PER_CENTROID), replace=False))
        kmeans = faiss.Kmeans(spec.dim, wanted, niter=10, seed=1234, spherical=spec.metric == "ip")
        kmeans.cp.max_points_per_centroid = TRAIN_POINTS_PER_CENTROID
        kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
        centroids = kmeans.centroids
    quantizer = faiss.IndexFlatIP(spec.dim) if spec.metric == "ip" else faiss.IndexFlatL2(spec.dim)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, spec.dim, len(centroids), metric)
    index.own_fields = True
    quantizer.this.disown()
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    add_presized(index, vectors)
    nprobe, recall = calibrate_nprobe(index, vectors, spec, rng)
    index.nprobe = nprobe
    built = IvfBuild(nlist=len(centroids), nprobe=nprobe, recall=recall, trained=not reuse)
    logger.info(
        "IVF segment of %d rows: %d lists (%s), nprobe %d for recall@10 %.3f",
        n, built.nlist, "trained" if built.trained else "shared quantizer", nprobe, recall,
    )
    return index, built


def add_presized(index: faiss.IndexIVF, vectors: VectorSource) -> None:
    """Add ``vectors`` to an empty IVF index run by run, each inverted list allocated once at
    its final size: the same index, byte for byte, as adding them in one call.

    FAISS grows each list as a ``std::vector`` that doubles when full, so adding 1M rows run
    by run left the lists ~1.4x the vectors' size, plus the freed smaller buffers the heap
    keeps (200k x 640 rows: 671 MiB of anonymous memory for 488 MiB of vectors; presized:
    505 MiB). One pass assigns every row to its list (what ``add_with_ids`` would do, kept:
    8 bytes a row), each list is resized to its count and back to empty (a vector keeps its
    capacity when it shrinks), and a second pass adds the rows with their assignments.
    """
    in_memory = faiss.downcast_InvertedLists(index.invlists)
    if not isinstance(in_memory, faiss.ArrayInvertedLists) or index.ntotal:
        raise TypeError("add_presized takes an empty IVF index with in-memory inverted lists")
    assigned = np.empty(len(vectors), dtype=np.int64)
    at = 0
    for _, x in vectors.chunks():
        assigned[at : at + len(x)] = index.quantizer.assign(np.ascontiguousarray(x, dtype=np.float32), 1).ravel()
        at += len(x)
    for list_no, count in enumerate(np.bincount(assigned, minlength=index.nlist).tolist()):
        if count:
            in_memory.resize(list_no, count)
            in_memory.resize(list_no, 0)
    at = 0
    for ids, x in vectors.chunks():  # appended list by list in id order: as one add would
        rows = np.ascontiguousarray(x, dtype=np.float32)
        row_ids = np.ascontiguousarray(ids, dtype=np.int64)
        row_lists = np.ascontiguousarray(assigned[at : at + len(rows)])
        index.add_core(len(rows), faiss.swig_ptr(rows), faiss.swig_ptr(row_ids), faiss.swig_ptr(row_lists))
        at += len(rows)


def calibrate_nprobe(
    index: faiss.IndexIVF, vectors: VectorSource, spec: IndexSpec, rng: np.random.Generator
) -> tuple[int, float]:
    """The smallest nprobe whose recall@10 against exact search reaches the target, measured
    on perturbed rows of the segment itself (queries land near documents, as real ones do)."""
    target = spec.params.auto_target_recall
    n = len(vectors)
    k = min(10, n)
    picks = rng.choice(n, size=min(CALIBRATION_QUERIES, n), replace=False)
    base = vectors.take(picks)
    noise = rng.standard_normal((len(picks), base.shape[1])).astype(np.float32)
    xq = base + 0.5 * noise * np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(base.shape[1])
    if spec.metric == "ip":
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    truth = exact_neighbours(xq, vectors, k, spec.metric)
    recall = 0.0
    for nprobe in NPROBE_LADDER:
        if nprobe > index.nlist:
            break
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        _, found = index.search(xq, k, params=params)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))
        if recall >= target:
            return nprobe, recall
    return min(index.nlist, NPROBE_LADDER[-1]), recall


def exact_neighbours(xq: np.ndarray, vectors: VectorSource, k: int, metric: str) -> np.ndarray:
    """The ids of each query's ``k`` exact nearest vectors, searched run by run and merged."""
    best_scores = best_ids = None
    larger_is_better = metric == "ip"
    for ids, x in vectors.chunks():
        scores, positions = faiss.knn(xq, np.ascontiguousarray(x, dtype=np.float32), min(k, len(x)),
                                      metric=kinds.metric_type(metric))
        found = np.where(positions >= 0, np.asarray(ids)[np.maximum(positions, 0)], -1)
        if best_scores is not None and best_ids is not None:
            scores, found = np.hstack([best_scores, scores]), np.hstack([best_ids, found])
        order = np.argsort(-scores if larger_is_better else scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)
    assert best_ids is not None
    return best_ids
