"""Store paths that used to be unsafe or silently wrong: restore onto collected files, an
exact keyword tie across segments, a damaged rows file laundered by a merge, an orphan version
taking a kept one's place, unsynced folders, a failed merge's staging left behind, an open
racing a commit (found by an audit; each failed before its fix), and checks that came out
fine (merges with tombstones and a file gone, a reader of a collected version)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from indexes_fixtures import ENCODER, make_nodes, unit_rows

from indexes import FaissVectorStore, HtpIndexError, persist, segments
from indexes.errors import IndexCorruptedError

DIM = 8
REPO = Path(__file__).resolve().parents[1]


def _store(path: Path, **kw) -> FaissVectorStore:
    return FaissVectorStore.create(path, dim=DIM, encoder=ENCODER, **kw)


def _nodes(rng, n, prefix):
    return make_nodes(unit_rows(rng, n, DIM), prefix=prefix)


# --------------------------------------------------------------------------- restore vs GC


def test_restore_of_a_store_whose_segments_were_collected_leaves_a_live_index_that_opens(tmp_path):
    """restore() commits with expected_live=None and never checks that the segments it names
    still exist: if later commits collected them, CURRENT ends up naming missing files."""
    rng = np.random.default_rng(0)
    path = tmp_path / "idx"
    writer = _store(path, keep_versions=1)
    writer.add(_nodes(rng, 30, "a"))
    writer.persist()                                   # v2: segment A
    old = FaissVectorStore.open(path, keep_versions=1)  # a store at v2 (e.g. for a roll-back)
    writer.add(_nodes(rng, 30, "b"))
    writer.compact(everything=True)                    # A+B merged: A is named by v3 no more
    writer.persist()                                   # v3; v2 and segment A collected
    try:
        old.restore()                                  # "make v2 live again"
    except HtpIndexError:
        return                                         # refusing is fine
    reopened = FaissVectorStore.open(path)             # IndexCorruptedError: A is missing
    assert reopened.count == 30


# ---------------------------------------------------------------- merge fallback correctness


def _rows_vectors_postings_agree(store: FaissVectorStore) -> None:
    for seg in store._segments:
        reader = seg.reader
        ids = np.asarray(reader.ids)
        rows = [r.faiss_id for r in reader.rows.iter_rows()]
        assert rows == ids.tolist(), reader.name
        assert reader.index.ntotal == len(ids) == reader.keywords.rows == reader.record.rows
        got = reader.reconstruct(ids)
        assert got.shape == (len(ids), DIM)


@pytest.mark.parametrize("gone", ["first", "second", "none"])
def test_merge_of_tombstoned_segments_keeps_rows_vectors_and_postings_in_step(tmp_path, gone):
    """The ATTACH copy and the streaming fallback (a merged segment's nodes.sqlite unlinked
    under its open handle, as another process's clean-up does) must give the same segment."""
    rng = np.random.default_rng(1)
    path = tmp_path / "idx"
    store = _store(path)
    vec_a, vec_b = unit_rows(rng, 40, DIM), unit_rows(rng, 40, DIM)
    store.add(make_nodes(vec_a, prefix="a"))
    store.persist()
    store.add(make_nodes(vec_b, prefix="b"))
    store.persist()
    store.delete_nodes([f"a{i}" for i in range(0, 40, 3)] + [f"b{i}" for i in range(1, 40, 4)])
    # upsert a4 of A: its old id is tombstoned, the same node_id lands in a later segment
    new_a4 = unit_rows(rng, 1, DIM)
    node = make_nodes(new_a4, prefix="a")[0]
    node.id_ = "a4"
    store.add([node])
    vec_a[4] = new_a4[0]
    store.persist()
    assert store.segment_count == 3
    if gone != "none":
        seg = store._segments[0 if gone == "first" else 1]
        os.unlink(seg.reader.folder / segments.ROWS_FILE)
    store.compact(everything=True)
    store.persist()
    assert store.segment_count == 1
    _rows_vectors_postings_agree(store)
    expected = {f"a{i}" for i in range(40) if i % 3} | {f"b{i}" for i in range(40) if i % 4 != 1}
    assert {n.node_id for n in store.get_nodes()} == expected
    want = {**{f"a{i}": vec_a[i] for i in range(40)}, **{f"b{i}": vec_b[i] for i in range(40)}}
    for node_id, vec in store.iter_embeddings():
        np.testing.assert_allclose(vec, want[node_id], atol=1e-6)
    hits = store.search(vec_b[2:3], 1)[0]
    assert hits[0][0] == "b2"
    if gone == "none":
        persist.verify(path)


def test_restore_with_collected_segments_does_not_destroy_the_good_version(tmp_path):
    """Same cause, worst outcome: with keep_versions=1 the restore's own clean-up removes the
    last good version and its merged segment, so no version of the index opens any more."""
    rng = np.random.default_rng(0)
    path = tmp_path / "idx"
    writer = _store(path, keep_versions=1)
    writer.add(_nodes(rng, 30, "a"))
    writer.persist()
    old = FaissVectorStore.open(path, keep_versions=1)
    writer.add(_nodes(rng, 30, "b"))
    writer.compact(everything=True)
    good = writer.persist()
    with contextlib.suppress(HtpIndexError):
        old.restore()
    openable = []
    for v in persist.list_versions(path):
        try:
            FaissVectorStore.open(path, version=v)
            openable.append(v)
        except HtpIndexError:
            pass
    assert openable, f"no version opens (good version {good} was collected)"


# ------------------------------------------------------------------------- keyword near-ties


def test_pruned_keyword_search_breaks_an_exact_tie_across_segments_like_the_exhaustive_one():
    """keywords._search_segment skips a whole segment when sum(bounds) < theta with no slack:
    the same text in a smaller, older segment (smaller id) scores the same up to summation
    order, one ulp below theta, and is skipped, so the newer copy wins the tie."""
    from indexes import keywords

    dup = "w8 w10 w2 w11 w3 w4 w10"
    big = keywords.KeywordSegment.from_texts(["w2 w0", "w5 w10 w2", dup])
    small = keywords.KeywordSegment.from_texts([dup])
    ids = [np.array([100, 101, 102], np.int64), np.array([0], np.int64)]
    pruned = keywords.search([big, small], [None, None], "w2 w3 w10", 1, ids)
    exhaustive = keywords.search_exhaustive([big, small], [None, None], "w2 w3 w10", 1, ids)
    assert [int(ids[s][r]) for s, r, _ in exhaustive] == [0]
    assert [int(ids[s][r]) for s, r, _ in pruned] == [0]


def test_store_keyword_tie_goes_to_the_oldest_id_whatever_the_segments(tmp_path):
    """Store level: the older duplicate (faiss id 0, its own small segment) must win the tie
    (storage.md: equal scores by faiss id, a top-k does not change when a merge moves rows)."""
    from llama_index.core.schema import TextNode

    path = tmp_path / "idx"
    store = _store(path)
    rng = np.random.default_rng(3)
    dup = "w8 w10 w2 w11 w3 w4 w10"

    def node(i, text):
        return TextNode(id_=f"t{i}", text=text, embedding=unit_rows(rng, 1, DIM)[0].tolist())

    store.add([node(0, dup)])
    store.persist()
    store.add([node(1, "w2 w0"), node(2, "w5 w10 w2"), node(3, dup)])
    store.persist()
    top1 = [r.node_id for r, _ in store.retrieve("sparse", 1, text="w2 w3 w10")]
    top2 = [r.node_id for r, _ in store.retrieve("sparse", 2, text="w2 w3 w10")]
    assert top2 == ["t0", "t3"]                    # the exhaustive order: equal scores, id 0 first
    assert top1 == top2[:1], (top1, top2)          # ['t3']: top-1 is not the start of top-2
    store.compact(everything=True)                 # ... and it changes when a merge moves rows
    assert [r.node_id for r, _ in store.retrieve("sparse", 1, text="w2 w3 w10")] == top1


# -------------------------------------------------------------- crash between rename and switch

_CRASH_CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from indexes_fixtures import make_nodes, unit_rows
    from indexes import FaissVectorStore
    store = FaissVectorStore.open({path!r}, keep_versions=2)
    store.add(make_nodes(unit_rows(np.random.default_rng(9), 5, {dim}), prefix="crash"))
    os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)   # die at the CURRENT switch
    store.persist()
