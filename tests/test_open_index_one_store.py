"""An open index is one store: what LlamaIndex writes through ``as_index()`` the index's own
search sees, and the other way round."""

from __future__ import annotations

import pytest
from llama_index.core.schema import Document
from pipeline_helpers import settings_for

from indexes import FaissVectorStore
from pipelines.query import open_index


def test_a_node_inserted_through_as_index_is_found_by_search(index_dir, embedding):
    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    before = index.store.count
    text = "Zymurgy kettles ferment quietly beside the lighthouse archive."
    index.as_index().insert(Document(text=text, id_="zymurgy"))
    assert index.store.count == before + 1
    hits = index.search("zymurgy kettles lighthouse", top_k=1, mode="sparse")
    assert hits and hits[0]["text"] == text
    dense = index.search(text, top_k=1, mode="dense")
    assert dense[0]["text"] == text
    index.store.persist()
    reopened = open_index(index_dir, settings_for(embedding), embedding=embedding)
    assert reopened.search("zymurgy kettles lighthouse", top_k=1, mode="sparse")[0]["text"] == text


def test_unpersisted_changes_to_the_store_are_not_left_behind_by_as_index(index_dir, embedding):
    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    first = index.search("anything at all", top_k=1, mode="dense")[0]["node_id"]
    index.store.delete_nodes([first])
    # LlamaIndex's store takes the open store over, its unpersisted change included (it was
    # refused: the store was reopened from disk, which would have left the change behind)
    retriever = index.as_retriever(similarity_top_k=10, vector_store_query_mode="default")
    found = {hit.node.node_id for hit in retriever.retrieve("anything at all")}
    assert first not in found and found
    assert index.vector_store is index.store and index.store.dirty
    index.store.persist()
    reopened = open_index(index_dir, settings_for(embedding), embedding=embedding)
    assert first not in {r["node_id"] for r in reopened.search("anything at all", top_k=10, mode="dense")}


def test_an_as_index_write_after_another_commit_is_a_conflict_not_a_roll_back(index_dir, embedding, tmp_path):
    """An app holds the index open; a scheduled ingest commits; the app then inserts through
    LlamaIndex and persists: its change was made against the older version, so it is refused,
    and the ingest's document stays."""
    from indexes import IndexConflictError
    from pipelines.ingest import ingest

    settings = settings_for(embedding)
    index = open_index(index_dir, settings, embedding=embedding)
    source = tmp_path / "more"
    source.mkdir()
    (source / "ship.txt").write_text("the ship sailed over the sea at night .", encoding="utf-8")
    assert ingest(source, index_dir, settings, embedding=embedding).added == 1
    index.as_index().insert(Document(text="zymurgy kettles ferment quietly .", id_="zymurgy"))
    with pytest.raises(IndexConflictError):
        index.store.persist()
    reopened = open_index(index_dir, settings, embedding=embedding)
    assert "ship.txt" in {hit["doc_id"] for hit in reopened.search("ship sailed sea", top_k=5, mode="sparse")}


def test_a_document_updated_through_as_index_is_replaced_by_the_next_ingest_not_doubled(tmp_path, embedding):
    """LlamaIndex's update_ref_doc deletes the document (and its recorded hash) and inserts it
    again without one: the next ingest counted the file as new and added its nodes beside the
    LlamaIndex ones, so queries returned the document twice."""
    from pipeline_helpers import DOCS, write_docs

    from pipelines.ingest import ingest

    settings = settings_for(embedding)
    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    count = index.store.count
    index.as_index().update_ref_doc(Document(text="zymurgy kettles ferment quietly .", id_="cats.txt"))
    index.store.persist()
    again = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert (again.added, again.updated, again.unchanged) == (0, 1, len(DOCS) - 1)
    reopened = open_index(tmp_path / "idx", settings, embedding=embedding)
    assert reopened.store.count == count
    assert [hit["doc_id"] for hit in reopened.search("the cat sat on the mat", 10, mode="sparse")].count("cats.txt") == 1
    assert not reopened.search("zymurgy kettles", 5, mode="sparse")  # the source's version replaced it


