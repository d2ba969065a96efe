"""The incremental ingest contract, through the real pipeline, FAISS store and a tiny decoder."""

from __future__ import annotations

import pytest
from pipeline_helpers import DOCS, fail_embedding_of, long_doc, settings_for, write_docs

from indexes import FaissVectorStore
from pipelines.ingest import ingest
from pipelines.query import open_index
from pipelines.runs import plan_ingest
from pipelines.sources import SourceDocument, SourceError


def doc_ids(index_dir, embedding, query="the cat", k=20):
    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    return {hit["doc_id"] for hit in index.search(query, top_k=k)}


def test_plan_classifies_new_changed_unchanged_deleted_and_keeps_failed():
    known = {"a": SourceDocument("a", "same").content_hash, "b": "old-hash", "c": "x", "d": "y"}
    items = [SourceDocument("a", "same"), SourceDocument("b", "new text"), SourceDocument("e", "fresh"), SourceError("d", "unreadable")]
    plan = plan_ingest(items, known)
    assert [d.doc_id for d in plan.new] == ["e"]
    assert [d.doc_id for d in plan.changed] == ["b"]
    assert plan.unchanged == ["a"]
    assert plan.deleted == ["c"]  # d failed to read: its indexed version stays
    assert plan_ingest(items, known, delete_missing=False).deleted == []


def test_first_ingest_adds_everything(tmp_path, embedding):
    source = write_docs(tmp_path / "src")
    stats = ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert (stats.added, stats.updated, stats.deleted, stats.failed) == (3, 0, 0, 0)
    assert stats.nodes_embedded == 3 and stats.count == 3 and stats.version is not None
    assert stats.tokens > 0
    assert doc_ids(tmp_path / "idx", embedding) == set(DOCS)


def test_second_run_on_unchanged_input_embeds_nothing_and_changes_nothing(tmp_path, embedding):
    source = write_docs(tmp_path / "src")
    first = ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    second = ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert second.nodes_embedded == 0 and second.unchanged == 3
    assert (second.added, second.updated, second.deleted) == (0, 0, 0)
    assert second.version == first.version  # no new version written


def test_editing_one_file_re_embeds_only_its_nodes_and_drops_its_old_vectors(tmp_path, embedding):
    source = write_docs(tmp_path / "src", {**DOCS, "long.txt": long_doc(30)})
    settings = settings_for(embedding)
    first = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    store = FaissVectorStore.open(tmp_path / "idx")
    old_nodes = set(store.ref_doc_node_ids("cats.txt"))
    long_nodes = len(store.ref_doc_node_ids("long.txt"))
    assert long_nodes > 1
    (source / "cats.txt").write_text("protein binds receptor . cells grew faster .", encoding="utf-8")
    second = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert (second.updated, second.unchanged, second.added) == (1, 3, 0)
    assert second.nodes_embedded == 1
    assert second.count == first.count
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    texts = [hit["text"] for hit in index.search("the cat sat on the mat", top_k=50)]
    assert not any("cat sat" in text for text in texts)
    assert any("protein binds receptor" in text for text in texts)
    store = FaissVectorStore.open(tmp_path / "idx")
    assert len(store.ref_doc_node_ids("long.txt")) == long_nodes
    assert set(store.ref_doc_node_ids("cats.txt")) == old_nodes  # deterministic node ids


def test_deleting_a_file_removes_it_from_index_and_results(tmp_path, embedding):
    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    (source / "sea.md").unlink()
    stats = ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert stats.deleted == 1 and stats.count == 2
    assert "sea.md" not in doc_ids(tmp_path / "idx", embedding, "fish swam in the sea")


def test_keep_missing_makes_the_source_append_only(tmp_path, embedding):
    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    (source / "sea.md").unlink()
    stats = ingest(source, tmp_path / "idx", settings_for(embedding, delete_missing=False), embedding=embedding)
    assert stats.deleted == 0 and stats.count == 3


def test_bad_documents_are_reported_and_the_rest_is_indexed(tmp_path, embedding):
    source = write_docs(tmp_path / "src")
    (source / "empty.txt").write_text("", encoding="utf-8")
    (source / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    stats = ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert stats.added == 3 and stats.failed == 2
    assert {e["doc_id"] for e in stats.errors} == {"empty.txt", "latin1.txt"}


def test_a_document_that_breaks_the_encoder_fails_alone(tmp_path, embedding, monkeypatch):
    source = write_docs(tmp_path / "src")
    fail_embedding_of(embedding, "moon", monkeypatch)
    stats = ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert stats.added == 2 and stats.failed == 1
    assert stats.errors[0]["doc_id"] == "night.txt" and "simulated" in stats.errors[0]["error"]


def test_texts_through_the_api(tmp_path, embedding):
    stats = ingest({"x": "the cat sat .", "y": "fish swam ."}, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    assert stats.added == 2 and doc_ids(tmp_path / "idx", embedding) == {"x", "y"}


def test_an_explicitly_different_encoder_is_refused(tmp_path, embedding):
    from indexes import EncoderMismatchError

    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    other = embedding.encoder.with_method("vanilla")
    from htp_embed.llama_index import HTPEmbedding

    with pytest.raises(EncoderMismatchError, match="rebuild"):
        ingest(source, tmp_path / "idx", settings_for(embedding), embedding=HTPEmbedding(other))


def _nodes(doc_id: str, texts: list[str]):
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode

    return [TextNode(id_=f"{doc_id}#{i}", text=text, relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc_id)})
            for i, text in enumerate(texts)]


def test_one_long_document_moves_the_progress_bar_pass_by_pass():
    """A document of 1,155 nodes is one call to the encoder: the bar read 0 for minutes, then
    all at once. It now moves with each forward pass."""
    from tiny_decoder import tiny_encoder

    from pipelines.engine import embed_batch

    encoder = tiny_encoder(batch_size=2)
    calls: list[int] = []
    embedded = embed_batch(_nodes("long", [f"Sentence number {i} of a long text. " * 30 for i in range(7)]), encoder, calls.append)
    assert len(embedded.node_ids) == 7 and sum(calls) == 7 and len(calls) >= 3


def test_a_batch_that_fails_part_way_counts_every_node_once_on_the_bar():
    """The retry document by document covers what the failed attempt's passes already showed."""
    import numpy as np

    from htp_embed.encoder import Encoded
    from pipelines.engine import embed_batch

    class OneTextAPass:
        dim = 4

        def identity(self):
            return {"model": "fake", "dim": 4}

        def encode_with_stats(self, texts, *, is_query=False, on_batch=None):
            for text in texts:
                if "boom" in text:
                    raise RuntimeError("simulated failure")
                on_batch(1)
            return Encoded(np.ones((len(texts), 4), np.float32) / 2, len(texts), len(texts), 0)

    calls: list[int] = []
    batch = _nodes("a", ["one", "two", "three"]) + _nodes("b", ["four", "boom five"]) + _nodes("c", ["six"])
    embedded = embed_batch(batch, OneTextAPass(), calls.append)
    assert sum(calls) == len(batch)  # 4 shown before the failure, then only the 2 not yet shown
    assert len(embedded.node_ids) == 4 and set(embedded.errors) == {"b"}
