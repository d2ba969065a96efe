"""htp_embed: text embeddings from decoder-only LLMs with Hierarchical Token Prepending.

``HTPEncoder`` is the encoder; ``htp_embed.llama_index.HTPEmbedding`` adapts it to LlamaIndex.
An index records ``HTPEncoder.identity()``; ``config_from_identity`` reopens that encoder and
``indexes.same_encoder`` compares two such records.
"""

from typing import TYPE_CHECKING, Any

from htp_embed.config import DEFAULT_MODEL, METHODS, EncoderConfig, KPolicy
from htp_embed.threads import default_openmp_waiting

# OpenMP threads spin for a bounded while between parallel regions: neither libgomp's long
# default nor passive sleeping (htp_embed.threads says why, with figures). Set before torch loads OpenMP; an
# explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
default_openmp_waiting()

# Everything else loads on first use (PEP 562): the encoder pulls in torch and transformers
# (seconds on a small machine), and importing the package for its configuration, as settings
# and the command line do, should not pay for them.
_LAZY = {
    "EmptyTextError": "htp_embed.encoder",
    "NonFiniteVectorsError": "htp_embed.encoder",
    "Encoded": "htp_embed.encoder",
    "EncoderStats": "htp_embed.encoder",
    "HTPEncoder": "htp_embed.encoder",
    "EncoderIdentity": "htp_embed.identity",
    "config_from_identity": "htp_embed.identity",
    "PACKAGED_MODELS": "htp_embed.packaged_models",
    "ModelNotAvailableError": "htp_embed.packaged_models",
    "load_model": "htp_embed.models",
}

if TYPE_CHECKING:
    from htp_embed.encoder import (
        EmptyTextError,
        Encoded,
        EncoderStats,
        HTPEncoder,
        NonFiniteVectorsError,
    )
    from htp_embed.identity import EncoderIdentity, config_from_identity
    from htp_embed.models import load_model
    from htp_embed.packaged_models import PACKAGED_MODELS, ModelNotAvailableError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'htp_embed' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "PACKAGED_MODELS",
    "EmptyTextError",
    "Encoded",
    "EncoderConfig",
    "EncoderIdentity",
    "EncoderStats",
    "HTPEncoder",
    "KPolicy",
    "ModelNotAvailableError",
    "NonFiniteVectorsError",
    "config_from_identity",
    "load_model",
]
