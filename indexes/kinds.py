"""Index kinds: which FAISS structure a kind builds, when it must be trained, how it is searched.

Named kinds (any other string is taken as a FAISS factory string):

========  =====================================  ==========================================
kind      FAISS structure                        deletes
========  =====================================  ==========================================
flat      ``IDMap2,Flat`` (exact, the default)   ``remove_ids``
hnsw      ``IDMap2,HNSW{M}``                     tombstones (HNSW cannot remove)
ivf_flat  ``IVF{nlist},Flat`` + hashtable map    ``remove_ids`` (IVF holds our ids itself)
ivf_pq    ``IDMap2,IVF{nlist},PQ{m}x{b},RFlat``  tombstones (IndexRefine cannot remove)
========  =====================================  ==========================================

Every structure carries our stable int64 ids: IVF stores them natively (``IDMap2`` around an
IVF would be wrong after a removal, because IVF does not renumber its rows), everything else is
wrapped in ``IndexIDMap2`` so that ``reconstruct`` by id works for rebuilds.

Training (IVF, PQ): ``nlist`` is chosen from the count at training time, the power of two at or
below ``4 * sqrt(n)`` while keeping 39 points per list (FAISS's own k-means warning level), so
the floor is ``39 * 16 = 624`` vectors. PQ code width comes from the count too (8 bits needs
``39 * 256`` points, fewer points get fewer bits, down to 4). Below the floor the store serves
exact search or refuses (see `vectors`). IVF-PQ skips polysemous training: we re-rank exactly
(``RFlat``), so Hamming filtering would only cost minutes of training for nothing, and
k-means samples at most 64 points per centroid (FAISS's default is 256): training is up to 4x
faster on large sets and recall did not move in our measurements.

Default search knobs were measured on MiniLM SciFact titles and Gaussian mixtures to give
recall@10 >= 0.95 against exact search: HNSW efSearch 128, IVF ``nprobe ~ 4 * sqrt(nlist)``,
IVF-PQ re-ranking ``8 * k`` candidates.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import faiss
import numpy as np

from .errors import UnsupportedIndexKindError
from .spec import IndexParams, IndexSpec, Metric

NAMED_KINDS = ("auto", "flat", "hnsw", "ivf_flat", "ivf_pq")
"""``auto``: flat segments, IVF once a segment is large (see `indexes.ann`)."""
POINTS_PER_CENTROID = 39
MIN_NLIST = 16
MIN_PQ_NBITS = 4
TRAIN_POINTS_PER_CENTROID = 64  # k-means sample cap (FAISS default 256): 4x faster, same recall

RemovalMode = Literal["native", "tombstone"]


def metric_type(metric: Metric) -> int:
    """FAISS metric constant for our metric name."""
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def is_named(kind: str) -> bool:
    """Whether `kind` is one of our names rather than a FAISS factory string."""
    return kind.lower() in NAMED_KINDS


def choose_nlist(n: int) -> int:
    """IVF list count for `n` training vectors: ~4*sqrt(n), at least 39 points per list."""
    target = min(4.0 * math.sqrt(max(n, 1)), n / POINTS_PER_CENTROID)
    return max(1, 2 ** int(math.floor(math.log2(max(target, 1.0)))))


def choose_nprobe(nlist: int) -> int:
    """IVF lists probed per query: ~4*sqrt(nlist) (a quarter of 256 lists, 1/8 of 1024)."""
    return max(1, min(nlist, math.ceil(4.0 * math.sqrt(nlist))))


#: Rows an IVF search expects its probed lists to hold per hit it must return, when the caller
#: names no nprobe (see :func:`probes_for`).
PROBED_ROWS_PER_HIT = 2


def probes_for(ivf: Any, k: int, searchable: float = 1.0) -> int:
    """IVF lists to probe for a top-``k`` search: the stored nprobe (set for recall@10), or more
    where those lists are expected to hold fewer than ``PROBED_ROWS_PER_HIT * k`` rows.

    Why: a hybrid query asks each segment for 100 dense candidates. An auto segment of 20k rows
    has 512 lists of ~39 rows and probes 2-4 of them, so about a third of its searches came
    back short and were searched again with 4x the probe (`vectors.VectorIndex._widened`): two
    searches where one a little wider does. A search still short after this is widened as before.

    ``searchable``: the share of the rows that are live and allowed by the query's filter
    (tombstones and filtered-out rows are searched past). The probed lists then hold that
    share of candidates, so the probe grows by its inverse: with 90% of 40,000 rows deleted,
    the stored probe gave recall@10 0.973 and top-100 0.784; probing 10x the lists, 1.000 and
    0.931 (+0.03-0.16 ms). A filter allowing 2,100 of a 20,000-row segment's rows had recall@10
    0.935 at the stored probe (filters up to ``exact_filter_threshold`` rows are searched
    exactly); a probe grown by the filter's share keeps the filtered search's recall near the
    unfiltered one, at about the cost of the exact search it replaces at that size.
    """
    stored = int(ivf.nprobe)
    if ivf.ntotal <= 0:
        return stored
    share = min(max(searchable, 1.0 / ivf.ntotal), 1.0)
    rows_per_list = ivf.ntotal / ivf.nlist * share
    wanted = max(math.ceil(stored / share), math.ceil(PROBED_ROWS_PER_HIT * k / rows_per_list))
    return int(min(ivf.nlist, wanted))


def choose_pq_m(dim: int) -> int:
    """PQ sub-quantizer count: the largest divisor of `dim` at most dim/8 (8 dims per code)."""
    for m in range(max(1, dim // 8), 0, -1):
        if dim % m == 0:
            return m
    return 1


def choose_pq_nbits(n: int) -> int:
    """Bits per PQ code that `n` training points can support (39 points per centroid)."""
    bits = int(math.floor(math.log2(max(n, 1) / POINTS_PER_CENTROID))) if n > 0 else 0
    return max(MIN_PQ_NBITS, min(8, bits))


def _strip_idmap(kind: str) -> str:
    # We add the id map ourselves (IDMap would lose reconstruct, IDMap2 around IVF breaks
    # removal), so a user's prefix is dropped rather than doubled.
    for prefix in ("IDMap2,", "IDMap,"):
        if kind.startswith(prefix):
            return kind[len(prefix) :]
    return kind


def _probe(spec: IndexSpec) -> faiss.Index:
    try:
        return faiss.index_factory(
            spec.dim, _strip_idmap(spec.index_kind), metric_type(spec.metric)
        )
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise UnsupportedIndexKindError(
            f"index_kind {spec.index_kind!r} is neither a kind name ({', '.join(NAMED_KINDS)}) "
            f"nor a FAISS factory string valid for dim={spec.dim}: {first}"
        ) from exc


def keeps_vectors(index: faiss.Index) -> bool:
    """Whether ``index`` stores its vectors exactly or as 8/16-bit scalars (a refine step
    counts): merges, compaction and ``rebuild --keep-vectors`` read the vectors back from it."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap | faiss.IndexIDMap2):
        return keeps_vectors(inner.index)
    if isinstance(inner, faiss.IndexRefine):
        return keeps_vectors(inner.refine_index)
    if isinstance(inner, faiss.IndexFlat | faiss.IndexIVFFlat | faiss.IndexHNSWFlat):
        return True
    if isinstance(inner, faiss.IndexScalarQuantizer | faiss.IndexIVFScalarQuantizer):
        return inner.sq.qtype in _NEAR_EXACT_SCALARS
    if isinstance(inner, faiss.IndexHNSW):
        return keeps_vectors(inner.storage)
    return False  # PQ, LSH, residual codes, a PCA/OPQ transform in front: lossy or unknown


