"""LlamaIndex adapters: ``Settings.embed_model = HTPEmbedding()``, and
``QueryLikelihoodRerank(encoder)`` as a node postprocessor.

Documents go through :meth:`HTPEncoder.encode_documents`, queries through
:meth:`HTPEncoder.encode_queries` (with the query instruction), so an index built with this
adapter is searched exactly as the encoder was measured. The async twins run the encoder in a
worker thread so an event loop (e.g. the HTTP service) stays responsive while it computes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from pydantic import Field, PrivateAttr

from htp_embed.config import EncoderConfig
from htp_embed.encoder import HTPEncoder
from htp_embed.rerank import (
    DEFAULT_PASSAGE_TOKENS,
    DEFAULT_WEIGHT,
    QueryLikelihoodScorer,
    blend_scores,
)


class HTPEmbedding(BaseEmbedding):
    """A LlamaIndex ``BaseEmbedding`` backed by :class:`~htp_embed.encoder.HTPEncoder`.

    ``HTPEmbedding()`` loads the default offline model with the default HTP settings;
    ``HTPEmbedding(encoder=existing)`` wraps an encoder already loaded; keyword arguments are
    :class:`~htp_embed.config.EncoderConfig` fields (``method="vanilla"``, ``k=8``…).
    ``model_name`` names the model and the HTP settings, e.g.
    ``gemma3-270m/htp[k=adaptive:8,rewire=1-7,exit=13]``.
    """

    _encoder: HTPEncoder = PrivateAttr()

    def __init__(
        self,
        encoder: HTPEncoder | None = None,
        *,
        config: EncoderConfig | None = None,
        embed_batch_size: int | None = None,
        **settings: Any,
    ):
        if encoder is None:
            encoder = HTPEncoder(config, **settings)
        elif settings or config is not None:
            raise ValueError("pass either an encoder or settings, not both")
        super().__init__(
            model_name=encoder.describe(),
            embed_batch_size=embed_batch_size or max(encoder.config.batch_size * 4, 10),
        )
        self._encoder = encoder

    @classmethod
    def class_name(cls) -> str:
        return "HTPEmbedding"

    @property
    def encoder(self) -> HTPEncoder:
        return self._encoder

    @property
    def dim(self) -> int:
        return self._encoder.dim

    def identity(self) -> dict[str, Any]:
        """The encoder identity an index records (see :meth:`HTPEncoder.identity`)."""
        return self._encoder.identity()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encoder.encode_queries([query])[0].tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encoder.encode_documents([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encoder.encode_documents(texts).tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


class QueryLikelihoodRerank(BaseNodePostprocessor):
    """A LlamaIndex node postprocessor that reorders retrieved nodes by the decoder's likelihood
    of the query given each node (see :mod:`htp_embed.rerank`), blended with their retrieval
    scores; it keeps the best ``top_n``.

        retriever = index.as_retriever(similarity_top_k=10)
        engine = RetrieverQueryEngine(retriever, node_postprocessors=[QueryLikelihoodRerank(encoder, top_n=5)])

    It uses the encoder's own weights (nothing more is loaded). Every node passed in costs a
    forward pass of up to ``max_passage_tokens`` tokens through all of the decoder's layers (of a
    long node, its heading and the sentences that best match the query).
    """

    top_n: int = Field(5, ge=1, description="nodes kept after reranking")
    weight: float = Field(DEFAULT_WEIGHT, ge=0.0, le=1.0,
                          description="share of the query likelihood in the blended score (1: likelihood only)")
    _scorer: QueryLikelihoodScorer = PrivateAttr()

    def __init__(self, encoder: HTPEncoder, *, top_n: int = 5, weight: float = DEFAULT_WEIGHT,
                 max_passage_tokens: int = DEFAULT_PASSAGE_TOKENS):
        super().__init__(top_n=top_n, weight=weight)
        # Long nodes are read as their heading and best-matching sentences, split into
        # sentences by the encoder's own segmenter.
        self._scorer = QueryLikelihoodScorer(encoder.model, encoder.tokenizer, max_passage_tokens=max_passage_tokens,
                                             segmenter=encoder.config.segmenter)

    @classmethod
    def class_name(cls) -> str:
        return "QueryLikelihoodRerank"

    def _postprocess_nodes(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("QueryLikelihoodRerank needs the query: pass query_bundle or query_str")
        return self.rerank(query_bundle.query_str, nodes, self.top_n)

    def rerank(self, query: str, nodes: list[NodeWithScore], top_n: int) -> list[NodeWithScore]:
        """The best ``top_n`` of ``nodes`` for ``query``, scored by the blend (thread-safe: the
        query path calls this with each request's own ``top_n``)."""
        if not nodes:
            return []
        texts = [hit.node.get_content(metadata_mode=MetadataMode.NONE) for hit in nodes]
        scored = self._scorer.score(query, texts)
        blended = blend_scores([hit.score for hit in nodes], [s.log_likelihood for s in scored], self.weight)
        reranked = [NodeWithScore(node=hit.node, score=score) for hit, score in zip(nodes, blended, strict=True)]
        reranked.sort(key=lambda hit: -(hit.score or 0.0))
        return reranked[:top_n]
