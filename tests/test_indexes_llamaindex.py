"""FaissVectorStore driven by LlamaIndex itself: VectorStoreIndex, insert, delete, refresh."""

from __future__ import annotations

from pathlib import Path

import pytest
from indexes_fixtures import ENCODER, HashingEmbedding
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from indexes import FaissVectorStore

TOPICS = {
    "cats": "cats purr and sleep on warm mats all afternoon",
    "dogs": "dogs bark at the mailman and chase balls in the park",
    "ocean": "whales and dolphins swim in the deep blue ocean",
    "space": "rockets carry astronauts to the orbiting space station",
    "bread": "bakers knead dough and bake crusty bread at dawn",
    "chess": "grandmasters plan chess openings and endgames for hours",
}


def documents() -> list[Document]:
    return [
        Document(text=text, id_=name, metadata={"topic": name, "length": len(text)})
        for name, text in TOPICS.items()
    ]


def build(tmp_path: Path, kind: str = "flat") -> tuple[VectorStoreIndex, FaissVectorStore]:
    store = FaissVectorStore.create(tmp_path / "index", dim=64, encoder=ENCODER, index_kind=kind)
    index = VectorStoreIndex.from_documents(
        documents(),
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=HashingEmbedding(),
    )
    return index, store


def retrieved_docs(index: VectorStoreIndex, text: str, k: int = 3, **kwargs) -> list[str]:
    hits = index.as_retriever(similarity_top_k=k, **kwargs).retrieve(text)
    return [hit.node.ref_doc_id for hit in hits]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_vector_store_index_builds_and_retrieves_the_matching_document(tmp_path, kind):
    index, store = build(tmp_path, kind)
    assert store.count == len(TOPICS)
    hits = index.as_retriever(similarity_top_k=2).retrieve("whales swim in the ocean")
    assert hits[0].node.ref_doc_id == "ocean"
    assert hits[0].node.get_content() == TOPICS["ocean"]
    assert hits[0].node.metadata["topic"] == "ocean"
    assert hits[0].score >= hits[1].score


def test_insert_adds_a_retrievable_document(tmp_path):
    index, store = build(tmp_path)
    index.insert(Document(text="volcanoes erupt lava and ash", id_="volcano"))
    assert store.count == len(TOPICS) + 1
    assert retrieved_docs(index, "lava from volcanoes", k=1) == ["volcano"]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat"])
def test_delete_ref_doc_removes_its_vectors_for_good(tmp_path, kind):
    index, store = build(tmp_path, kind)
    index.delete_ref_doc("dogs", delete_from_docstore=True)
    assert store.count == len(TOPICS) - 1
    assert store.ref_doc_node_ids("dogs") == []
    for text in [TOPICS["dogs"], "dogs bark", "park balls mailman", "anything at all"]:
        assert "dogs" not in retrieved_docs(index, text, k=len(TOPICS))


def test_refresh_ref_docs_replaces_a_changed_document(tmp_path):
    index, store = build(tmp_path)
    old_nodes = set(store.ref_doc_node_ids("bread"))
    changed = documents()
    changed[4] = Document(
        text="pastry chefs fold butter into croissants", id_="bread", metadata={"topic": "bread"}
    )
    assert index.refresh_ref_docs(changed) == [False, False, False, False, True, False]
    assert store.count == len(TOPICS)
    assert set(store.ref_doc_node_ids("bread")).isdisjoint(old_nodes)
    hits = index.as_retriever(similarity_top_k=1).retrieve("butter croissants")
    assert hits[0].node.get_content() == "pastry chefs fold butter into croissants"
    all_texts = [n.get_content() for n in store.all_nodes()]
    assert TOPICS["bread"] not in all_texts


def test_retriever_filters_apply_inside_the_search(tmp_path):
    index, _ = build(tmp_path)
    filters = MetadataFilters(
        filters=[MetadataFilter(key="topic", value=["cats", "chess"], operator=FilterOperator.IN)]
    )
    found = retrieved_docs(index, "whales swim in the ocean", k=5, filters=filters)
    assert sorted(found) == ["cats", "chess"]


def test_retriever_passes_search_knobs_through(tmp_path):
    index, _ = build(tmp_path, "hnsw")
    retriever = index.as_retriever(similarity_top_k=1, vector_store_kwargs={"ef_search": 8})
    assert retriever.retrieve("rockets and astronauts")[0].node.ref_doc_id == "space"
    # a misspelled knob is refused, not dropped in favour of the default
    for misspelled in ({"ef_serch": 8}, {"fusion_method": "rrf"}):
        with pytest.raises(TypeError, match="unknown store option"):
            index.as_retriever(similarity_top_k=1, vector_store_kwargs=misspelled).retrieve("rockets")


def test_storage_context_persist_writes_a_new_version_and_a_pointer_that_reopens(tmp_path):
    index, store = build(tmp_path)
    before = store.version
    index.storage_context.persist(persist_dir=str(tmp_path / "llama-storage"))
    assert store.version == before + 1
    pointer = tmp_path / "llama-storage" / "default__vector_store.json"
    assert pointer.is_file()  # written where LlamaIndex asked, naming the index directory
    reopened = FaissVectorStore.from_persist_path(pointer, expected_encoder=ENCODER)
    assert reopened.path == (tmp_path / "index").resolve() and reopened.version == store.version
    again = VectorStoreIndex.from_vector_store(reopened, embed_model=HashingEmbedding())
    assert retrieved_docs(again, "knead dough", k=1) == ["bread"]
    assert retrieved_docs(again, "chess openings", k=3) == retrieved_docs(index, "chess openings")


def test_get_nodes_and_delete_nodes_by_filter(tmp_path):
    _, store = build(tmp_path)
    space = store.get_nodes(
        filters=MetadataFilters(filters=[MetadataFilter(key="topic", value="space")])
    )
    assert [n.ref_doc_id for n in space] == ["space"]
    store.delete_nodes(
        filters=MetadataFilters(
            filters=[MetadataFilter(key="length", value=50, operator=FilterOperator.GT)]
        )
    )
    assert all(len(TOPICS[n.ref_doc_id]) <= 50 for n in store.all_nodes())
    assert store.count == sum(len(t) <= 50 for t in TOPICS.values())
