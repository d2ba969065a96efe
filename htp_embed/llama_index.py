"""LlamaIndex adapters: ``Settings.embed_model = HTPEmbedding()``, and
``QueryLikelihoodRerank(encoder)`` as a node postprocessor.

Documents go through :meth:`HTPEncoder.encode_documents`, queries through
:meth:`HTPEncoder.encode_queries` (with the query instruction), so an index built with this
adapter is searched exactly as the encoder was measured. The async twins run the encoder in a
worker thread so an event loop (e.g. the HTTP service) stays responsive while it computes.
"""

from __future__ import annotations

import asyncio
import unicodedata
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from pydantic import Field, PrivateAttr

from htp_embed.config import EncoderConfig
from htp_embed.encoder import HTPEncoder
from htp_embed.models import _dtype_name
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
    :class:`~htp_embed.config.EncoderConfig` fields (``method="vanilla"``, ``k=8``…) or
    ``BaseEmbedding``'s own (``num_workers``, ``callback_manager``…).
    ``model_name`` names the model and the HTP settings, e.g.
    ``gemma3-270m/htp[k=adaptive:8,rewire=1-7,exit=13]``.

    ``to_dict()`` carries ``encoder_identity`` (everything that decides the vectors, the
    weights' fingerprint and dtype included): LlamaIndex's ``IngestionCache`` keys on it, so two
    differently configured embeddings never share cached vectors. It also carries
    ``encoder_config``, from which ``from_dict``, pickling (``IngestionPipeline`` workers) and
    ``deepcopy`` rebuild the same encoder.
    """

    encoder_config: dict[str, Any] = Field(
        default_factory=dict, description="the EncoderConfig (dtype resolved) that rebuilds the encoder"
    )
    encoder_identity: dict[str, Any] = Field(
        default_factory=dict, description="what decides the vectors: the index identity and the dtype"
    )
    _encoder: HTPEncoder = PrivateAttr()

    def __init__(
        self,
        encoder: HTPEncoder | None = None,
        *,
        config: EncoderConfig | None = None,
        embed_batch_size: int | None = None,
        encoder_config: dict[str, Any] | None = None,
        encoder_identity: dict[str, Any] | None = None,
        model_name: str | None = None,
        **settings: Any,
    ):
        # BaseEmbedding's own fields go to the base class; the rest are the encoder's settings.
        # model_name is derived from the encoder (from_dict passes it back, and it is dropped).
        del model_name
        base = {key: settings.pop(key) for key in list(settings) if key in _BASE_FIELDS}
        if encoder_config is not None:
            if encoder is not None or config is not None or settings:
                raise ValueError("HTPEmbedding: pass encoder_config alone, not with an encoder")
            encoder = _rebuild_encoder(encoder_config)
        elif encoder is None:
            encoder = HTPEncoder(config, **settings)
        elif settings or config is not None:
            raise ValueError("pass either an encoder or settings, not both")
        identity = {**encoder.identity(), "dtype": _dtype_name(encoder.dtype)}
        if encoder_identity is not None and encoder_identity != identity:
            raise ValueError(
                f"HTPEmbedding: the encoder its settings load now ({identity}) is not the one "
                f"recorded ({encoder_identity}); were the model's weights changed?"
            )
        default_batch = max(encoder.config.batch_size * 4, 10)
        super().__init__(
            model_name=encoder.describe(),
            embed_batch_size=default_batch if embed_batch_size is None else embed_batch_size,
            encoder_config=encoder.config.model_dump(mode="json") | {"dtype": identity["dtype"]},
            encoder_identity=identity,
            **base,
        )
        self._encoder = encoder

    def _rebuild_arguments(self) -> dict[str, Any]:
        return {
            "encoder_config": self.encoder_config,
            "encoder_identity": self.encoder_identity,
            "embed_batch_size": self.embed_batch_size,
            "num_workers": self.num_workers,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the settings, not the loaded weights: the copy loads the same encoder again
        (BaseComponent's default dropped the encoder, and the copy failed on first use)."""
        return (_rebuild_embedding, (self._rebuild_arguments(),))

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> HTPEmbedding:
        """A copy sharing the loaded encoder: encoding does not change it, and copying the
        weights would only cost memory."""
        return type(self)(
            self._encoder, embed_batch_size=self.embed_batch_size, num_workers=self.num_workers,
            callback_manager=self.callback_manager,
        )

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
        return self._encoder.encode_queries(_visible([query]))[0].tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encoder.encode_documents(_visible([text]))[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encoder.encode_documents(_visible(texts)).tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


# As indexes.text.INVISIBLE_CATEGORIES (htp_embed sits below indexes and may not import it):
# controls, format characters (zero-width spaces, BOMs) and space separators.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def _visible(texts: list[str]) -> list[str]:
    """``texts`` unchanged, or a ValueError for one holding only invisible characters
    ("\u200b", "\x00\x01"): the index refuses such documents and queries, and embedded here
    they were vectors of nothing."""
    for i, text in enumerate(texts):
        if isinstance(text, str) and text.strip() and not any(
            unicodedata.category(ch) not in _INVISIBLE_CATEGORIES for ch in text
        ):
            raise ValueError(
                f"text {i} holds only invisible characters (controls, zero-width or format "
                "characters): there is nothing to embed"
            )
    return texts


_BASE_FIELDS = frozenset(BaseEmbedding.model_fields) - {"model_name", "embed_batch_size"}


def _rebuild_encoder(encoder_config: dict[str, Any]) -> HTPEncoder:
    """The encoder an HTPEmbedding's serialised settings name, or an error saying why not."""
    try:
        return HTPEncoder(EncoderConfig(**encoder_config))
    except Exception as error:
        raise ValueError(
            f"HTPEmbedding cannot be rebuilt from its settings (model {encoder_config.get('model')!r}): "
            f"{error}. An embedding over a decoder passed in memory cannot be copied to another "
            "process or restored from to_dict(); load it from a packaged model or a model folder"
        ) from error


def _rebuild_embedding(arguments: dict[str, Any]) -> HTPEmbedding:
    """Unpickle an HTPEmbedding: rebuild it from its settings."""
    return HTPEmbedding(**arguments)


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

    def cuts_query(self, query: str) -> bool:
        """Whether only the query's first `htp_embed.rerank.MAX_QUERY_TOKENS` tokens are scored."""
        return self._scorer.cuts_query(query)

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
