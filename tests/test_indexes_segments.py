"""Segments: the properties that make every cost follow the change instead of the index size,
checked structurally (files written, inodes, reads) rather than by timing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from indexes_fixtures import ENCODER, make_nodes, new_store, unit_rows
from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode

from indexes import FaissVectorStore, IndexConflictError, MergePolicy
from indexes.docstore import NodeStore
from indexes.merge_policy import SegmentSize

DIM = 16


def texts_nodes(rng: np.random.Generator, n: int, prefix: str = "n", docs: int | None = None):
    words = [f"w{i}" for i in range(60)] + ["apple", "river", "stone", "violin", "nickel"]
    nodes = make_nodes(unit_rows(rng, n, DIM), prefix=prefix, docs=docs)
    for i, node in enumerate(nodes):
        size = int(rng.integers(4, 16))
        node.text = " ".join(rng.choice(words, size=size)) + f" token{prefix}{i}"
    return nodes


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (inode, size) of every file of an index directory."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            found[path.relative_to(root).as_posix()] = (stat.st_ino, stat.st_size)
    return found


def test_a_commit_of_ten_nodes_writes_a_ten_row_segment_and_touches_nothing_else(tmp_path):
    rng = np.random.default_rng(0)
    store = new_store(tmp_path, DIM)
    store.add(texts_nodes(rng, 3000, docs=30))
    store.persist()
    before = files_under(store.path)
    store.add(texts_nodes(rng, 10, prefix="new"))
    store.persist()
    after = files_under(store.path)
    for name, (inode, size) in before.items():
        if name in after and name != "CURRENT":  # the pointer is the one file a commit rewrites  # nothing of the old version was rewritten, only added beside it
            assert after[name] == (inode, size), name
    new_files = sorted(set(after) - set(before))
    new_segment = store.manifest.segments[-1]
    assert new_segment.rows == 10
    assert all(
        name.startswith(f"segments/{new_segment.name}/") or name.startswith("versions/v000003/")
        for name in new_files
    ), new_files
    written = sum(after[name][1] for name in new_files)
    old_segment = sum(size for name, (_, size) in before.items() if name.startswith("segments/"))
    assert written < old_segment / 20  # O(change): ten rows, not three thousand


def test_unchanged_segments_are_the_same_files_in_every_version(tmp_path):
    rng = np.random.default_rng(1)
    store = new_store(tmp_path, DIM)
    store.add(texts_nodes(rng, 500))
    store.persist()
    first = store.manifest.segments[0]
    vectors = store.path / "segments" / first.name / "vectors.faiss"
    inode = vectors.stat().st_ino
    store.add(texts_nodes(rng, 5, prefix="b"))
    store.delete_nodes(["n3"])
    store.persist()
    assert store.manifest.segments[0].name == first.name and store.manifest.segments[0].deleted == 1
    assert vectors.stat().st_ino == inode
    old = FaissVectorStore.open(store.path, version=2)
    new = FaissVectorStore.open(store.path)
    assert old.count == 500 and new.count == 504
    assert old._segments[0].reader is new._segments[0].reader  # one open copy per process


def test_opening_reads_no_node_rows(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    store = new_store(tmp_path, DIM)
    store.add(texts_nodes(rng, 800, docs=8))
    store.persist()

    def refuse(*args, **kwargs):
        raise AssertionError("open read node rows")

    for name in ("rows", "iter_rows", "select_faiss_ids", "faiss_ids_for_nodes", "doc_hashes"):
        monkeypatch.setattr(NodeStore, name, refuse)
    reopened = FaissVectorStore.open(store.path)
    assert reopened.count == 800
    monkeypatch.undo()
    assert len(reopened.search(unit_rows(rng, 1, DIM), 3)[0]) == 3


def test_three_kept_versions_of_small_commits_take_little_more_disk_than_one(tmp_path):
    rng = np.random.default_rng(3)
    store = new_store(tmp_path, DIM, keep_versions=3)
    store.add(texts_nodes(rng, 4000, docs=40))
    store.persist()
    one = sum(size for _, size in files_under(store.path).values())
    for round_ in range(4):
        store.add(texts_nodes(rng, 10, prefix=f"r{round_}_"))
        store.delete("doc1" if round_ == 0 else f"doc{round_ + 5}")
        store.persist()
    kept = sorted(p.name for p in (store.path / "versions").iterdir())
    assert len(kept) == 3
    three = sum(size for _, size in files_under(store.path).values())
    assert three <= 1.2 * one


def test_space_is_freed_when_no_kept_version_names_a_segment(tmp_path):
    rng = np.random.default_rng(4)
    store = new_store(tmp_path, DIM, keep_versions=2)
    for round_ in range(3):
        store.add(texts_nodes(rng, 50, prefix=f"r{round_}_"))
        store.persist()
    assert store.segment_count == 3
    assert store.compact(everything=True) == 1
    store.persist()
    (merged,) = store.manifest.segments
    assert (store.path / "segments").is_dir() and len(list((store.path / "segments").iterdir())) == 4
    store.add(texts_nodes(rng, 1, prefix="last"))
    store.persist()  # the version naming the three small segments is no longer kept
    names = {p.name for p in (store.path / "segments").iterdir()}
    assert merged.name in names and len(names) == 2


def test_a_second_writer_gets_a_conflict_and_the_first_writers_node_is_kept(tmp_path):
    rng = np.random.default_rng(5)
    store = new_store(tmp_path, DIM)
    store.add(texts_nodes(rng, 20))
    store.persist()
    first = FaissVectorStore.open(store.path)
    second = FaissVectorStore.open(store.path)
    first.add(texts_nodes(rng, 1, prefix="first"))
    second.add(texts_nodes(rng, 1, prefix="second"))
    first.persist()
    with pytest.raises(IndexConflictError, match="moved to version 3"):
        second.persist()
    reopened = FaissVectorStore.open(store.path)
    assert reopened.count == 21 and reopened.get_nodes(["first0"])


def test_many_small_commits_stay_a_bounded_number_of_segments(tmp_path):
    rng = np.random.default_rng(6)
    policy = MergePolicy(segments_per_level=4, floor_rows=10)
    store = FaissVectorStore.create(tmp_path / "idx", dim=DIM, encoder=ENCODER, merge_policy=policy)
    for round_ in range(40):
        store.add(texts_nodes(rng, 5, prefix=f"r{round_}_"))
        store.persist()
        assert store.segment_count < 3 * policy.segments_per_level
    assert store.count == 200
    assert FaissVectorStore.open(store.path).count == 200


def test_keyword_scores_do_not_depend_on_how_rows_fall_into_segments(tmp_path):
    rng = np.random.default_rng(7)
    nodes = texts_nodes(rng, 300)
    one = new_store(tmp_path / "one", DIM)
    one.add(nodes)
    one.persist()
    many = FaissVectorStore.create(
        tmp_path / "many", dim=DIM, encoder=ENCODER, merge_policy=MergePolicy(segments_per_level=100)
    )
    for start in range(0, 300, 30):
        many.add(nodes[start : start + 30])
        many.persist()
    assert one.segment_count == 1 and many.segment_count > 1
    for text in ["apple river", "violin nickel laser", "tokenn17 stone w3"]:
        query = VectorStoreQuery(query_str=text, similarity_top_k=10, mode=VectorStoreQueryMode.SPARSE)
        a, b = one.query(query), many.query(query)
        assert np.allclose(a.similarities, b.similarities, rtol=1e-6) and a.similarities[0] > 1
        same = dict(zip(a.ids, a.similarities, strict=True))
        for node_id, score in zip(b.ids, b.similarities, strict=True):
            assert node_id not in same or same[node_id] == pytest.approx(score, rel=1e-6)


def test_merge_policy_merges_neighbours_of_one_level_and_rewrites_deleted_heavy_ones():
    policy = MergePolicy(segments_per_level=3, floor_rows=10, factor=10)
    tiny = SegmentSize(rows=5, deleted=0)
    big = SegmentSize(rows=1000, deleted=0)
    assert policy.select([big, tiny, tiny, tiny]) == [[1, 2, 3]]
    assert policy.select([tiny, tiny, big, tiny]) == []  # not neighbours
    assert policy.select([SegmentSize(rows=1000, deleted=300), tiny]) == [[0]]
    assert policy.select_all([big, tiny, SegmentSize(rows=5, deleted=5)]) == [[0, 1, 2]]
    inline = MergePolicy(segments_per_level=3, floor_rows=10, factor=10, max_inline_rows=2000)
    level_two = SegmentSize(rows=900, deleted=0)
    assert inline.due([level_two] * 3) == [[0, 1, 2]]
    assert inline.select([level_two] * 3) == []  # 2,700 rows: too big to rewrite inside a commit
    assert inline.deferred([level_two] * 3) == [[0, 1, 2]]
    # a deferred merge does not keep its deleted-heavy members from being rewritten alone
    thinned = SegmentSize(rows=1000, deleted=250, outgrown=False)  # 3 x 750 live: deferred
    assert inline.deferred([thinned] * 3) == [[0, 1, 2]]
    assert inline.select([thinned] * 3) == [[0], [1], [2]]
    assert inline.select([thinned, level_two, thinned]) == [[0], [2]]
    outgrown = SegmentSize(rows=500, deleted=0, outgrown=True)
    assert policy.select([big, outgrown, tiny]) == [[1]]  # rewritten alone, as IVF
    assert policy.select([outgrown, outgrown, outgrown]) == [[0, 1, 2]]  # a level merge rewrites it anyway
    assert policy.select_all([big, outgrown]) == [[0, 1]]
    assert policy.select_all([outgrown]) == [[0]]


def test_a_crash_between_publishing_segments_and_the_switch_leaves_no_orphan_after_the_next_commit(
    tmp_path, monkeypatch
):
    from indexes import persist

    rng = np.random.default_rng(8)
    store = new_store(tmp_path, DIM)
    store.add(texts_nodes(rng, 30))
    store.persist()
    store.add(texts_nodes(rng, 5, prefix="x"))

    def power_cut(root, version):
        raise OSError("power cut")

    monkeypatch.setattr(persist, "switch_current", power_cut)
    with pytest.raises(OSError, match="power cut"):
        store.persist()
    monkeypatch.undo()
    assert FaissVectorStore.open(store.path).count == 30
    assert store.persist() == 3  # the writer retries with what it held: nothing was lost
    assert FaissVectorStore.open(store.path).count == 35
    named = {s.name for s in store.manifest.segments}
    on_disk = {p.name for p in (store.path / "segments").iterdir()}
    assert on_disk == named
    assert not [p for p in store.path.rglob("*.tmp")]
    assert sorted(os.listdir(store.path / "versions")) == ["v000001", "v000002", "v000003"]


def test_auto_kind_makes_large_segments_ivf_with_shared_centroids_and_measured_recall(tmp_path, mixture):
    import faiss

    from indexes import ann

    base, queries = mixture
    store = FaissVectorStore.create(
        tmp_path / "idx", dim=base.shape[1], encoder=ENCODER, params={"auto_ivf_rows": 2000},
        merge_policy=MergePolicy(segments_per_level=100),
    )
    assert store.index_kind == "auto"
    for start in range(0, 2500, 500):
        store.add(make_nodes(base[start : start + 500], prefix=f"a{start}_"))
        store.persist()
    assert all("Flat" in s["structure"] and "IVF" not in s["structure"] for s in store.segment_summary())
    store.compact(everything=True)  # one segment of 2,500 rows: large enough for IVF
    store.add(make_nodes(base[2500:], prefix="b"))
    store.compact(everything=False)
    store.persist()
    structures = [s["structure"] for s in store.segment_summary()]
    assert structures[0] == "IndexIVFFlat"
    first = ann.centroids_of(store._segments[0].reader.index)
    # a second large segment copies the index's quantizer instead of training its own
    second_rows = make_nodes(base[2500:4600], prefix="c")
    store.delete_nodes([n.node_id for n in make_nodes(base[2500:], prefix="b")])
    store.add(second_rows)
    store.persist()
    store.compact(everything=False)
    big = [s for s in store._segments if s.reader.record.rows >= 2000]
    ivf = [s for s in big if faiss.try_extract_index_ivf(s.reader.index) is not None]
    assert len(ivf) == len(big) >= 1
    for segment in ivf:
        assert np.array_equal(ann.centroids_of(segment.reader.index), first)
    # recall@10 of the whole index against exact search over what it holds
    held = {node.node_id: node for node in store.all_nodes()}
    vectors = dict(store.iter_embeddings())
    names = sorted(vectors)
    matrix = np.stack([vectors[n] for n in names])
    _, exact = faiss.knn(queries, matrix, 10, metric=faiss.METRIC_INNER_PRODUCT)
    got = store.search(queries, 10)
    recall = np.mean([len({names[j] for j in row} & {h[0] for h in hits}) / 10 for row, hits in zip(exact, got, strict=True)])
    assert recall >= 0.95 and len(held) == store.count


def test_a_large_index_writes_middling_segments_as_ivf_and_a_small_one_keeps_them_exact(tmp_path, mixture):
    """The same 1,000-row segment is exact in a small index and IVF once the index holds
    ``auto_ivf_rows`` rows, those written exact before are rewritten as IVF at that commit;
    the smallest segments (where new rows land) stay exact; every search stays complete."""
    base, queries = mixture
    store = FaissVectorStore.create(
        tmp_path / "idx", dim=base.shape[1], encoder=ENCODER,
        params={"auto_ivf_rows": 3000, "auto_ivf_segment_rows": 1000},
        merge_policy=MergePolicy(segments_per_level=100),
    )
    flat, ivf = "IndexIDMap2 > IndexFlat", "IndexIVFFlat"
    after = []
    for start, count in ((0, 1000), (1000, 1000), (2000, 1000), (3000, 999), (3999, 1001)):
        store.add(make_nodes(base[start : start + count], prefix=f"a{start}_"))
        store.persist()
        after.append([s["structure"] for s in store.segment_summary()])
    # index rows at each commit: 1000, 2000, 3000 (large from here), 3999, 5000
    assert after[1] == [flat, flat]
    assert after[2] == [ivf, ivf, ivf]  # the two written small were rewritten at this commit
    assert after[4] == [ivf, ivf, ivf, flat, ivf]  # 999 rows: below auto_ivf_segment_rows
    assert [s["rows"] for s in store.segment_summary()] == [1000, 1000, 1000, 999, 1001]
    assert FaissVectorStore.open(store.path).count == 5000
    assert all(len(hits) == 10 for hits in store.search(queries, 10))
    assert all(len(hits) == 100 for hits in store.search(queries[:20], 100))


def test_a_pinned_flat_kind_stays_exact_however_large_its_segments(tmp_path, mixture):
    base, _ = mixture
    store = FaissVectorStore.create(
        tmp_path / "idx", dim=base.shape[1], encoder=ENCODER, index_kind="flat",
        params={"auto_ivf_rows": 100},
    )
    store.add(make_nodes(base[:1000]))
    store.persist()
    assert store.segment_summary()[0]["structure"] == "IndexIDMap2 > IndexFlat"


def _merged_rows(store: FaissVectorStore) -> list[tuple]:
    (segment,) = store._segments
    return [(r.faiss_id, r.node_id, r.ref_doc_id, r.text, r.metadata, r.node_type, r.node_json)
            for r in segment.reader.rows.iter_rows()]


def _three_segments_with_deletes(root: Path) -> tuple[FaissVectorStore, list[tuple]]:
    rng = np.random.default_rng(11)
    store = FaissVectorStore.create(root, dim=DIM, encoder=ENCODER)
    for round_ in range(3):
        store.add(texts_nodes(rng, 40, prefix=f"r{round_}_", docs=8))
        store.persist()
    store.delete_nodes(["r0_3", "r1_0", "r1_39", "r2_17"])
    store.persist()
    expected = [row for segment in store._segments for row in
                [(r.faiss_id, r.node_id, r.ref_doc_id, r.text, r.metadata, r.node_type, r.node_json)
                 for r in segment.reader.rows.iter_rows()]
                if row[0] not in set(segment.deleted.tolist())]
    return store, expected


def test_a_merge_copies_its_rows_in_sqlite_and_keeps_every_live_row_as_it_was(tmp_path, monkeypatch):
    store, expected = _three_segments_with_deletes(tmp_path / "index")
    assert len(expected) == 116

    def streamed(*args, **kwargs):
        raise AssertionError("the merge streamed its rows through Python")

    monkeypatch.setattr(NodeStore, "write_file", streamed)
    assert store.compact(everything=True) == 1
    monkeypatch.undo()
    store.persist()
    assert _merged_rows(store) == expected
    reopened = FaissVectorStore.open(store.path)
    assert reopened.count == 116 and _merged_rows(reopened) == expected
    assert reopened.get_nodes(["r1_1"])[0].text == dict((row[1], row[3]) for row in expected)["r1_1"]


def test_a_merge_streams_the_rows_of_a_segment_whose_file_is_gone(tmp_path):
    """A segment file unlinked under this process's open handle (a later version's clean-up)
    cannot be attached by path: the merge reads its rows through the handle instead."""
    store, expected = _three_segments_with_deletes(tmp_path / "index")
    rows_file = store._segments[1].reader.folder / "nodes.sqlite"
    rows_file.rename(rows_file.with_name("moved.sqlite"))
    assert store.compact(everything=True) == 1
    assert _merged_rows(store) == expected
    assert not list((store.path / "segments").glob("*/nodes.sqlite-journal"))


def test_tombstones_stay_a_sorted_set_however_deletions_arrive(tmp_path):
    # deletions arrive one document at a time, repeated, across segments and pending rows;
    # the tombstones are kept sorted by insertion now, not re-sorted whole at each call
    rng = np.random.default_rng(5)
    store = FaissVectorStore.create(tmp_path / "index", dim=DIM, encoder=ENCODER)
    for round_ in range(3):
        store.add(texts_nodes(rng, 60, prefix=f"r{round_}_", docs=20))
        store.persist()
    store.add(texts_nodes(rng, 12, prefix="p_", docs=4))  # pending, not persisted
    doc_of = {row.faiss_id: row.ref_doc_id for s in store._segments for row in s.reader.rows.iter_rows()}
    docs = sorted(set(doc_of.values()))
    gone: set[str] = set()
    for doc in rng.choice(docs, size=40):  # with repeats
        store.delete(str(doc))
        gone.add(str(doc))
        for segment in store._segments:
            expected = sorted(i for i in segment.reader.ids.tolist() if doc_of[i] in gone)
            assert segment.deleted.tolist() == expected
    store.persist()
    reopened = FaissVectorStore.open(tmp_path / "index")
    hits = reopened.query(VectorStoreQuery(query_embedding=unit_rows(rng, 1, DIM)[0].tolist(), similarity_top_k=500))
    returned = {node.ref_doc_id for node in hits.nodes}
    live = sum(doc_of[i] not in gone for i in doc_of) + sum(f"doc{i % 4}" not in gone for i in range(12))
    assert not returned & gone and len(hits.nodes) == live


def test_a_segment_no_version_serves_lets_go_of_its_rows_file(tmp_path):
    # only the cycle collector closed a reader's SQLite connection: a long-running service held
    # every segment file it had ever served open, those compaction deleted included
    import gc

    def open_rows_files() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if "nodes.sqlite" in os.path.realpath(fd))

    rng = np.random.default_rng(9)
    store = FaissVectorStore.create(tmp_path / "index", dim=DIM, encoder=ENCODER)
    store.add(texts_nodes(rng, 30))
    store.persist()
    del store
    gc.collect()
    before = open_rows_files()
    gc.disable()
    try:
        opened = FaissVectorStore.open(tmp_path / "index")
        assert opened.get_nodes(node_ids=["n3"])  # reads rows: the connection runs a statement
        assert open_rows_files() == before + 1
        del opened
        assert open_rows_files() == before
    finally:
        gc.enable()


def test_keyword_scores_with_tombstones_equal_a_fresh_index_of_the_live_rows(tmp_path):
    # deleted rows counted in N, avgdl and df until a merge dropped them: a store's keyword
    # scores (and so its order) differed from a fresh build of the same live documents
    rng = np.random.default_rng(13)
    store = FaissVectorStore.create(tmp_path / "a", dim=DIM, encoder=ENCODER)
    nodes = texts_nodes(rng, 120, docs=30)
    store.add(nodes[:60])
    store.persist()
    store.add(nodes[60:])
    store.persist()
    store.delete("doc3")
    store.delete("doc17")
    store.persist()
    reopened = FaissVectorStore.open(tmp_path / "a")
    assert sum(len(s.deleted) for s in reopened._segments) == 8  # tombstones, not merged away
    gone = {"doc3", "doc17"}
    fresh = FaissVectorStore.create(tmp_path / "b", dim=DIM, encoder=ENCODER)
    same = texts_nodes(np.random.default_rng(13), 120, docs=30)
    fresh.add([node for node in same if node.ref_doc_id not in gone])
    for text in ("apple river", "stone violin w3", "nickel w10 w11 w12"):
        query = VectorStoreQuery(query_str=text, similarity_top_k=20, mode=VectorStoreQueryMode.SPARSE)
        got, want = reopened.query(query), fresh.query(query)
        assert dict(zip(got.ids, got.similarities, strict=True)) == pytest.approx(
            dict(zip(want.ids, want.similarities, strict=True)), rel=1e-9)