_NEAR_EXACT_SCALARS = {
    faiss.ScalarQuantizer.QT_8bit,
    faiss.ScalarQuantizer.QT_fp16,
    getattr(faiss.ScalarQuantizer, "QT_bf16", faiss.ScalarQuantizer.QT_fp16),
}


def validate_spec(spec: IndexSpec) -> None:
    """Fail early, with a clear message, on a factory string FAISS cannot build, or one that
    keeps only compressed codes of the vectors: a segment's vectors are read back from its
    index by every merge, compaction and ``rebuild --keep-vectors``, so the originals would be
    lost at the first one (``PQ8``: stored vectors at cosine 0.93 to the originals, recall@10
    0.54 after a compaction in a trial). Indexes created before this check still open."""
    if spec.index_kind.lower() == "ivf_pq" and spec.params.pq_m and spec.dim % spec.params.pq_m:
        raise UnsupportedIndexKindError(f"pq_m={spec.params.pq_m} must divide dim={spec.dim}")
    if not is_named(spec.index_kind) and not keeps_vectors(_probe(spec)):
        raise UnsupportedIndexKindError(
            f"index_kind {spec.index_kind!r} keeps only compressed codes of the vectors, and "
            "merges, compaction and `rebuild --keep-vectors` read the vectors back from the "
            "index: the originals would be lost at the first merge. Use ivf_pq (PQ codes plus "
            "the exact vectors for re-ranking), append ',RFlat' to the factory string, or a "
            "structure that keeps the vectors (Flat, HNSW32, IVF1024,Flat, IVF1024,SQ8)"
        )


