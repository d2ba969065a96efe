"""The index's encoder as a LlamaIndex embedding model, checking query texts first.

Its own module so that importing `pipelines.query` (every query) does not import LlamaIndex:
only ``OpenIndex.embedding`` (``as_index``/``as_retriever``) needs this class.
"""

from __future__ import annotations

from htp_embed.llama_index import HTPEmbedding
from pipelines.query import check_query_text


class QueryEmbedding(HTPEmbedding):
    """What retrievers call directly, without :meth:`pipelines.query.OpenIndex.search_many`:
    a query text that is not valid Unicode gets the same clear error there."""

    def _get_query_embedding(self, query: str) -> list[float]:
        return super()._get_query_embedding(check_query_text(query))
