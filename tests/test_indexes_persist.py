"""Versioned persistence: identical reloads, encoder checks, corruption, crash safety, GC."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from indexes_fixtures import ENCODER, HashingEmbedding, make_nodes, new_store, unit_rows

from indexes import (
    EncoderMismatchError,
    FaissVectorStore,
    HtpIndexError,
    IndexCorruptedError,
    IndexExistsError,
    IndexNotFoundError,
    current_version,
    exists,
    read_manifest,
)
from indexes import persist as persist_module
from indexes.docstore import NodeStore

DIM = 32


def filled_store(tmp_path, kind="flat", n=800, seed=0, **kwargs) -> FaissVectorStore:
    store = new_store(tmp_path, DIM, index_kind=kind, **kwargs)
    store.add(make_nodes(unit_rows(np.random.default_rng(seed), n, DIM), docs=10))
    store.persist()
    return store


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq", "IVF32,SQ8"])
def test_persist_then_reopen_gives_identical_results(tmp_path, kind):
    store = filled_store(tmp_path, kind)
    store.delete("doc3")  # below the compaction threshold: tombstones survive the reload
    store.persist()
    queries = unit_rows(np.random.default_rng(9), 20, DIM)
    before = store.search(queries, 10)
    reopened = FaissVectorStore.open(store.path, expected_encoder=ENCODER)
    assert reopened.count == store.count == 720
    assert reopened.search(queries, 10) == before
    assert reopened.manifest == store.manifest


def test_manifest_records_what_the_index_is(tmp_path):
    store = filled_store(tmp_path, "hnsw")
    manifest = read_manifest(store.path)
    assert manifest.version == current_version(store.path) == store.version == 2
    assert (manifest.dim, manifest.metric, manifest.index_kind) == (DIM, "ip", "hnsw")
    assert manifest.encoder == ENCODER and manifest.count == 800 and manifest.next_id == 800
    assert manifest.index_structure == "IndexIDMap2 > IndexHNSWFlat"
    assert manifest.format_version == 2 and manifest.files == {}
    (segment,) = manifest.segments
    assert (segment.rows, segment.deleted, segment.min_id, segment.max_id) == (800, 0, 0, 799)
    assert {"vectors.faiss", "nodes.sqlite", "ids.npy"} <= set(segment.files)
    folder = store.path / "segments" / segment.name
    on_disk = json.loads((store.path / "versions" / "v000002" / "manifest.json").read_text())
    recorded = on_disk["segments"][0]["files"]["vectors.faiss"]["sha256"]
    assert recorded == persist_module.sha256_file(folder / "vectors.faiss")
    assert manifest["count"] == 800 and manifest.get("metric") == "ip"
    assert (store.path / "CURRENT").read_text() == "v000002\n"


def test_create_persists_an_empty_openable_version(tmp_path):
    store = new_store(tmp_path, DIM)
    assert exists(store.path) and store.version == 1
    assert FaissVectorStore.open(store.path).count == 0
    with pytest.raises(IndexExistsError, match="already exists"):
        new_store(tmp_path, DIM)
    replaced = new_store(tmp_path, DIM, overwrite=True)
    assert replaced.version == 2


def test_open_missing_index_says_how_to_create_one(tmp_path):
    assert not FaissVectorStore.exists(tmp_path / "nothing")
    with pytest.raises(IndexNotFoundError, match="no index at .*create"):
        FaissVectorStore.open(tmp_path / "nothing")


def test_mismatched_encoder_is_refused_naming_both(tmp_path):
    store = filled_store(tmp_path)
    other = {**ENCODER, "model": "another-model"}
    with pytest.raises(EncoderMismatchError) as info:
        FaissVectorStore.open(store.path, expected_encoder=other)
    message = str(info.value)
    assert '"model": "hashing-test"' in message and '"model": "another-model"' in message
    assert f"htp-index rebuild --index {store.path}" in message
    # key order is not a difference
    reordered = dict(reversed(list(ENCODER.items())))
    assert FaissVectorStore.open(store.path, expected_encoder=reordered).count == 800


def test_persist_without_changes_writes_nothing(tmp_path):
    store = filled_store(tmp_path)
    assert store.persist() == 2
    assert store.persist(force=True) == 3


def damage_file(path, damage):
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif damage == "edit":
        manifest = json.loads(data)
        manifest["count"] = 1
        path.write_text(json.dumps(manifest))
    else:
        path.unlink()


def segment_file(store, name):
    return store.path / "segments" / store.manifest.segments[0].name / name


@pytest.mark.parametrize(
    ("name", "damage", "says"),
    [
        ("vectors.faiss", "truncate", "truncated"),
        ("nodes.sqlite", "truncate", "truncated"),
        ("ids.npy", "delete", "missing"),
        ("vectors.faiss", "delete", "missing"),
        ("manifest.json", "truncate", "not valid JSON"),
        ("manifest.json", "edit", "checksum"),
    ],
)
def test_open_detects_missing_and_truncated_files_naming_them(tmp_path, name, damage, says):
    store = filled_store(tmp_path)
    if name == "manifest.json":
        path = store.path / "versions" / "v000002" / name
    else:
        path = segment_file(store, name)
    damage_file(path, damage)
    with pytest.raises(IndexCorruptedError, match=says) as info:
        FaissVectorStore.open(store.path)
    assert name in str(info.value) and info.value.path == path
    # the way out names this index (the service and apps show the message as it is)
    assert f"restore --index {store.path} --version N" in str(info.value) and "PATH" not in str(info.value)


@pytest.mark.parametrize("name", ["ids.npy", "kw_terms.npy", "kw_docs.npy", "kw_doclen.npy"])
def test_an_array_whose_header_is_damaged_at_its_size_is_named_as_corrupted(tmp_path, name):
    """Bytes 64-127 of an .npy file flipped in place (its size unchanged) broke the header's
    Python literal: numpy raised tokenize's TokenError, which nothing caught, so a query said
    "('EOF in multi-line statement', (2, 0))" and named no file."""
    import gc

    store = filled_store(tmp_path)
    root, path = store.path, segment_file(store, name)
    del store
    gc.collect()  # a fresh process's view: no reader of the segment left open in this one
    data = bytearray(path.read_bytes())
    data[64:128] = bytes(b ^ 0xFF for b in data[64:128])
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptedError) as info:
        FaissVectorStore.open(root)
    assert str(path.parent) in str(info.value) and "restore --index" in str(info.value)


@pytest.mark.parametrize("name", ["vectors.faiss", "nodes.sqlite", "ids.npy"])
def test_verify_reads_every_byte_and_finds_a_flipped_bit(tmp_path, name):
    store = filled_store(tmp_path)
    store.delete("doc0")
    store.persist()
    checked = FaissVectorStore.verify(store.path)
    assert checked["files"] >= 5 and checked["bytes"] > DIM * 4 * 800
    path = segment_file(store, name)
    damage_file(path, "flip")
    FaissVectorStore.open(store.path)  # open checks sizes only: it does not read every byte
    with pytest.raises(IndexCorruptedError, match="sha256") as info:
        FaissVectorStore.verify(store.path)
    assert info.value.path == path


def test_garbage_current_pointer_is_reported(tmp_path):
    store = filled_store(tmp_path)
    (store.path / "CURRENT").write_text("latest please")
    with pytest.raises(IndexCorruptedError, match="CURRENT"):
        FaissVectorStore.open(store.path)


def test_older_versions_stay_openable_and_only_the_last_n_are_kept(tmp_path):
    store = filled_store(tmp_path, keep_versions=2)
    store.delete("doc0")
    store.persist()
    store.delete("doc1")
    assert store.persist() == 4
    versions = sorted(p.name for p in (store.path / "versions").iterdir())
    assert versions == ["v000003", "v000004"]
    assert FaissVectorStore.open(store.path, version=3).count == 720
    assert FaissVectorStore.open(store.path).count == 640


def test_disk_full_while_writing_a_segment_leaves_the_old_version_live(tmp_path, monkeypatch):
    store = filled_store(tmp_path)
    store.add(make_nodes(unit_rows(np.random.default_rng(5), 10, DIM), prefix="new"))

    def disk_full(path, rows):
        assert (path.parent / "ids.npy").stat().st_size > 0  # a file before it is written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(NodeStore, "write_file", staticmethod(disk_full))
    with pytest.raises(OSError, match="No space"):
        store.persist()
    assert current_version(store.path) == 2
    assert [p.name for p in (store.path / "segments").iterdir()] == [store.manifest.segments[0].name]
    assert FaissVectorStore.open(store.path).count == 800
    monkeypatch.undo()
    assert store.persist() == 3  # the store itself is still usable and lost nothing
    assert FaissVectorStore.open(store.path).count == 810


def test_disk_full_while_writing_tombstones_leaves_the_old_version_live(tmp_path, monkeypatch):
    from indexes import segments

    store = filled_store(tmp_path)
    store.delete("doc0")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segments, "write_deletes", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.persist()
    assert current_version(store.path) == 2
    assert sorted(p.name for p in (store.path / "versions").iterdir()) == ["v000001", "v000002"]
    assert FaissVectorStore.open(store.path).count == 800
    monkeypatch.undo()
    assert store.persist() == 3
    assert FaissVectorStore.open(store.path).count == 720


def test_failure_while_switching_current_leaves_no_orphan(tmp_path, monkeypatch):
    store = filled_store(tmp_path)
    store.delete("doc0")

    def crash(root, version):
        raise OSError("power cut")

    monkeypatch.setattr(persist_module, "switch_current", crash)
    with pytest.raises(OSError, match="power cut"):
        store.persist()
    assert (store.path / "CURRENT").read_text() == "v000002\n"
    assert sorted(p.name for p in (store.path / "versions").iterdir()) == ["v000001", "v000002"]
    assert FaissVectorStore.open(store.path).count == 800


def test_an_open_reader_keeps_serving_after_its_version_is_collected(tmp_path):
    store = filled_store(tmp_path)
    reader = FaissVectorStore.open(store.path)
    for _ in range(3):
        store.delete_nodes([f"n{store.version}"])
        store.persist(force=True)
    assert not (store.path / "versions" / "v000002").exists()
    assert reader.count == 800
    assert len(reader.search(unit_rows(np.random.default_rng(1), 1, DIM), 5)[0]) == 5
    assert len(reader.get_nodes(["n1", "n2"])) == 2


def test_stale_temporary_directories_are_collected(tmp_path):
    store = filled_store(tmp_path)
    stale = store.path / "versions" / ".tmp-crashed"
    stale.mkdir()
    old = 10_000
    os.utime(stale, (old, old))
    fresh = store.path / "versions" / ".tmp-in-progress"
    fresh.mkdir()
    store.persist(force=True)
    assert not stale.exists() and fresh.exists()


def test_staging_directories_of_dead_writers_are_collected_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    store = filled_store(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    crashed = store.path / "versions" / f".tmp-{dead.stdout.strip()}@{host}~abc"
    alive = store.path / "versions" / f".tmp-{os.getppid()}@{host}~def"
    elsewhere = store.path / "versions" / f".tmp-{dead.stdout.strip()}@another-host~ghi"
    for folder in (crashed, alive, elsewhere):
        folder.mkdir()
    store.persist(force=True)
    assert not crashed.exists()
    assert alive.exists() and elsewhere.exists()  # a live writer's, and one we cannot check


def test_a_staged_replacement_leaves_the_live_version_serving_until_it_persists(tmp_path):
    import numpy as np
    from llama_index.core.schema import TextNode

    from indexes import FaissVectorStore

    live = FaissVectorStore.create(tmp_path / "idx", dim=4, encoder={"model": "a"})
    live.add([TextNode(id_="n1", text="one", embedding=[1.0, 0.0, 0.0, 0.0])])
    live_version = live.persist()
    staged = FaissVectorStore.create(tmp_path / "idx", dim=8, encoder={"model": "b"}, overwrite=True, persist_now=False)
    assert FaissVectorStore.current_version(tmp_path / "idx") == live_version
    assert FaissVectorStore.open(tmp_path / "idx").count == 1
    staged.add([TextNode(id_=f"m{i}", text="x", embedding=list(np.eye(8)[i])) for i in range(3)])
    new_version = staged.persist()
    assert new_version > live_version
    reopened = FaissVectorStore.open(tmp_path / "idx", expected_encoder={"model": "b"})
    assert reopened.count == 3 and reopened.dim == 8


def test_a_read_only_index_directory_fails_the_write_and_keeps_serving(tmp_path, monkeypatch):
    """As root (CI) chmod does not stop writes, so the read-only filesystem's error is injected
    where a commit first creates a file; the message names the fault, nothing is half-written."""
    import tempfile

    store = filled_store(tmp_path)
    store.add(make_nodes(unit_rows(np.random.default_rng(6), 5, DIM), prefix="ro"))
    before = sorted(p.name for p in store.path.rglob("*"))

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(OSError, match="Read-only file system"):
        store.persist()
    monkeypatch.undo()
    assert sorted(p.name for p in store.path.rglob("*")) == before
    assert FaissVectorStore.open(store.path).count == 800
    assert store.persist() == 3 and FaissVectorStore.open(store.path).count == 805


def test_changes_made_against_an_older_version_conflict_instead_of_rolling_back_newer_ones(tmp_path):
    """A store opened at a version that is not live (or no longer live) made its changes
    against that version: persisting them must not replace what was committed after it."""
    from llama_index.core.schema import TextNode

    from indexes import IndexConflictError

    emb = HashingEmbedding()
    store = new_store(tmp_path)
    store.add([TextNode(id_="a", text="alpha", embedding=emb._vector("alpha"))])
    first = store.persist()
    store.add([TextNode(id_="b", text="beta", embedding=emb._vector("beta"))])
    second = store.persist()
    old = FaissVectorStore.open(store.path, version=first)
    old.add([TextNode(id_="c", text="gamma", embedding=emb._vector("gamma"))])
    with pytest.raises(IndexConflictError, match=f"version {second}"):
        old.persist()
    assert {n.node_id for n in FaissVectorStore.open(store.path).all_nodes()} == {"a", "b"}
    # Rolling back is asked for by name: the opened version (with its changes) becomes live.
    restored = old.restore()
    assert FaissVectorStore.current_version(store.path) == restored > second
    assert {n.node_id for n in FaissVectorStore.open(store.path).all_nodes()} == {"a", "c"}
    assert {n.node_id for n in FaissVectorStore.open(store.path, version=second).all_nodes()} == {"a", "b"}


def test_a_manifest_written_before_the_splitting_field_still_opens(tmp_path):
    """Manifests of earlier releases have no ``splitting`` key: their checksum must still hold."""
    store = new_store(tmp_path)
    store.add(make_nodes(unit_rows(np.random.default_rng(0), 4, store.dim)))
    version = store.persist()
    path = persist_module.version_dir(store.path, version) / "manifest.json"
    body = json.loads(path.read_text())
    assert body.pop("splitting") is None
    path.write_text(json.dumps(body))
    assert FaissVectorStore.open(store.path).count == 4
    store.record_splitting({"chunk_size": 48, "chunk_overlap": 0})
    store.persist()
    assert FaissVectorStore.open(store.path).splitting == {"chunk_size": 48, "chunk_overlap": 0}


def test_the_correction_kind_is_written_only_when_recorded_and_kept_across_versions(tmp_path):
    """A null ``correction_kind`` is left out of manifest.json: the release before it counted
    every key but the null splitting and encoder check into the checksum."""
    store = new_store(tmp_path)
    store.add(make_nodes(unit_rows(np.random.default_rng(0), 4, store.dim)))
    version = store.persist()
    assert "correction_kind" not in json.loads((persist_module.version_dir(store.path, version) / "manifest.json").read_text())
    store.record_correction_kind("none")
    store.persist()
    reopened = FaissVectorStore.open(store.path)
    reopened.add(make_nodes(unit_rows(np.random.default_rng(1), 2, store.dim), prefix="b"))
    version = reopened.persist()
    written = json.loads((persist_module.version_dir(store.path, version) / "manifest.json").read_text())
    assert written["correction_kind"] == "none" and persist_module._sealed_as_written(written)
    assert FaissVectorStore.open(store.path).correction_kind == "none"


def test_a_manifest_from_a_newer_release_asks_for_an_upgrade_not_a_restore(tmp_path):
    """A field added by a later release made an intact manifest "corrupted", with advice to
    restore an older version, which would undo what the newer release wrote."""
    store = new_store(tmp_path)
    store.add(make_nodes(unit_rows(np.random.default_rng(0), 4, store.dim)))
    version = store.persist()
    path = persist_module.version_dir(store.path, version) / "manifest.json"
    body = json.loads(path.read_text())
    assert persist_module._sealed_as_written(body)  # the rule every release has sealed with
    body["params"]["a_later_field"] = 1
    body["checksum"] = hashlib.sha256(json.dumps(
        {key: value for key, value in body.items()
         if key != "checksum" and not (key in ("splitting", "encoder_check") and value is None)},
        sort_keys=True, separators=(",", ":")).encode()).hexdigest()  # sealed as a release seals
    path.write_text(json.dumps(body))
    with pytest.raises(HtpIndexError, match="written by a newer htp-index .*params.a_later_field.* not damaged"):
        FaissVectorStore.open(store.path)
    body["count"] = 5  # the same unknown field in a file changed since: damage, as before
    path.write_text(json.dumps(body))
    with pytest.raises(IndexCorruptedError):
        FaissVectorStore.open(store.path)


def test_a_manifest_written_before_a_params_field_existed_still_opens(tmp_path):
    """A field added to the model since a manifest was written (here ``IndexParams``'
    ``auto_ivf_segment_rows``) is not part of the checksum written then: the manifest opens
    with the field's default, and the next commit writes it. Verifying the model's own dump
    instead refused every index written before the field."""
    store = new_store(tmp_path)
    store.add(make_nodes(unit_rows(np.random.default_rng(0), 4, store.dim)))
    version = store.persist()
    path = persist_module.version_dir(store.path, version) / "manifest.json"
    body = json.loads(path.read_text())
    del body["params"]["auto_ivf_segment_rows"]  # as the release before the field wrote it
    body["checksum"] = hashlib.sha256(json.dumps(
        {key: value for key, value in body.items() if key not in ("checksum", "splitting", "encoder_check")},
        sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path.write_text(json.dumps(body))
    reopened = FaissVectorStore.open(store.path)
    assert reopened.count == 4 and reopened.spec.params.auto_ivf_segment_rows == 2048
    reopened.add(make_nodes(unit_rows(np.random.default_rng(1), 2, store.dim), prefix="b"))
    newer = persist_module.version_dir(store.path, reopened.persist()) / "manifest.json"
    assert json.loads(newer.read_text())["params"]["auto_ivf_segment_rows"] == 2048
    # an edit is still caught
    body["count"] = 5
    path.write_text(json.dumps(body))
    with pytest.raises(IndexCorruptedError, match="checksum"):
        FaissVectorStore.open(store.path, version=version)


def test_segment_and_version_folders_get_the_mode_the_umask_allows(tmp_path):
    # mkdtemp's 0700 staging folders were renamed in as they were: a service running as
    # another user than the ingest could not read the index
    previous = os.umask(0o022)
    try:
        store = filled_store(tmp_path)
    finally:
        os.umask(previous)
    folders = [p for p in store.path.rglob("*") if p.is_dir()]
    assert any(p.parent.name == "segments" for p in folders) and any(p.parent.name == "versions" for p in folders)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in folders if p.stat().st_mode & 0o777 != 0o755} == {}
