"""Reusing the shared query prefix's keys and values gives the plain forward pass's vectors."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_decoder import tiny_encoder

from htp_embed.layout import Layout
from htp_embed.prefix_cache import MIN_PREFIX, shared_prefix_length

QUERIES = [
    "the cat sat on the mat . the dog ran",
    "fish swam",
    "protein binds receptor . the sun rose over the hill . rain fell",
    "a bird sang",
]
METHODS = ["htp", "vanilla", "last", "tp", "prompteol", "echo"]
# transformers' class through hooks and a DynamicCache, and htp-index's own Gemma 3 pass.
DECODERS = ["llama", "gemma3-native"]


def plain_queries(encoder, texts: list[str]) -> np.ndarray:
    cache, encoder._prefix_cache = encoder._prefix_cache, None
    try:
        return encoder.encode_queries(texts)
    finally:
        encoder._prefix_cache = cache


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("padding_side", "bos", "exit_layer"), [("right", False, None), ("left", True, 3)])
@pytest.mark.parametrize("decoder", DECODERS)
def test_queries_with_the_prefix_reused_equal_the_plain_pass(method, padding_side, bos, exit_layer, decoder):
    encoder = tiny_encoder(padding_side, bos, decoder, method=method, exit_layer=exit_layer)
    layouts = encoder.layouts(QUERIES, is_query=True)
    assert encoder._prefix_cache.usable(layouts) >= MIN_PREFIX  # the instruction is shared
    expected = plain_queries(encoder, QUERIES)
    first = encoder.encode_queries(QUERIES)  # checks the reuse against the plain pass, once
    assert encoder._prefix_cache is not None and encoder._prefix_cache.verified
    again = encoder.encode_queries(QUERIES)  # now through the cache only
    one_by_one = np.concatenate([encoder.encode_queries([q]) for q in QUERIES])
    for got in (first, again, one_by_one):
        np.testing.assert_allclose(got, expected, atol=2e-6)


def test_documents_do_not_use_the_cache():
    encoder = tiny_encoder("right", True)
    assert encoder._prefix_cache.usable(encoder.layouts(QUERIES)) == 0  # only <bos> is shared


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_cache_that_disagrees_is_dropped_and_the_plain_vectors_returned(monkeypatch, decoder):
    """A model on which reuse is wrong (here: the cache is computed for other tokens, as a
    model whose attention looks ahead would make it) keeps the plain pass, with a log line."""
    encoder = tiny_encoder("right", False, decoder)
    expected = plain_queries(encoder, QUERIES)
    kind = type(encoder._prefix_cache)
    compute = kind._compute
    monkeypatch.setattr(kind, "_compute", lambda self, ids, device: compute(self, ids[::-1], device))
    got = encoder.encode_queries(QUERIES)
    assert encoder._prefix_cache is None
    np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_allclose(encoder.encode_queries(QUERIES), expected, atol=2e-6)


def test_bidirectional_models_never_reuse_a_prefix():
    from tiny_decoder import build_model, build_tokenizer

    from htp_embed import HTPEncoder

    tokenizer = build_tokenizer("right", False)
    model = build_model(len(tokenizer))
    model.config.use_bidirectional_attention = True
    encoder = HTPEncoder(decoder=model, tokenizer=tokenizer, model="tiny", segmenter="sentencizer",
                         show_progress=False, exit_layer=None)
    assert encoder._prefix_cache is None


def test_the_shared_prefix_ends_before_placeholders_and_pooled_positions():
    def layout(ids, pool, copies=()):
        return Layout(ids=ids, pool=pool, readout=pool[-1], copy_src=[s for s, _ in copies],
                      copy_dst=[d for _, d in copies])

    a = layout([1, 5, 6, 7, 8, 9, 10], [5, 6])
    assert shared_prefix_length([a, layout([1, 5, 6, 7, 8, 11, 12, 13], [5, 7])]) == 5
    assert shared_prefix_length([a, layout([1, 5, 6, 7, 9, 9, 10], [5, 6])]) == 4  # differs at 4
    assert shared_prefix_length([layout([1, 5, -2, -1, 8, 9], [4, 5])]) == 2  # a placeholder at 2
    assert shared_prefix_length([layout([1, 5, 6, 7, 8, 9], [3, 4, 5])]) == 3  # pooled from 3 on
    assert shared_prefix_length([layout([1, 5, 6, 7, 8, 9], [5], copies=[(5, 2)])]) == 2  # rewired at 2


@pytest.mark.parametrize("decoder", DECODERS)
def test_the_first_query_gets_the_vectors_every_later_one_gets(decoder):
    """In bfloat16 the reused-prefix pass and the plain pass differ in the last bits; the
    process's first query (the one that checks the reuse) must answer with the vectors later
    queries get, or a one-shot `htp-index query` and the service rank a near-tie differently."""
    encoder = tiny_encoder("right", False, decoder, dtype="bfloat16")
    first = encoder.encode_queries(QUERIES)
    assert encoder._prefix_cache is not None and encoder._prefix_cache.verified
    assert not np.array_equal(first, plain_queries(encoder, QUERIES))  # bfloat16 tells them apart
    np.testing.assert_array_equal(first, encoder.encode_queries(QUERIES))