def needs_training(spec: IndexSpec) -> bool:
    """Whether the kind learns from data (IVF, PQ) before vectors can be added."""
    kind = spec.index_kind.lower()
    if is_named(kind):
        return kind in ("ivf_flat", "ivf_pq")
    return not _probe(spec).is_trained


def min_train_vectors(spec: IndexSpec) -> int:
    """Fewest vectors the kind can be trained on (0 when it needs no training)."""
    if not needs_training(spec):
        return 0
    p = spec.params
    if p.min_train_vectors:
        return p.min_train_vectors
    kind = spec.index_kind.lower()
    if kind == "ivf_flat":
        return POINTS_PER_CENTROID * (p.nlist or MIN_NLIST)
    if kind == "ivf_pq":
        ksub = 2 ** (p.pq_nbits or MIN_PQ_NBITS)
        return POINTS_PER_CENTROID * max(p.nlist or MIN_NLIST, ksub)
    probe = _probe(spec)
    ivf = faiss.try_extract_index_ivf(probe)
    nlist = ivf.nlist if ivf is not None else 1
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else probe), "pq", None)
    ksub = int(pq.ksub) if pq is not None else 1
    return POINTS_PER_CENTROID * max(nlist, ksub, 1)


def factory_string(spec: IndexSpec, n_train: int) -> str:
    """The FAISS factory string built for `spec` when trained on `n_train` vectors."""
    p: IndexParams = spec.params
    kind = spec.index_kind.lower()
    if kind in ("flat", "auto"):  # auto's large segments are built by indexes.ann
        return "IDMap2,Flat"
    if kind == "hnsw":
        return f"IDMap2,HNSW{p.hnsw_m}"
    if kind == "ivf_flat":
        return f"IVF{p.nlist or choose_nlist(n_train)},Flat"
    if kind == "ivf_pq":
        nlist = p.nlist or choose_nlist(n_train)
        m = p.pq_m or choose_pq_m(spec.dim)
        nbits = p.pq_nbits or choose_pq_nbits(n_train)
        return f"IDMap2,IVF{nlist},PQ{m}x{nbits},RFlat"
    bare = _strip_idmap(spec.index_kind)
    probe = faiss.downcast_index(_probe(spec))
    return bare if isinstance(probe, faiss.IndexIVF) else f"IDMap2,{bare}"


def build_index(spec: IndexSpec, n_train: int) -> faiss.Index:
    """An empty index of the kind (untrained if the kind needs training), knobs set."""
    index = faiss.index_factory(spec.dim, factory_string(spec, n_train), metric_type(spec.metric))
    _configure(index, spec.params)
    return index


def build_staging(spec: IndexSpec) -> faiss.Index:
    """The exact ``IDMap2,Flat`` index that holds vectors until the real kind can be trained."""
    index = faiss.index_factory(spec.dim, "IDMap2,Flat", metric_type(spec.metric))
    return index


def _configure(index: faiss.Index, p: IndexParams) -> None:
    for layer in layers(index):
        if isinstance(layer, faiss.IndexHNSW):
            layer.hnsw.efConstruction = p.hnsw_ef_construction
            layer.hnsw.efSearch = p.hnsw_ef_search
        elif isinstance(layer, faiss.IndexIVF):
            layer.nprobe = p.nprobe or choose_nprobe(layer.nlist)
            layer.cp.max_points_per_centroid = TRAIN_POINTS_PER_CENTROID
            if isinstance(layer, faiss.IndexIVFPQ):
                layer.do_polysemous_training = False
                layer.pq.cp.max_points_per_centroid = TRAIN_POINTS_PER_CENTROID
        elif isinstance(layer, faiss.IndexRefine):
            layer.k_factor = p.refine_k_factor
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIVF):
        # A hashtable direct map gives reconstruct-by-id and removal with arbitrary 64-bit ids.
        top.set_direct_map_type(faiss.DirectMap.Hashtable)


