"""The in-process query component: a persisted index as a LlamaIndex retriever.

    from pipelines.query import open_index
    index = open_index("my-index")
    retriever = index.as_retriever(similarity_top_k=5)
    for hit in retriever.retrieve("how are placeholders used?"):
        print(hit.score, hit.node.metadata["doc_id"], hit.node.get_content()[:80])

Queries are embedded with the same encoder (and query instruction) that built the index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_index.core import VectorStoreIndex
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore
from llama_index.core.vector_stores.types import MetadataFilters, VectorStoreQuery

from htp_embed import config_from_identity
from htp_embed.llama_index import HTPEmbedding
from indexes import FaissVectorStore, IndexNotFoundError
from pipelines.settings import Settings, load_settings


@dataclass
class OpenIndex:
    """A loaded index version with the encoder that built it."""

    path: Path
    store: FaissVectorStore
    embedding: HTPEmbedding

    @property
    def version(self) -> int | None:
        return self.store.version

    def as_index(self) -> VectorStoreIndex:
        """A LlamaIndex VectorStoreIndex over this store (for query engines, chat engines…)."""
        return VectorStoreIndex.from_vector_store(self.store, embed_model=self.embedding)

    def as_retriever(self, similarity_top_k: int = 5, filters: MetadataFilters | None = None, **kwargs: Any) -> BaseRetriever:
        """A LlamaIndex retriever returning ``NodeWithScore``s with text, metadata and scores."""
        return self.as_index().as_retriever(similarity_top_k=similarity_top_k, filters=filters, **kwargs)

    def search(self, query: str, top_k: int = 5, filters: MetadataFilters | None = None) -> list[dict[str, Any]]:
        """Results as plain dicts: ``node_id, doc_id, score, text, metadata``."""
        hits = self.as_retriever(similarity_top_k=top_k, filters=filters).retrieve(query)
        return [result_dict(hit) for hit in hits]

    def search_many(self, requests: list[tuple[str, int, MetadataFilters | None]]) -> list[list[dict[str, Any]]]:
        """:meth:`search` for several ``(query, top_k, filters)`` at once: the queries go through
        the encoder as one batch, which is what makes a busy service fast (one forward pass
        instead of one per request). Results equal :meth:`search`'s, request by request."""
        if not requests:
            return []
        vectors = self.embedding.encoder.encode_queries([query for query, _, _ in requests])
        out = []
        for vector, (_, top_k, filters) in zip(vectors, requests, strict=True):
            result = self.store.query(VectorStoreQuery(query_embedding=vector.tolist(), similarity_top_k=top_k,
                                                       filters=filters))
            out.append([result_dict(NodeWithScore(node=node, score=score))
                        for node, score in zip(result.nodes or [], result.similarities or [], strict=True)])
        return out


def result_dict(hit: NodeWithScore) -> dict[str, Any]:
    node = hit.node
    return {
        "node_id": node.node_id,
        "doc_id": node.ref_doc_id or node.metadata.get("doc_id"),
        "score": float(hit.score) if hit.score is not None else None,
        "text": node.get_content(),
        "metadata": dict(node.metadata),
    }


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Encoder identities compared as JSON (lists and tuples alike)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def open_index(
    index_dir: str | Path, settings: Settings | None = None, *, embedding: HTPEmbedding | None = None
) -> OpenIndex:
    """Open the live version of an index with the encoder recorded in its manifest.

    Readers always follow the index: after a rebuild with another model or method, queries are
    embedded the new way. ``embedding`` is reused when it is that encoder (no reload); only
    runtime settings (device, batch size) are taken from ``settings``.
    """
    path = Path(index_dir)
    if not FaissVectorStore.exists(path):
        raise IndexNotFoundError(f"no index at {path}; create one with: htp-index ingest SOURCE --index {path}")
    settings = settings or load_settings()
    recorded = FaissVectorStore.read_manifest(path).encoder
    if embedding is None or not same_encoder(embedding.identity(), recorded):
        embedding = HTPEmbedding(config=config_from_identity(recorded, **settings.runtime_encoder_settings()))
    store = FaissVectorStore.open(path, expected_encoder=embedding.identity(), **settings.faiss_placement())
    return OpenIndex(path, store, embedding)
