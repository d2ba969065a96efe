"""LlamaIndex adapter: ``Settings.embed_model = HTPEmbedding()``.

Documents go through :meth:`HTPEncoder.encode_documents`, queries through
:meth:`HTPEncoder.encode_queries` (with the query instruction), so an index built with this
adapter is searched exactly as the encoder was measured. The async twins run the encoder in a
worker thread so an event loop (e.g. the HTTP service) stays responsive while it computes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import PrivateAttr

from htp_embed.config import EncoderConfig
from htp_embed.encoder import HTPEncoder


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
