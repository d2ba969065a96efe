"""htp_embed: text embeddings from decoder-only LLMs with Hierarchical Token Prepending.

``HTPEncoder`` is the encoder; ``htp_embed.llama_index.HTPEmbedding`` adapts it to LlamaIndex.
"""

from htp_embed.config import DEFAULT_MODEL, METHODS, EncoderConfig, KPolicy
from htp_embed.encoder import EmptyTextError, EncoderStats, HTPEncoder, config_from_identity
from htp_embed.models import PACKAGED_MODELS, ModelNotAvailableError, load_model

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "PACKAGED_MODELS",
    "EmptyTextError",
    "EncoderConfig",
    "EncoderStats",
    "HTPEncoder",
    "KPolicy",
    "ModelNotAvailableError",
    "config_from_identity",
    "load_model",
]