def layers(index: faiss.Index) -> list[Any]:
    """The FAISS objects nested in `index`, outermost first, each downcast to its class."""
    out: list[Any] = []
    node: Any = faiss.downcast_index(index)
    while node is not None:
        out.append(node)
        if isinstance(node, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
            node = faiss.downcast_index(node.index)
        elif isinstance(node, faiss.IndexRefine):
            node = faiss.downcast_index(node.base_index)
        else:
            node = None
    return out


def describe(index: faiss.Index) -> str:
    """Human-readable structure, e.g. ``IndexIDMap2 > IndexHNSWFlat``."""
    return " > ".join(type(layer).__name__ for layer in layers(index))


def removal_mode(index: faiss.Index) -> RemovalMode:
    """'native' when ``remove_ids`` is correct for this structure, else 'tombstone'."""
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIVF):
        return "native"
    if isinstance(top, faiss.IndexIDMap2):
        inner = faiss.downcast_index(top.index)
        # Flat codes compact in order, which is what IDMap2's id_map bookkeeping assumes.
        if isinstance(inner, faiss.IndexFlatCodes):
            return "native"
    return "tombstone"


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove `ids` from a 'native' structure; returns how many were removed."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return 0
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIVF):
        # The hashtable direct map only accepts an IDSelectorArray.
        sel = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
        return int(top.remove_ids(sel))
    return int(index.remove_ids(faiss.IDSelectorBatch(ids)))


def stored_ids(index: faiss.Index) -> np.ndarray:
    """Every id held by the structure (live and tombstoned), as int64."""
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(top.id_map).astype(np.int64, copy=True)
    if isinstance(top, faiss.IndexIVF):
        invlists = top.invlists
        chunks = []
        for list_no in range(top.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                chunks.append(faiss.rev_swig_ptr(ptr, size).astype(np.int64, copy=True))
                invlists.release_ids(list_no, ptr)
        return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
    raise TypeError(f"index {describe(index)} does not carry ids")


def search_parameters(
    index: faiss.Index,
    sel: faiss.IDSelector | None,
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    k_factor: float | None = None,
) -> tuple[faiss.SearchParameters, list[Any]]:
    """Search parameters carrying `sel` to the layer that filters, plus objects to keep alive.

    SWIG does not keep Python references from parameters to selectors, so the caller must hold
    the returned list until the search returns.
    """
    keep: list[Any] = [sel]
    top = faiss.downcast_index(index)
    inner = faiss.downcast_index(top.index) if isinstance(top, faiss.IndexIDMap2) else top
    if isinstance(inner, faiss.IndexRefine):
        base_sel = sel
        if sel is not None and inner is not top:
            # IndexIDMap2 translates only the top-level selector, but IndexRefine filters in its
            # base index, which numbers rows 0..n-1: translate our ids for it.
            base_sel = faiss.IDSelectorTranslated(top.id_map, sel)
            keep.append(base_sel)
        base_params = _leaf_parameters(
            faiss.downcast_index(inner.base_index), base_sel, nprobe, ef_search
        )
        keep.append(base_params)
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = float(k_factor or inner.k_factor)
        params.base_index_params = base_params
        return params, keep
    params = _leaf_parameters(inner, sel, nprobe, ef_search)
    return params, keep


def approximate_parts(index: faiss.Index) -> tuple[Any | None, Any | None]:
    """The IVF index and the HNSW index inside ``index`` (under an id map or a refine step),
    each None where there is none: what decides how widely a search probes."""
    top = faiss.downcast_index(index)
    inner = faiss.downcast_index(top.index) if isinstance(top, faiss.IndexIDMap2) else top
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    return faiss.try_extract_index_ivf(inner), inner if isinstance(inner, faiss.IndexHNSW) else None


def _leaf_parameters(
    index: Any, sel: faiss.IDSelector | None, nprobe: int | None, ef_search: int | None
) -> faiss.SearchParameters:
    params: faiss.SearchParameters
    ivf = faiss.try_extract_index_ivf(index)
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(ef_search or index.hnsw.efSearch)
    elif ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(min(nprobe or ivf.nprobe, ivf.nlist))
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
    return params