""")


def test_a_commit_killed_before_the_pointer_switch_does_not_cost_a_kept_version(tmp_path):
    """A kill after versions/vN is renamed in but before CURRENT switches leaves vN on disk;
    collect_garbage keeps the newest keep_versions *directories*, so the orphan (never live)
    takes the place of the real previous version, which the next commit deletes."""
    rng = np.random.default_rng(4)
    path = tmp_path / "idx"
    store = _store(path, keep_versions=2)          # v1
    store.add(_nodes(rng, 10, "a"))
    store.persist()                                # v2 (live)
    child = _CRASH_CHILD.format(tests=str(REPO / "tests"), path=str(path), dim=DIM)
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    assert persist.current_version(path) == 2 and 3 in persist.list_versions(path)  # orphan v3
    writer = FaissVectorStore.open(path, keep_versions=2)
    writer.add(_nodes(rng, 3, "b"))
    assert writer.persist() == 4
    kept = persist.list_versions(path)
    assert 2 in kept, f"the previous live version was collected; kept {kept} (3 was never live)"


# ------------------------------------------------------------------ verify after compaction


def test_compaction_does_not_launder_a_damaged_rows_file_past_verify(tmp_path):
    """A bit flip in a segment's nodes.sqlite (same size: open checks sizes only) is caught by
    verify; a compaction copies the damaged rows into a new segment with fresh checksums,
    and verify passes from then on: the damage is silently made permanent."""
    rng = np.random.default_rng(5)
    path = tmp_path / "idx"
    store = _store(path)
    store.add(_nodes(rng, 20, "a"))
    store.persist()
    store.add(_nodes(rng, 20, "b"))
    store.persist()
    rows_file = path / "segments" / store.manifest.segments[0].name / segments.ROWS_FILE
    data = rows_file.read_bytes()
    at = data.index(b"text of a7")
    rows_file.write_bytes(data[:at] + b"text of X7" + data[at + 10:])
    with pytest.raises(IndexCorruptedError):
        persist.verify(path)
    damaged = FaissVectorStore.open(path)
    try:
        damaged.compact(everything=True)
        damaged.persist()
    except HtpIndexError:
        return                                     # refusing to merge damaged input is fine
    with pytest.raises(IndexCorruptedError):
        persist.verify(path)                       # passes: the damage is now "valid"


# ------------------------------------------------------------------ same-process races


def test_a_failed_second_merge_leaves_no_staging_folder_behind(tmp_path, monkeypatch):
    """_merge writes group after group; when a later group fails, the segments already
    written for earlier groups stay in segments/.tmp-<pid>… (own pid, fresh): the commit's
    clean-up keeps them, so the space is lost for the life of the process (+1 h)."""
    from indexes import MergePolicy

    rng = np.random.default_rng(7)
    path = tmp_path / "idx"
    store = _store(path, merge_policy=MergePolicy(max_merged_rows=20))
    for p in "abcd":
        store.add(_nodes(rng, 10, p))
        store.persist()
    real, calls = segments.write_segment, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(segments, "write_segment", failing)
    with pytest.raises(OSError):
        store.compact(everything=True)
    monkeypatch.undo()
    store.add(_nodes(rng, 1, "e"))
    store.persist()
    left = [p.name for p in (path / "segments").iterdir() if p.name.startswith(".tmp-")]
    assert not left, left


def test_a_reader_of_a_version_collected_by_another_store_keeps_answering(tmp_path):
    """Two stores of one process: a compaction + commit (keep_versions=1) unlinks the segments
    the reader serves; its open handles must keep working (rows, vectors, postings)."""
    rng = np.random.default_rng(8)
    path = tmp_path / "idx"
    vecs = unit_rows(rng, 30, DIM)
    writer = _store(path, keep_versions=1)
    writer.add(make_nodes(vecs[:15], prefix="a"))
    writer.persist()
    writer.add(make_nodes(vecs[15:], prefix="b"))
    writer.persist()
    reader = FaissVectorStore.open(path, keep_versions=1)
    writer.delete_nodes(["a1"])
    writer.compact(everything=True)
    writer.persist()
    assert not (path / "segments" / reader.manifest.segments[0].name).exists()
    assert reader.search(vecs[1:2], 1)[0][0][0] == "a1"
    assert [r.node_id for r, _ in reader.retrieve("sparse", 1, text="text of b3")][0] == "b3"
    assert len(reader.get_nodes()) == 30


def test_open_racing_a_commit_does_not_report_a_healthy_index_as_corrupted(tmp_path, monkeypatch):
    """open() reads CURRENT and the manifest, then the segments; a commit's clean-up in
    between (keep_versions=1, or keep_versions commits) removes them, and open raises
    IndexCorruptedError (\"rebuild the index\") though CURRENT names a whole version."""
    rng = np.random.default_rng(10)
    path = tmp_path / "idx"
    writer = _store(path, keep_versions=1)
    writer.add(_nodes(rng, 10, "a"))
    writer.persist()
    writer.add(_nodes(rng, 10, "b"))
    writer.persist()
    real, fired = segments.open_segment, []

    def racing(root, record, spec):
        if not fired:
            fired.append(1)
            writer.compact(everything=True)
            writer.persist()
        return real(root, record, spec)

    monkeypatch.setattr(segments, "open_segment", racing)
    reader = FaissVectorStore.open(path, keep_versions=1)
    assert reader.count == 20


def test_a_commit_fsyncs_the_folders_its_renamed_tombstone_and_docs_files_live_in(tmp_path, monkeypatch):
    """write_deletes and doclog.write_entry rename a temporary file into segments/<seg>/ and
    docs/ but never fsync those directories; the commit fsyncs versions/ and the root only. After
    a power loss the live manifest can name a tombstone or docs file whose directory entry was
    never made durable (POSIX needs the parent directory fsynced after a rename)."""
    from indexes import doclog

    rng = np.random.default_rng(11)
    path = tmp_path / "idx"
    store = _store(path)
    store.add(_nodes(rng, 10, "a"))
    store.set_doc_hash("d1", "h1")
    store.persist()
    synced: list[Path] = []
    real_fsync = os.fsync

    def spy(fd):
        with contextlib.suppress(OSError):
            synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.delete_nodes(["a3"])
    store.set_doc_hash("d2", "h2")
    store.persist()
    assert (path / "versions").resolve() in synced  # the spy sees directory fsyncs
    seg_dir = path / "segments" / store.manifest.segments[0].name
    assert (path / store.manifest.segments[0].deletes.path).exists()
    missing = [d for d in (seg_dir, path / doclog.DOCS_DIR) if d.resolve() not in synced]
    assert not missing, f"directories never fsynced after a rename into them: {missing}"


def test_a_damaged_current_pointer_is_mended_by_the_restore_its_message_advises(tmp_path):
    """Every command named the damaged CURRENT and advised `restore --version N`, and restore
    failed with the same message: it read the live version first. Restore now makes N live."""
    from pipelines.maintenance import restore_index
    from pipelines.settings import Settings

    rng = np.random.default_rng(3)
    store = _store(tmp_path / "idx")
    store.add(_nodes(rng, 3, "a"))
    first = store.persist()
    store.add(_nodes(rng, 2, "b"))
    store.persist()
    (tmp_path / "idx" / "CURRENT").write_text("v000")
    with pytest.raises(IndexCorruptedError, match="CURRENT is corrupted") as damaged:
        FaissVectorStore.open(tmp_path / "idx")
    assert "htp-index restore" in str(damaged.value)
    version = restore_index(tmp_path / "idx", first, Settings())
    reopened = FaissVectorStore.open(tmp_path / "idx")
    assert reopened.version == version > first + 1 and reopened.count == 3
    assert persist.verify(tmp_path / "idx")["files"] > 0
    # a store that expects a live version still refuses a pointer it cannot read
    (tmp_path / "idx" / "CURRENT").write_text("garbage")
    reopened.add(_nodes(rng, 1, "c"))
    with pytest.raises(IndexCorruptedError, match="CURRENT"):
        reopened.persist()


def test_info_names_a_damaged_correction_file(tmp_path):
    """`htp-index info` read correction.json itself and printed a raw pydantic error naming no
    file; it now reads it as opening does."""
    from typer.testing import CliRunner

    from htp_cli.main import app
    from indexes.correction import VectorCorrection

    rng = np.random.default_rng(4)
    store = _store(tmp_path / "idx")
    rows = unit_rows(rng, 12, DIM)
    store.set_correction(VectorCorrection.fit(rows, unit_rows(rng, 12, DIM)))
    store.add(make_nodes(rows, prefix="d"))
    version = store.persist()
    assert CliRunner().invoke(app, ["info", "--index", str(tmp_path / "idx")]).exit_code == 0
    path = persist.version_dir(tmp_path / "idx", version) / persist.CORRECTION_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = CliRunner().invoke(app, ["info", "--index", str(tmp_path / "idx")])
    assert result.exit_code == 1
    assert "correction.json is corrupted" in result.output and "htp-index restore" in result.output


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_k_far_above_the_index_size_returns_every_row(tmp_path, mode):
    """FAISS and the merge sized their results by k: k = 10**8 over 65 rows raised MemoryError
    (763 MiB), 10**9 got the process killed. The CLI and HTTP cap k; the API did not."""
    rng = np.random.default_rng(5)
    store = _store(tmp_path / "idx")
    rows = unit_rows(rng, 20, DIM)
    store.add(make_nodes(rows, prefix="d"))
    store.persist()
    store.add(_nodes(rng, 3, "pending"))  # pending rows are searched too
    hits = store.retrieve(mode, 10**12, embedding=rows[0], text="node")
    assert len(hits) == 23 and len({row.node_id for row, _ in hits}) == 23


@pytest.mark.parametrize("refusal", [
    OSError(24, "Too many open files"),  # the keyword postings' open
    RuntimeError("Error: 'f' failed: could not open vectors.faiss for reading: Too many open files"),  # FAISS
])
def test_running_out_of_file_descriptors_is_not_called_damage(tmp_path, monkeypatch, refusal):
    """Under `ulimit -n 32` every segment was "corrupted", with advice to restore a backup or
    an older version: it would undo a healthy index."""
    from indexes import SystemLimitError, keywords

    path = tmp_path / "idx"
    store = _store(path)
    store.add(_nodes(np.random.default_rng(11), 10, "a"))
    store.persist()

    def refuse(*args, **kwargs):
        raise refusal

    monkeypatch.setattr(segments, "_READERS", {})  # as a new process: no reader held open
    if isinstance(refusal, OSError):
        monkeypatch.setattr(keywords.KeywordSegment, "open", refuse)
    else:
        monkeypatch.setattr(segments.faiss, "read_index", refuse)
    with pytest.raises(SystemLimitError, match=r"ulimit -n.*not damaged") as raised:
        FaissVectorStore.open(path)
    assert "restore" not in str(raised.value) and not isinstance(raised.value, IndexCorruptedError)
    monkeypatch.undo()
    assert FaissVectorStore.open(path).count == 10


def test_a_segment_write_out_of_file_descriptors_says_so_and_leaves_no_folder(tmp_path, monkeypatch):
    """Opening the segment just written ran out of descriptors: "could not read" its temporary
    folder, which stayed (each compact retry added one)."""
    from indexes import SystemLimitError

    path = tmp_path / "idx"
    store = _store(path)
    store.add(_nodes(np.random.default_rng(12), 10, "a"))
    store.persist()
    store.add(_nodes(np.random.default_rng(13), 10, "b"))
    store.persist()

    def out_of_files(*args, **kwargs):  # as SegmentReader.open raises it
        refused = OSError(24, "Too many open files")
        raise IndexCorruptedError.unreadable(path, "unreadable", refused) from refused

    monkeypatch.setattr(segments.SegmentReader, "open", out_of_files)
    with pytest.raises(SystemLimitError, match=r"could not write a segment of the index at .*ulimit -n.*not damaged"):
        store.compact(everything=True)
    assert [p.name for p in (path / "segments").iterdir() if p.name.startswith(".tmp")] == []


# ------------------------------------------- small files a commit carries into the next version


def _flip_same_size(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))


