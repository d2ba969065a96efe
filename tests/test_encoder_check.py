"""An index records what its encoder gave for a few fixed texts. An encoder that passes the
identity check but embeds unlike that record (here: a tokenizer edited in the model folder,
which the identity does not name) is refused before it writes, and the service says so."""

from __future__ import annotations

import json
import shutil
import weakref

import numpy as np
import pytest
from pipeline_helpers import settings_for, write_docs

from htp_embed import EncoderConfig
from htp_embed import encoder as encoder_module
from indexes import FaissVectorStore, SegmentStore
from pipelines.encoder_check import (
    CHECK_DOCUMENTS,
    CHECK_QUERIES,
    MIN_COSINE,
    compare,
    record_check,
)
from pipelines.errors import EncoderDriftError
from pipelines.ingest import ingest
from pipelines.query import open_index
from pipelines.rebuild import rebuild
from pipelines.settings import Settings

MORE = {"river.txt": "the river flowed past the mill . wind blew through the field ."}


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path, monkeypatch):
    """A copy of the tiny model folder this test may edit, loaded afresh by every encoder."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    monkeypatch.setenv("HTP_INDEX_CACHE", str(tmp_path / "cache"))
    fresh_loads(monkeypatch)
    return copy


def fresh_loads(monkeypatch) -> None:
    monkeypatch.setattr(encoder_module, "_LOADED", weakref.WeakValueDictionary())


def folder_settings(model_dir) -> Settings:
    encoder = EncoderConfig(model=str(model_dir), segmenter="sentencizer", show_progress=False)
    return Settings(encoder=encoder, chunk_size=48, chunk_overlap=0)


def swap_tokens(model_dir, first: str = "the", second: str = ".") -> None:
    """Swap two tokens' ids in ``tokenizer.json``: the weights, and so the identity, stay."""
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(data))


def test_an_index_records_its_encoder_check_and_keeps_it_from_version_to_version(tmp_path, embedding):
    index, settings = tmp_path / "idx", settings_for(embedding)
    ingest(write_docs(tmp_path / "src"), index, settings, embedding=embedding)
    check = SegmentStore.read_manifest(index).encoder_check
    assert check is not None
    assert check["documents"] == list(CHECK_DOCUMENTS) and check["queries"] == list(CHECK_QUERIES)
    assert compare(embedding.encoder, check).min_cosine > 0.9999  # float16 storage loses ~nothing
    ingest(write_docs(tmp_path / "more", MORE), index, settings.model_copy(update={"delete_missing": False}),
           embedding=embedding)
    rebuild(index, settings, keep_vectors=True, embedding=embedding)
    manifest = SegmentStore.read_manifest(index)
    assert manifest.version == 3 and manifest.encoder_check == check
    assert open_index(index, settings, embedding=embedding).check_encoder().passed


def test_the_check_measures_how_far_vectors_moved():
    class Scaled:  # a "drifted" encoder: each vector rotated a little toward another axis
        def __init__(self, turn: float):
            self.turn = turn

        def _vectors(self, texts):
            base = np.eye(8, dtype=np.float32)[: len(texts)]
            return base + self.turn * np.roll(base, 1, axis=1)

        encode_documents = encode_queries = _vectors

    recorded = record_check(Scaled(0.0))
    assert compare(Scaled(0.0), recorded).min_cosine == pytest.approx(1.0)
    assert compare(Scaled(0.01), recorded).passed  # cosine 0.99995: bf16 vs float32 territory
    moved = compare(Scaled(0.1), recorded)  # cosine 0.995
    assert not moved.passed and moved.min_cosine < MIN_COSINE
    assert moved.summary() == {"passed": False, "min_cosine": pytest.approx(0.995037, abs=1e-5), "needed": MIN_COSINE}


def test_a_tokenizer_changed_in_the_model_folder_is_refused_before_anything_is_written(model_dir, tmp_path, monkeypatch):
    index, settings = tmp_path / "idx", folder_settings(model_dir)
    ingest(write_docs(tmp_path / "src"), index, settings)
    before = SegmentStore.read_manifest(index)
    swap_tokens(model_dir)
    fresh_loads(monkeypatch)
    with pytest.raises(EncoderDriftError, match="Rebuild the index"):
        ingest(write_docs(tmp_path / "more", MORE), index, settings.model_copy(update={"delete_missing": False}))
    after = SegmentStore.read_manifest(index)
    assert after.version == before.version and after.count == before.count
    # the identity alone would have let it through: same weights, same settings
    assert open_index(index, settings).encoder.identity() == before.encoder
    # a rebuild re-embeds everything with the encoder in hand and records its check
    rebuild(index, settings, source=tmp_path / "src")
    rebuilt = SegmentStore.read_manifest(index)
    assert rebuilt.encoder_check != before.encoder_check
    ingest(write_docs(tmp_path / "more", MORE), index, settings.model_copy(update={"delete_missing": False}))
    assert SegmentStore.read_manifest(index).count == rebuilt.count + 1