def test_a_node_inserted_on_its_own_through_as_index_does_not_stop_a_rebuild_or_an_ingest(tmp_path, embedding):
    """A TextNode without a source document or a doc_id: rebuilds and ingests stopped at a bare
    KeyError: 'doc_id'. It is its own document now, and kept."""
    from llama_index.core.schema import TextNode
    from pipeline_helpers import write_docs

    from pipelines.ingest import ingest
    from pipelines.rebuild import rebuild

    settings = settings_for(embedding)
    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    index.as_index().insert_nodes([TextNode(text="penguins swim in cold antarctic water .", id_="loose")])
    index.store.persist()
    rebuild(tmp_path / "idx", settings, embedding=embedding, keep_vectors=True)
    rebuild(tmp_path / "idx", settings, embedding=embedding)
    (source / "more.txt").write_text("the owl hooted at the moon .")
    assert ingest(source, tmp_path / "idx", settings, embedding=embedding).added == 1
    hits = open_index(tmp_path / "idx", settings, embedding=embedding).search("penguins antarctic", 1, mode="sparse")
    assert [hit["node_id"] for hit in hits] == ["loose"]


@pytest.mark.parametrize("keep_missing", [False, True])
def test_rebuild_from_a_source_counts_or_keeps_documents_written_through_as_index(tmp_path, embedding, keep_missing):
    """A document (and a lone node) inserted through LlamaIndex is not in the folder: rebuild
    --source left both out of the new version saying deleted: 0, with --keep-missing too."""
    from llama_index.core.schema import TextNode
    from pipeline_helpers import DOCS, write_docs

    from pipelines.ingest import ingest
    from pipelines.rebuild import rebuild

    settings = settings_for(embedding).model_copy(update={"delete_missing": not keep_missing})
    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    index.as_index().insert(Document(text="zymurgy kettles ferment quietly .", id_="zymurgy"))
    index.as_index().insert_nodes([TextNode(text="penguins swim in cold antarctic water .", id_="loose")])
    index.store.persist()
    stats = rebuild(tmp_path / "idx", settings, embedding=embedding, source=source)
    rebuilt = open_index(tmp_path / "idx", settings, embedding=embedding)
    found = {hit["doc_id"] or hit["node_id"] for q in ("zymurgy kettles", "penguins antarctic")
             for hit in rebuilt.search(q, 1, mode="sparse")}
    if keep_missing:
        assert stats.deleted == 0 and rebuilt.store.count == len(DOCS) + 2 and {"zymurgy", "loose"} <= found
    else:
        assert stats.deleted == 2 and rebuilt.store.count == len(DOCS) and not {"zymurgy", "loose"} & found


def test_a_document_inserted_through_as_index_is_split_as_ingest_splits_it(tmp_path, embedding):
    """as_index().insert used LlamaIndex's default splitter (1,024 of its own tokens a node),
    not the node size the index recorded, so nodes ran past the encoder's window."""
    from pipeline_helpers import long_doc, write_docs

    from pipelines.ingest import ingest

    settings = settings_for(embedding).model_copy(update={"chunk_size": 48})
    text = long_doc(30, seed=9)
    ingest(write_docs(tmp_path / "src", {"long.txt": text}), tmp_path / "idx", settings, embedding=embedding)
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    by_ingest = len(index.store.ref_doc_node_ids("long.txt"))
    index.as_index().insert(Document(text=text, id_="same-text"))
    inserted = index.store.ref_doc_node_ids("same-text")
    assert by_ingest > 2 and len(inserted) == by_ingest
    tokens = [len(embedding.encoder.tokenize(node.get_content())) for node in index.store.get_nodes(node_ids=inserted)]
    assert max(tokens) <= 48


