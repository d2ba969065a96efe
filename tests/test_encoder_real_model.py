"""End to end with the real offline models (converted once into the user cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from htp_embed import HTPEncoder

pytestmark = pytest.mark.slow

TEXTS = [
    "Mitochondria produce most of the cell's ATP through oxidative phosphorylation. "
    "The electron transport chain pumps protons across the inner membrane.",
    "Cellular respiration in the mitochondrion generates adenosine triphosphate, the energy "
    "currency of the cell, using a proton gradient.",
    "The football match ended in a draw after extra time. Fans left the stadium in the rain.",
]


@pytest.fixture(scope="module")
def gemma() -> HTPEncoder:
    return HTPEncoder(show_progress=False)


@pytest.mark.parametrize("method", ["htp", "vanilla"])
def test_default_model_puts_the_related_pair_closest(gemma, method):
    encoder = gemma if method == "htp" else gemma.with_method(method)
    vectors = encoder.encode_documents(TEXTS)
    assert vectors.shape == (3, 640) and vectors.dtype == np.float32
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[1, 2]


def test_default_model_query_finds_its_document(gemma):
    query = gemma.encode_queries(["How do cells make ATP?"])
    scores = (gemma.encode_documents(TEXTS) @ query.T).ravel()
    assert int(scores.argmax()) in (0, 1)  # a mitochondria text, not the football match


def test_default_model_layers_resolve_to_the_documented_defaults(gemma):
    assert gemma.exit_depth == 13  # of 18: the best exit measured (layer_defaults.py)
    assert gemma.rewire_layers == range(1, 7)


def test_default_model_runs_our_forward_pass_with_transformers_vectors(gemma):
    """On a CPU the packaged Gemma 3 runs htp_embed.gemma3_native; transformers' class on the
    same weights gives the same vectors and the same identity (an index accepts either)."""
    hooked = HTPEncoder(show_progress=False, implementation="transformers")
    assert gemma.native and not hooked.native
    assert gemma.dtype == hooked.dtype
    queries = ["How do cells make ATP?", "who won the football match in the rain"]
    for native, reference in ((gemma.encode_documents(TEXTS), hooked.encode_documents(TEXTS)),
                              (gemma.encode_queries(queries), hooked.encode_queries(queries))):
        assert float(np.min(np.sum(native * reference, axis=1))) > 0.9999
    assert gemma.identity() == hooked.identity()


def test_default_model_gives_the_same_vectors_with_either_attention_kernel():
    """The encoder setting reaches the own forward pass, and abstract-length texts (long enough
    for the matrix products: htp_embed.attention.MIN_SCORES) embed alike through both kernels."""
    long_texts = [" ".join([text] * 6) for text in TEXTS]
    encoders = {kernel: HTPEncoder(show_progress=False, attention_kernel=kernel) for kernel in ("fused", "matmul")}
    for kernel, encoder in encoders.items():
        assert encoder.model.attention_kernel == kernel
        assert encoder.attention is not None and (encoder.attention.kernel, encoder.attention.source) == (kernel, "explicit")
    assert min(encoder.count_tokens(text) for text in long_texts) >= 100
    fused, products = (encoder.encode_documents(long_texts) for encoder in encoders.values())
    assert float(np.min(np.sum(fused * products, axis=1))) > 0.9999
    assert encoders["fused"].identity() == encoders["matmul"].identity()  # an index accepts either


def test_smollm2_loads_and_embeds():
    encoder = HTPEncoder(model="smollm2-135m", show_progress=False)
    vectors = encoder.encode_documents(TEXTS)
    assert vectors.shape == (3, 576)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_packaged_tokenizer_matches_auto_tokenizer(name):
    """The fast loader of a packaged model's tokenizer (read from tokenizer.json as it is)
    tokenizes exactly as transformers' AutoTokenizer does, special tokens and padding included."""
    from transformers import AutoTokenizer

    from htp_embed.models import _load_packaged_tokenizer, default_cache_dir, load_model

    _, fast = load_model(name, dtype=torch.float32)  # also writes the converted copy if missing
    path = default_cache_dir() / "models" / f"{name}-float32"
    auto = AutoTokenizer.from_pretrained(str(path))
    direct = _load_packaged_tokenizer(path)
    assert type(fast) is type(direct)
    texts = [*TEXTS, "x", "  spaces \n\n tabs\t", "émoji 🤖 中文 ∂x/∂t", "<bos> and <eos> <pad> as text",
             "<start_of_turn>user", "\u00a0nbsp\u200bzero-width"]
    for options in (
        {"add_special_tokens": False, "split_special_tokens": True, "return_offsets_mapping": True},
        {"add_special_tokens": True},
        {"add_special_tokens": False},
    ):
        expected, got = auto(texts, **options), direct(texts, **options)
        assert got["input_ids"] == expected["input_ids"], options
        if "offset_mapping" in expected:
            assert got["offset_mapping"] == expected["offset_mapping"]
    for attribute in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "bos_token_id",
                      "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id", "padding_side"):
        assert getattr(direct, attribute) == getattr(auto, attribute), attribute
    assert direct.get_vocab() == auto.get_vocab()
    assert len(direct) == len(auto)
    ids = expected["input_ids"][0]
    assert direct.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)
    assert direct.decode(ids) == auto.decode(ids)



def test_default_model_reuses_the_query_prefix_with_the_plain_vectors():
    encoder = HTPEncoder(show_progress=False, dtype="float32")
    queries = ["How do cells make ATP?", "who won the football match in the rain", "mitochondria"]
    cache, encoder._prefix_cache = encoder._prefix_cache, None
    plain = encoder.encode_queries(queries)
    encoder._prefix_cache = cache
    encoder.encode_queries(queries)  # the first batch checks the reuse
    assert encoder._prefix_cache is not None and encoder._prefix_cache.verified
    reused = np.concatenate([encoder.encode_queries([q]) for q in queries])
    assert float(np.min(np.sum(plain * reused, axis=1))) > 0.99999


def test_default_model_finds_the_query_likelier_after_the_passage_that_answers_it(gemma):
    from htp_embed.rerank import QueryLikelihoodScorer

    scorer = QueryLikelihoodScorer(gemma.model, gemma.tokenizer)
    scores = [s.log_likelihood for s in scorer.score("How do cells make ATP?", TEXTS)]
    assert max(scores[0], scores[1]) > scores[2] + 0.5  # nats per query token
    football = [s.log_likelihood for s in scorer.score("Who won the football match?", TEXTS)]
    assert football[2] > max(football[0], football[1])