def test_a_changed_digit_in_the_correction_is_refused_not_copied_into_the_next_version(tmp_path):
    """Open checked only that correction.json parsed: a digit changed in place (same size)
    shifted every query's vector, and the next commit wrote it again with a fresh sha256, so
    `verify` passed from then on (a trial: the top score fell from 0.326 to 0.213)."""
    from indexes.correction import VectorCorrection

    rng = np.random.default_rng(6)
    path = tmp_path / "idx"
    store = _store(path)
    rows = unit_rows(rng, 12, DIM)
    store.set_correction(VectorCorrection.fit(rows, unit_rows(rng, 12, DIM)))
    store.add(make_nodes(rows, prefix="d"))
    version = store.persist()
    correction = persist.version_dir(path, version) / persist.CORRECTION_NAME
    text = correction.read_text()
    digit = next(c for c in text if c in "12345678")
    _flip_same_size(correction, digit.encode(), b"9")
    with pytest.raises(IndexCorruptedError, match="correction.json"):
        FaissVectorStore.open(path)


def test_a_changed_tombstone_is_refused_not_copied_into_the_next_version(tmp_path):
    """Tombstones were checked by size at open: a deleted row's id changed in place brought the
    row back and hid another, and the next delete in that segment rewrote the file with it."""
    rng = np.random.default_rng(7)
    path = tmp_path / "idx"
    store = _store(path)
    store.add(_nodes(rng, 20, "a"))
    store.persist()
    store.delete_nodes(["a3"])
    store.persist()
    deletes = path / store.manifest.segments[0].deletes.path
    ids = np.load(deletes)
    changed = ids.copy()
    changed[0] = (int(ids[0]) + 1) % 20
    np.save(deletes, changed)
    assert deletes.stat().st_size == store.manifest.segments[0].deletes.bytes
    with pytest.raises(IndexCorruptedError, match=deletes.name):
        FaissVectorStore.open(path)


