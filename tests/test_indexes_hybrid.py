"""Keyword (FTS5 BM25) and hybrid search inside FaissVectorStore: in step with the vectors
through every write, safe against hostile query text, filtered in every mode."""

from __future__ import annotations

import pytest
from indexes_fixtures import ENCODER, HashingEmbedding, write_format1_index
from llama_index.core import VectorStoreIndex
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from indexes import FaissVectorStore, fusion, keywords
from indexes import persist as persist_module

EMBED = HashingEmbedding()
TEXTS = {
    "bees": "Honeybees communicate the direction of flowers with a waggle dance.",
    "aqueduct": "Roman aqueducts carried water across valleys on stone arches.",
    "faiss": "FAISS searches dense vectors with flat, HNSW and IVF indexes.",
    "htp": "Hierarchical token prepending copies block summaries into placeholder tokens.",
    "version": "Release ver1.1 fixed the NEAR operator and the AND keyword in queries.",
}


def node(doc: str, text: str, **metadata) -> TextNode:
    item = TextNode(
        id_=f"{doc}#0", text=text, metadata={"doc_id": doc, **metadata},
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc)},
    )
    item.embedding = EMBED.get_text_embedding(text)
    return item


def make_store(tmp_path, texts=TEXTS) -> FaissVectorStore:
    store = FaissVectorStore.create(tmp_path / "idx", dim=EMBED.dim, encoder=ENCODER)
    store.add([node(doc, text, topic=doc) for doc, text in texts.items()])
    return store


def ask(store, text, mode="sparse", k=3, **extra):
    query = VectorStoreQuery(
        query_str=text, similarity_top_k=k, mode=VectorStoreQueryMode(mode),
        query_embedding=EMBED.get_query_embedding(text) if mode != "sparse" else None, **extra,
    )
    return store.query(query)


def doc_ids(result) -> list[str]:
    return [i.split("#")[0] for i in result.ids]


def test_keyword_search_ranks_the_document_with_the_words_first(tmp_path):
    store = make_store(tmp_path)
    result = ask(store, "how do bees dance?")
    assert doc_ids(result)[0] == "bees"
    assert result.similarities[0] > 0
    assert doc_ids(ask(store, "dancing honeybee"))[0] == "bees"  # Porter stemming


def test_keyword_table_follows_upsert_delete_clear_and_persist(tmp_path):
    store = make_store(tmp_path)
    store.add([node("bees", "Ants build bridges out of their own bodies.")])  # upsert
    assert doc_ids(ask(store, "waggle dance")) == []
    assert doc_ids(ask(store, "ant bridges")) == ["bees"]
    store.delete("aqueduct")
    assert doc_ids(ask(store, "roman aqueducts water")) == []
    store.delete_nodes(["faiss#0"])
    assert "faiss" not in doc_ids(ask(store, "dense vectors HNSW"))
    store.persist()
    reopened = FaissVectorStore.open(store.path)
    assert reopened.has_sparse and reopened.query_modes == ["dense", "sparse", "hybrid"]
    assert doc_ids(ask(reopened, "ant bridges")) == ["bees"]
    assert doc_ids(ask(reopened, "placeholder summaries")) == ["htp"]
    assert reopened.keyword_rows() == reopened.count == 3
    reopened.clear()
    assert doc_ids(ask(reopened, "placeholder summaries")) == []


@pytest.mark.parametrize(
    "text",
    [
        'ver1.1 AND "NEAR(" OR * -',
        '"unbalanced quote',
        "NOT AND OR NEAR",
        "col:umn ^start {braces} (parens",
        "🐝🐝 emoji only 🌸",
        "the of and",  # only stop words
        "???",
        "word " * 800,  # 4,000 characters
    ],
)
def test_hostile_query_text_never_raises(tmp_path, text):
    store = make_store(tmp_path)
    for mode in ("sparse", "hybrid"):
        result = ask(store, text, mode=mode)
        assert len(result.ids) == len(result.similarities) <= 3


def test_fts5_syntax_in_user_text_is_searched_as_words(tmp_path):
    store = make_store(tmp_path)
    assert doc_ids(ask(store, 'ver1.1 NEAR "operator"'))[0] == "version"


def test_filters_apply_in_sparse_and_hybrid_modes(tmp_path):
    texts = {f"d{i}": f"common words about topic number {i} and bees" for i in range(40)}
    store = make_store(tmp_path, texts)
    only = MetadataFilters(filters=[MetadataFilter(key="topic", value="d37")])
    for mode in ("sparse", "hybrid"):
        assert doc_ids(ask(store, "bees topic", mode=mode, filters=only)) == ["d37"]
    assert doc_ids(ask(store, "bees", mode="sparse", doc_ids=["d3", "d5"], k=10)) in (["d3", "d5"], ["d5", "d3"])


