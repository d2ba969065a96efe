"""The encoder on a CUDA GPU against its CPU twin: the same vectors from the same weights.

CI has no GPU, so this module skips there; on a machine with one, run
``pytest tests/test_encoder_cuda.py``. It needs no spaCy: where spaCy is missing (a bare GPU
image), sentences are split by a rule, the same on both devices, since what is checked here is
the GPU's arithmetic and bookkeeping (placeholders, rewiring, early exit, the prefix cache,
padding), not segmentation.
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from tiny_decoder import (
    build_gemma3,
    build_gemma3_transformers,
    build_model,
    build_tokenizer,
    widths_seen,
)

from htp_embed import HTPEncoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = [
    "the cat sat on the mat . the dog ran in the park ! a bird sang",
    "fish swam",
    "the sun rose over the hill . moon set behind house . rain fell on city . wind blew",
    "protein binds receptor",
]
DECODERS = {
    "llama": build_model,  # transformers' class with rewiring hooks
    "gemma3": build_gemma3_transformers,  # what the packaged model runs on a GPU
    "gemma3-native": build_gemma3,  # htp-index's own forward pass, given to the encoder directly
}


@pytest.fixture(autouse=True)
def sentences_without_spacy(monkeypatch):
    if importlib.util.find_spec("spacy") is None:
        import htp_embed.encoder

        def by_rule(texts, kind="senter"):
            return [[0, *(m.end() for m in re.finditer(r"[.!?]\s+(?=\S)", text))] for text in texts]

        monkeypatch.setattr(htp_embed.encoder, "sentence_starts", by_rule)


def encoder(decoder: str, device: str, dtype: str) -> HTPEncoder:
    """A tiny encoder; the same seed gives the same weights on every call."""
    tokenizer = build_tokenizer()
    return HTPEncoder(
        decoder=DECODERS[decoder](len(tokenizer)), tokenizer=tokenizer, model="tiny", segmenter="sentencizer",
        show_progress=False, rewire_start=1, rewire_stop=3, exit_layer=None, k=1, device=device, dtype=dtype,
    )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


@pytest.mark.parametrize("decoder", DECODERS)
def test_float32_on_the_gpu_gives_the_cpus_vectors(decoder):
    cpu, gpu = encoder(decoder, "cpu", "float32"), encoder(decoder, "cuda", "float32")
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    for encode in ("encode_documents", "encode_queries"):
        on_gpu = getattr(gpu, encode)(TEXTS)
        assert np.isfinite(on_gpu).all()
        np.testing.assert_allclose(cosines(getattr(cpu, encode)(TEXTS), on_gpu), 1.0, atol=1e-4)
    cache = gpu._prefix_cache
    assert cache is None or cache.verified  # queries reused the instruction's keys on the GPU too


@pytest.mark.parametrize("decoder", DECODERS)
def test_bfloat16_on_the_gpu_is_close_to_float32_on_the_cpu(decoder):
    # ("auto" keeps a passed decoder's own dtype; for a model the encoder loads it is bfloat16
    # on a GPU: tests/test_encoder_speed_paths.py, and benchmarks/random_weights_speed.py there.)
    gpu = encoder(decoder, "cuda", "bfloat16")
    assert gpu.dtype == torch.bfloat16 and next(gpu.model.parameters()).dtype == torch.bfloat16
    reference = encoder(decoder, "cpu", "float32")
    for encode in ("encode_documents", "encode_queries"):
        assert cosines(getattr(reference, encode)(TEXTS), getattr(gpu, encode)(TEXTS)).min() >= 0.99


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_padded_batch_on_the_gpu_gives_each_text_its_own_vector(decoder):
    gpu = encoder(decoder, "cuda", "float32")
    for encode in ("encode_documents", "encode_queries"):
        batch = getattr(gpu, encode)(TEXTS)
        alone = np.stack([getattr(gpu, encode)([text])[0] for text in TEXTS])
        np.testing.assert_allclose(cosines(batch, alone), 1.0, atol=1e-4)


def test_queries_on_the_gpu_keep_their_exact_width():
    """Padding queries to a few widths is for the CPU's kernel caches (htp_embed.query_widths)."""
    gpu = encoder("llama", "cuda", "float32")
    gpu.encode_queries(["warm the prefix cache up"])
    widths = widths_seen(gpu)
    for text in TEXTS:
        gpu.encode_queries([text])
    cache = gpu._prefix_cache
    exact = [len(layout) - (cache.usable([layout]) if cache is not None else 0)
             for layout in gpu.layouts(TEXTS, is_query=True)]
    assert widths == exact
    assert gpu.warm_query_widths() == 0