def test_a_changed_document_log_entry_is_refused_before_a_new_base_copies_it(tmp_path):
    """The document log was replayed without its checksums, and a new base is written from
    the replayed map: a changed hash or id became part of the index's record for good."""
    path = tmp_path / "idx"
    store = _store(path)
    store.add(_nodes(np.random.default_rng(8), 4, "a"))
    store.set_doc_hash("doc-a", "1111")
    store.persist()
    log = path / store.manifest.docs[-1].path
    _flip_same_size(log, b"1111", b"2222")
    reopened = FaissVectorStore.open(path)
    with pytest.raises(IndexCorruptedError, match=log.name):
        reopened.doc_hashes()


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_nan_query_embedding_is_refused_not_answered_empty(tmp_path, mode):
    """Adding a NaN vector was refused; searching with one answered [] in dense mode and the
    keyword hits alone in hybrid mode, as if the index held nothing closer."""
    store = _store(tmp_path / "idx")
    store.add(_nodes(np.random.default_rng(9), 5, "a"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        store.retrieve(mode, 3, embedding=np.full(DIM, np.nan), text="text")
    with pytest.raises(ValueError, match="NaN or infinite"):
        store.search(np.full((1, DIM), np.inf), 3)


def test_info_shows_that_a_kind_needing_training_still_serves_exact_search(tmp_path):
    """`rebuild --keep-vectors --index-kind ivf_flat` of a few nodes kept a Flat structure
    (exact search until 624 rows can train it); `info` showed only the kind's name."""
    import json

    from typer.testing import CliRunner

    from htp_cli.main import app

    store = _store(tmp_path / "idx", index_kind="ivf_flat")
    store.add(_nodes(np.random.default_rng(10), 6, "a"))
    store.persist()
    result = CliRunner().invoke(app, ["info", "--index", str(tmp_path / "idx"), "--json"])
    info = json.loads(result.output)
    assert info["index_kind"] == "ivf_flat"
    assert info["structures"] == {"IndexIDMap2 > IndexFlat": {"segments": 1, "rows": 6}}
