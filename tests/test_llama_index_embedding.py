"""The LlamaIndex embedding adapter honours BaseEmbedding's whole contract."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from tiny_decoder import tiny_encoder

from htp_embed.llama_index import HTPEmbedding

TEXTS = ["the cat sat on the mat .", "fish swam in the sea .", "the sun rose over the hill ."]


@pytest.fixture(scope="module")
def embedding() -> HTPEmbedding:
    return HTPEmbedding(tiny_encoder(k=1), embed_batch_size=2)


def test_documents_and_queries_match_the_encoder(embedding):
    encoder = embedding.encoder
    np.testing.assert_allclose(
        embedding.get_text_embedding_batch(TEXTS), encoder.encode_documents(TEXTS), atol=1e-6
    )
    np.testing.assert_allclose(embedding.get_text_embedding(TEXTS[0]), encoder.encode_documents(TEXTS[:1])[0], atol=1e-6)
    np.testing.assert_allclose(embedding.get_query_embedding("cat"), encoder.encode_queries(["cat"])[0], atol=1e-6)
    assert not np.allclose(embedding.get_query_embedding("cat"), embedding.get_text_embedding("cat"))


def test_async_twins_agree(embedding):
    async def run():
        return (
            await embedding.aget_query_embedding("cat"),
            await embedding.aget_text_embedding(TEXTS[1]),
            await embedding.aget_text_embedding_batch(TEXTS),
        )

    query, text, batch = asyncio.run(run())
    np.testing.assert_allclose(query, embedding.get_query_embedding("cat"), atol=1e-6)
    np.testing.assert_allclose(text, embedding.get_text_embedding(TEXTS[1]), atol=1e-6)
    np.testing.assert_allclose(batch, embedding.get_text_embedding_batch(TEXTS), atol=1e-6)


def test_model_name_identifies_model_and_settings(embedding):
    assert embedding.model_name == "tiny/htp[k=1,rewire=1-3,exit=full,sink]"  # the tiny tokenizer has no BOS
    assert embedding.embed_batch_size == 2
    assert embedding.identity()["method"] == "htp"


def test_works_as_the_global_embed_model_with_vector_store_index(embedding, monkeypatch):
    monkeypatch.setattr(Settings, "_embed_model", embedding)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS])
    nodes = index.as_retriever(similarity_top_k=3).retrieve("the cat sat on the mat")
    scores = embedding.encoder.encode_documents(TEXTS) @ embedding.encoder.encode_queries(["the cat sat on the mat"])[0]
    assert [n.node.get_content() for n in nodes] == [TEXTS[i] for i in np.argsort(-scores)]
    np.testing.assert_allclose([n.score for n in nodes], np.sort(scores)[::-1], atol=1e-5)


def test_settings_and_encoder_are_exclusive(embedding):
    with pytest.raises(ValueError):
        HTPEmbedding(embedding.encoder, method="vanilla")
