"""Approximate search where it pays: the ``auto`` kind's large segments become IVF.

Exact (flat) search reads every vector: at 1M 640-d vectors that is 2.5 GB per query, far
from a 10 ms budget. Under ``index_kind="auto"`` (the default), a segment with fewer than
``auto_ivf_rows`` rows stays flat (exact, cheap to write, and small segments are where new
rows land), and a larger one, which only merges produce, is written as ``IVF,Flat``:

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
from dataclasses import dataclass

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


def wants_ivf(spec: IndexSpec, rows: int) -> bool:
    """Whether a segment of ``rows`` rows of this index is written as IVF."""
    return spec.index_kind.lower() == "auto" and rows >= spec.params.auto_ivf_rows


def centroids_of(index: faiss.Index) -> np.ndarray | None:
    """The coarse centroids of an IVF segment index (None for other kinds)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def build_ivf(
    spec: IndexSpec, ids: np.ndarray, x: np.ndarray, shared: np.ndarray | None
) -> tuple[faiss.Index, IvfBuild]:
    """An ``IVF,Flat`` index of ``x`` under ``ids`` with a calibrated ``nprobe``."""
    metric = kinds.metric_type(spec.metric)
    wanted = kinds.choose_nlist(len(ids))
    reuse = shared is not None and wanted <= 2 * len(shared)
    rng = np.random.default_rng(len(ids))
    if reuse:
        assert shared is not None
        centroids = np.ascontiguousarray(shared, dtype=np.float32)
    else:
        sample = x[rng.choice(len(x), size=min(len(x), wanted * TRAIN_POINTS_PER_CENTROID), replace=False)]
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
    index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    nprobe, recall = calibrate_nprobe(index, x, spec, rng)
    index.nprobe = nprobe
    built = IvfBuild(nlist=len(centroids), nprobe=nprobe, recall=recall, trained=not reuse)
    logger.info(
        "IVF segment of %d rows: %d lists (%s), nprobe %d for recall@10 %.3f",
        len(ids), built.nlist, "trained" if built.trained else "shared quantizer", nprobe, recall,
    )
    return index, built


def calibrate_nprobe(
    index: faiss.IndexIVF, x: np.ndarray, spec: IndexSpec, rng: np.random.Generator
) -> tuple[int, float]:
    """The smallest nprobe whose recall@10 against exact search reaches the target, measured
    on perturbed rows of the segment itself (queries land near documents, as real ones do)."""
    target = spec.params.auto_target_recall
    n = len(x)
    k = min(10, n)
    picks = rng.choice(n, size=min(CALIBRATION_QUERIES, n), replace=False)
    noise = rng.standard_normal((len(picks), x.shape[1])).astype(np.float32)
    xq = x[picks] + 0.5 * noise * np.linalg.norm(x[picks], axis=1, keepdims=True) / np.sqrt(x.shape[1])
    if spec.metric == "ip":
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    _, exact = faiss.knn(xq, np.ascontiguousarray(x, dtype=np.float32), k, metric=kinds.metric_type(spec.metric))
    truth = _row_ids(index, exact)
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


def _row_ids(index: faiss.IndexIVF, positions: np.ndarray) -> np.ndarray:
    """Map exact-search row positions to the ids the IVF index holds (added in row order)."""
    stored = _ids_in_add_order(index)
    return np.where(positions >= 0, stored[np.maximum(positions, 0)], -1)


def _ids_in_add_order(index: faiss.IndexIVF) -> np.ndarray:
    # The caller added rows in ascending id order (segments are), so sorting recovers it.
    return np.sort(kinds.stored_ids(index))