def test_hybrid_finds_what_either_side_finds_and_alpha_moves_between_them(tmp_path):
    store = make_store(tmp_path)
    query = "roman arches"
    dense = store.query(VectorStoreQuery(query_embedding=EMBED.get_query_embedding(query), similarity_top_k=5))
    keyword = ask(store, query, k=5)
    hybrid = ask(store, query, mode="hybrid", k=5)
    assert set(doc_ids(hybrid)) == set(doc_ids(dense)) | set(doc_ids(keyword))
    assert doc_ids(ask(store, query, mode="hybrid", k=5, alpha=0.0))[: len(keyword.ids)] == doc_ids(keyword)
    assert doc_ids(ask(store, query, mode="hybrid", k=5, alpha=1.0))[:2] == doc_ids(dense)[:2]
    assert all(0.0 <= s <= 1.0 for s in hybrid.similarities)
    rrf = store.query(
        VectorStoreQuery(query_str=query, query_embedding=EMBED.get_query_embedding(query),
                         similarity_top_k=5, mode=VectorStoreQueryMode.HYBRID),
        fusion="rrf",
    )
    assert set(doc_ids(rrf)) == set(doc_ids(hybrid))


def test_llamaindex_retriever_runs_hybrid_and_text_search(tmp_path):
    store = make_store(tmp_path)
    index = VectorStoreIndex.from_vector_store(store, embed_model=EMBED)
    hits = index.as_retriever(similarity_top_k=2, vector_store_query_mode="hybrid", alpha=0.3).retrieve("waggle dance")
    assert hits[0].node.metadata["doc_id"] == "bees"
    hits = index.as_retriever(similarity_top_k=2, vector_store_query_mode="text_search").retrieve("aqueducts")
    assert [h.node.metadata["doc_id"] for h in hits] == ["aqueduct"]


def test_unknown_mode_and_missing_text_are_clear_errors(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(ValueError, match="needs query_str"):
        store.query(VectorStoreQuery(similarity_top_k=2, mode=VectorStoreQueryMode.SPARSE))
    with pytest.raises(ValueError, match="not supported"):
        store.query(VectorStoreQuery(query_str="x", similarity_top_k=2, mode=VectorStoreQueryMode.MMR))
    with pytest.raises(ValueError, match="alpha"):
        ask(store, "bees", mode="hybrid", alpha=1.5)


@pytest.mark.parametrize("keyword_table", [True, False])
def test_an_index_of_the_first_layout_serves_every_mode_and_migrates_at_the_next_write(
    tmp_path, keyword_table, caplog
):
    nodes = [node(doc, text, topic=doc) for doc, text in TEXTS.items()]
    write_format1_index(tmp_path / "idx", nodes, keyword_table=keyword_table, docs={"bees": "h1"})
    with caplog.at_level("WARNING"):
        old = FaissVectorStore.open(tmp_path / "idx", expected_encoder=ENCODER)
    assert "before segments" in caplog.text and "htp-index migrate" in caplog.text
    assert old.count == len(TEXTS) and old.query_modes == ["dense", "sparse", "hybrid"]
    assert doc_ids(ask(old, "waggle dance")) == ["bees"]
    assert old.doc_hashes() == {"bees": "h1"}
    assert old.migrate() == 2
    migrated = FaissVectorStore.open(tmp_path / "idx", expected_encoder=ENCODER)
    assert migrated.manifest.format_version == 2 and len(migrated.manifest.segments) == 1
    assert doc_ids(ask(migrated, "waggle dance")) == ["bees"]
    assert doc_ids(ask(migrated, "stone arches", mode="hybrid")) [0] == "aqueduct"
    assert migrated.doc_hashes() == {"bees": "h1"} and migrated.next_id == len(TEXTS)
    assert FaissVectorStore.open(tmp_path / "idx", version=1).count == len(TEXTS)  # kept


def test_keyword_postings_are_files_of_the_segment_checksummed_in_the_manifest(tmp_path):
    store = make_store(tmp_path)
    store.persist()
    (segment,) = store.manifest.segments
    assert set(keywords.KEYWORD_FILES) <= set(segment.files)
    for name in keywords.KEYWORD_FILES:
        path = store.path / "segments" / segment.name / name
        assert persist_module.sha256_file(path) == segment.files[name].sha256


def test_convex_fusion_floor_keeps_a_flat_list_from_taking_full_weight():
    strong = [(1, 10.0), (2, 2.0), (3, 1.0)]
    flat = [(4, 0.51), (5, 0.50), (6, 0.49)]
    fused = dict(fusion.convex(strong, flat, alpha=0.5, floor=0.5))
    assert fused[1] == pytest.approx(0.5)
    # near-equal scores stay near-equal instead of being stretched over [0, 1]
    assert fused[4] - fused[6] < 0.05
    plain = dict(fusion.convex(strong, flat, alpha=0.5, floor=1.0))  # plain min-max
    assert plain[4] - plain[6] == pytest.approx(0.5)


def test_rrf_weights_ranks_by_alpha():
    a, b = [(1, 0.9), (2, 0.8)], [(2, 5.0), (3, 4.0)]
    assert [i for i, _ in fusion.rrf(a, b, alpha=0.5)][0] == 2
    assert [i for i, _ in fusion.rrf(a, b, alpha=1.0)][:2] == [1, 2]


@pytest.mark.parametrize("k", [-1, True, 2.5])
def test_a_k_that_is_not_a_count_is_refused_in_every_mode(tmp_path, k):
    """Hybrid sliced its fused list with ``k``: -1 returned every hit but the last."""
    store = make_store(tmp_path)
    text = next(iter(TEXTS.values()))
    vector = EMBED.get_query_embedding(text)
    for mode in ("dense", "sparse", "hybrid"):
        with pytest.raises(ValueError, match="k must be"):
            store.retrieve(mode, k, embedding=vector, text=text)
    assert store.retrieve("hybrid", 0, embedding=vector, text=text) == []