def test_a_rebuild_keeping_vectors_fits_no_correction_with_an_encoder_that_drifted(model_dir, tmp_path, monkeypatch):
    index, settings = tmp_path / "idx", folder_settings(model_dir)
    ingest(write_docs(tmp_path / "src"), index, settings.model_copy(update={"correction": "none"}))
    before = SegmentStore.read_manifest(index)
    swap_tokens(model_dir)
    fresh_loads(monkeypatch)
    with pytest.raises(EncoderDriftError):  # its pseudo-queries would not be the stored vectors' kind
        rebuild(index, settings.model_copy(update={"correction": "center"}), keep_vectors=True)
    assert SegmentStore.read_manifest(index).version == before.version
    # changing only the index kind embeds nothing, so it needs no check
    rebuild(index, settings.model_copy(update={"correction": "none"}), keep_vectors=True, index_kind="flat")
    assert SegmentStore.read_manifest(index).encoder_check == before.encoder_check


def test_an_app_opening_the_index_in_process_is_told_and_a_one_shot_query_is_not_slowed(
        model_dir, tmp_path, monkeypatch, caplog):
    index, settings = tmp_path / "idx", folder_settings(model_dir)
    ingest(write_docs(tmp_path / "src"), index, settings)
    assert open_index(index, settings).encoder_check.passed
    swap_tokens(model_dir)
    fresh_loads(monkeypatch)
    with caplog.at_level("ERROR", logger="pipelines.query"):
        opened = open_index(index, settings)
    assert not opened.encoder_check.passed and "Rebuild it" in caplog.text
    assert opened.search("the cat", 2)  # it still answers: the stored vectors are intact
    hybrid, dense = opened.query_warnings("the cat", "hybrid"), opened.query_warnings("the cat", "dense")
    assert len(hybrid) == 1 and "dense scores are unreliable; keyword search is unaffected" in hybrid[0]
    assert len(dense) == 1 and "keyword" not in dense[0] and "htp-index rebuild" in dense[0]
    assert opened.query_warnings("the cat", "sparse") == []
    fresh_loads(monkeypatch)
    assert open_index(index, settings, check_encoder=False).encoder_check is None


def test_the_service_says_degraded_when_its_encoder_no_longer_matches(model_dir, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from pipelines.service import create_app

    index, settings = tmp_path / "idx", folder_settings(model_dir)
    ingest(write_docs(tmp_path / "src"), index, settings)
    with TestClient(create_app(index, settings, reload_interval=0)) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["encoder_check"]["passed"] is True
    swap_tokens(model_dir)
    fresh_loads(monkeypatch)
    with TestClient(create_app(index, settings, reload_interval=0)) as client:
        response = client.get("/health")
        assert response.status_code == 200  # the stored vectors are intact; it keeps answering
        health = response.json()
        assert health["status"] == "degraded" and health["encoder_check"]["passed"] is False
        answer = client.post("/query", json={"query": "the cat"})
        assert answer.status_code == 200 and answer.json()["results"]
        # the app that only queries is told too, in every answer that uses the vectors
        assert ["dense scores are unreliable" in w for w in answer.json()["warnings"]] == [True]
        sparse = client.post("/query", json={"query": "the cat", "mode": "sparse"}).json()
        assert sparse["results"] and sparse["warnings"] == []


def test_a_version_with_the_same_check_record_keeps_warning_after_the_service_switches(
        model_dir, tmp_path, monkeypatch):
    from pipelines.maintenance import compact_index
    from pipelines.service import IndexHolder

    index, settings = tmp_path / "idx", folder_settings(model_dir)
    ingest(write_docs(tmp_path / "src"), index, settings)
    (tmp_path / "src" / "more.txt").write_text("A bird sang on the roof at dawn.")
    ingest(tmp_path / "src", index, settings)  # a second segment, for compact to merge
    swap_tokens(model_dir)
    fresh_loads(monkeypatch)
    holder = IndexHolder(index, settings)
    assert not holder.encoder_check.passed and holder.current.query_warnings("the cat")
    merged = compact_index(index, settings)  # a new version, the same check record
    assert merged.merges and holder.refresh() and holder.current.version == merged.version
    # not checked again (the same record), and its answers still say so
    assert holder.current.encoder_check is holder.encoder_check
    assert ["dense scores are unreliable" in w for w in holder.current.query_warnings("the cat")] == [True]


def test_an_index_written_before_checks_gets_one_at_its_next_write(tmp_path, embedding):
    index, settings = tmp_path / "idx", settings_for(embedding)
    ingest(write_docs(tmp_path / "src"), index, settings, embedding=embedding)
    store = FaissVectorStore.open(index)
    store.record_encoder_check(None)  # as an older htp-index wrote it
    store.persist(force=True)
    old = SegmentStore.read_manifest(index)
    assert old.encoder_check is None and old.checksum == old.body_checksum()
    assert "encoder_check" not in old.model_dump(exclude_none=True)
    assert open_index(index, settings, embedding=embedding).check_encoder() is None
    ingest(write_docs(tmp_path / "more", MORE), index, settings.model_copy(update={"delete_missing": False}),
           embedding=embedding)
    assert SegmentStore.read_manifest(index).encoder_check is not None
    assert SegmentStore.read_manifest(index).count > old.count
