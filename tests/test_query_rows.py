"""A query reads its results from the stored rows (`SegmentStore.retrieve`, no LlamaIndex);
they must say exactly what LlamaIndex's nodes from `FaissVectorStore.query` say."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from indexes_fixtures import ENCODER, HASH_DIM, HashingEmbedding
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from indexes import FaissVectorStore, SegmentStore
from pipelines.query import result_dict

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "cats and dogs share the garden",
         "the mat was red and old"]


@pytest.fixture
def index_dir(tmp_path):
    embed = HashingEmbedding()
    nodes = []
    for i, text in enumerate(TEXTS):
        node = TextNode(id_=f"n{i}", text=text, embedding=embed._vector(text), metadata={
            "year": 2020 + i, "tags": ["a", str(i)], "nested": {"depth": i, "ok": True},
            "when": datetime.date(2024, 1, i + 1).isoformat(), "doc_id": f"meta-doc-{i}",
        })
        if i % 2 == 0:  # a source document for half of them; the others name theirs in metadata
            node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"doc-{i // 2}")
        nodes.append(node)
    store = FaissVectorStore.create(tmp_path / "idx", dim=HASH_DIM, encoder=ENCODER, index_kind="flat")
    store.add(nodes)
    store.persist()
    return tmp_path / "idx"


def node_result(node, score) -> dict:
    """What a result said when it was built from LlamaIndex's node (before rows were read)."""
    return {"node_id": node.node_id, "doc_id": node.ref_doc_id or node.metadata.get("doc_id"),
            "score": float(score), "text": node.get_content(), "metadata": dict(node.metadata)}


@pytest.mark.parametrize(("mode", "llama_mode"), [("dense", VectorStoreQueryMode.DEFAULT),
                                                  ("sparse", VectorStoreQueryMode.SPARSE),
                                                  ("hybrid", VectorStoreQueryMode.HYBRID)])
def test_results_from_rows_equal_results_from_nodes(index_dir, mode, llama_mode):
    query = "the cat on the red mat"
    vector = HashingEmbedding()._vector(query)
    engine = SegmentStore.open(index_dir)
    rows = engine.retrieve(mode, 3, embedding=np.asarray(vector), text=query)
    nodes = FaissVectorStore.open(index_dir).query(VectorStoreQuery(
        query_embedding=vector, query_str=query, similarity_top_k=3, mode=llama_mode))
    assert len(rows) == 3
    assert [result_dict(row, score) for row, score in rows] == [
        node_result(node, score) for node, score in zip(nodes.nodes, nodes.similarities, strict=True)]
    for row, score in rows:  # the source document where there is one, else the metadata's doc_id
        number = int(row.node_id[1:])
        expected = f"doc-{number // 2}" if number % 2 == 0 else f"meta-doc-{number}"
        assert result_dict(row, score)["doc_id"] == expected


def test_the_engine_filters_like_the_vector_store(index_dir):
    engine = SegmentStore.open(index_dir)
    recent = MetadataFilters(filters=[MetadataFilter(key="year", value=2022, operator=FilterOperator.GTE)])
    found = engine.retrieve("sparse", 5, text="the mat", filters=recent)
    assert {row.node_id for row, _ in found} == {"n3"}  # "the mat" is in n0 and n3; n0 is 2020


def test_the_engine_says_what_a_search_lacks(index_dir):
    engine = SegmentStore.open(index_dir)
    with pytest.raises(ValueError, match="needs the query text"):
        engine.retrieve("hybrid", 3, embedding=np.zeros(HASH_DIM))
    with pytest.raises(ValueError, match="needs the query embedding"):
        engine.retrieve("dense", 3)
    with pytest.raises(ValueError, match="unknown search mode"):
        engine.retrieve("keyword", 3, text="cat")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown search options"):
        engine.retrieve("sparse", 3, text="cat", nprobes=4)