def test_insert_and_refresh_through_as_index_replace_a_document_they_meet_again(index_dir, embedding):
    """After a reopen, LlamaIndex's refresh_ref_docs (its hashes are in memory) inserted every
    document again, and an insert of an id the index held added a second copy."""
    settings = settings_for(embedding)
    index = open_index(index_dir, settings, embedding=embedding)
    count = index.store.count
    note = Document(text="zymurgy kettles ferment quietly .", id_="zymurgy")
    assert index.as_index().refresh_ref_docs([note]) == [True]
    index.store.persist()
    for _ in range(2):  # reopened each time: LlamaIndex's own hashes are gone
        index = open_index(index_dir, settings, embedding=embedding)
        index.as_index().refresh_ref_docs([note])
        index.store.persist()
    from pipeline_helpers import long_doc

    index.as_index().insert(Document(text=long_doc(80, seed=2), id_="cats.txt"))  # several nodes
    assert len(index.store.ref_doc_node_ids("cats.txt")) > 1
    index.as_index().insert(Document(text="the cat sat on the zymurgy mat .", id_="cats.txt"))
    index.store.persist()
    reopened = open_index(index_dir, settings, embedding=embedding)
    assert reopened.store.count == count + 1
    assert [hit["doc_id"] for hit in reopened.search("zymurgy", 10, mode="sparse")].count("zymurgy") == 1
    assert len(reopened.store.ref_doc_node_ids("cats.txt")) == 1  # no node of the longer text left


def test_a_document_inserted_through_as_index_is_cleaned_as_a_file_is_read(index_dir, embedding):
    """Soft hyphens and controls stayed in an inserted text (the dense side saw 15 tokens for
    10, cosine 0.992 to the clean text), and a lone surrogate raised the tokenizer's TypeError."""
    from pipelines.errors import DocumentRejected

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    given = Document(text="Zymurgy docu\u00admentation\x07 of kettles.", id_="zymurgy")
    index.as_index().insert(given)
    hits = index.search("zymurgy documentation", top_k=1, mode="sparse")
    assert hits[0]["text"] == "Zymurgy documentation of kettles."
    assert given.get_content() == "Zymurgy docu\u00admentation\x07 of kettles."  # the caller's own is kept
    with pytest.raises(DocumentRejected, match="surrogate"):
        index.as_index().insert(Document(text="broken \ud83d half emoji", id_="broken"))


def test_a_documents_nodes_deleted_through_the_api_come_back_at_the_next_ingest(tmp_path, embedding):
    # delete_nodes left the document's hash, so every later ingest took the unchanged file as
    # indexed and its nodes stayed gone (only a rebuild cleared it)
    from pipeline_helpers import write_docs

    from pipelines.ingest import ingest

    source, settings = write_docs(tmp_path / "src"), settings_for(embedding)
    ingest(source, tmp_path / "idx", settings, embedding=embedding)
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    index.store.delete_nodes(["cats.txt#0"])
    index.store.persist()
    stats = ingest(source, tmp_path / "idx", settings, embedding=embedding)
    assert (stats.updated, stats.unchanged, stats.count) == (1, 2, 3)
    hits = open_index(tmp_path / "idx", settings, embedding=embedding).search("cat mat", top_k=1, mode="sparse")
    assert hits[0]["node_id"] == "cats.txt#0"
    (source / "cats.txt").unlink()  # and a file removed after such a delete is deleted as gone
    index = open_index(tmp_path / "idx", settings, embedding=embedding)
    index.store.delete_nodes(["cats.txt#0"])
    index.store.persist()
    assert ingest(source, tmp_path / "idx", settings, embedding=embedding).deleted == 1
    assert "cats.txt" not in FaissVectorStore.open(tmp_path / "idx").doc_hashes()


def test_an_inserted_document_carries_its_doc_id_as_ingested_ones_do(index_dir, embedding):
    # ingest tags every node with metadata doc_id; an inserted document got none (a doc_id
    # filter never found it), and a doc_id of the caller's own was kept, unlike a JSONL record's
    from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters

    from pipelines.errors import DocumentRejected

    index = open_index(index_dir, settings_for(embedding), embedding=embedding)
    document = Document(text="Guava orchards line the quiet valley road.", id_="g1", metadata={"k": "v"})
    index.as_index().insert(document)
    assert document.metadata == {"k": "v"}  # the caller's document is left as given
    found = index.store.get_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="doc_id", value="g1")]))
    assert [node.metadata for node in found] == [{"k": "v", "doc_id": "g1"}]
    assert "g1" not in found[0].get_content(metadata_mode="embed")  # the encoder sees the text alone
    with pytest.raises(DocumentRejected, match="'doc_id' is reserved"):
        index.as_index().insert(Document(text="Another text.", id_="g2", metadata={"doc_id": "mine"}))
