"""Queries padded to a few widths on the CPU: the same vectors, few distinct shapes, warmed once."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_decoder import tiny_encoder, widths_seen

from htp_embed import query_widths
from htp_embed.query_widths import MAX_TEXTS, bucket_widths, bucketed_width, padded_width

QUERIES = ["fish swam", "the cat sat on the mat", "protein binds receptor . the dog ran in the park ! a bird sang",
           " ".join(["word"] * 40)]


def test_a_bucket_holds_the_width_with_little_padding_and_there_are_few_buckets():
    for width in range(1, 2049):
        padded = bucketed_width(width)
        assert padded >= width
        assert padded - width < max(query_widths.SHORT_STEP, width / query_widths.STEPS_PER_OCTAVE)
        assert bucketed_width(padded) == padded  # a bucket's own width is not padded again
    assert len({bucketed_width(w) for w in range(1, 513)}) == len(bucket_widths(512)) <= 40
    assert bucket_widths(64) == list(range(4, 65, 4))


def test_only_small_query_batches_on_the_cpu_are_padded():
    assert padded_width(13, 1, is_query=True, on_cpu=True) == 16
    assert padded_width(13, MAX_TEXTS + 1, is_query=True, on_cpu=True) == 13
    assert padded_width(13, 1, is_query=False, on_cpu=True) == 13
    assert padded_width(13, 1, is_query=True, on_cpu=False) == 13


@pytest.mark.parametrize("decoder", ["llama", "gemma3-native"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_queries_get_the_vectors_of_their_exact_width(monkeypatch, decoder, padding_side):
    encoder = tiny_encoder(padding_side=padding_side, decoder=decoder, k=1)
    seen = widths_seen(encoder)
    padded = np.stack([encoder.encode_queries([text])[0] for text in QUERIES])
    assert all(width % query_widths.SHORT_STEP == 0 for width in seen)
    monkeypatch.setattr(query_widths, "ENABLED", False)
    seen.clear()
    exact = np.stack([encoder.encode_queries([text])[0] for text in QUERIES])
    assert any(width % query_widths.SHORT_STEP for width in seen)  # the padding above was real
    np.testing.assert_allclose(padded, exact, atol=1e-5)


def test_documents_keep_their_exact_width():
    encoder = tiny_encoder(k=1)
    seen = widths_seen(encoder)
    encoder.encode_documents(["fish swam ."])
    assert seen == [len(encoder.layouts(["fish swam ."])[0])]


def test_warming_up_runs_each_short_width_once_and_queries_then_use_no_other():
    encoder = tiny_encoder(decoder="gemma3-native", k=1)
    seen = widths_seen(encoder)
    warmed = encoder.warm_query_widths(up_to=32)
    assert warmed == len(set(seen)) and set(seen) <= set(bucket_widths(32))
    # every width from the shortest query's up is warmed (shorter ones cannot occur)
    assert sorted(set(seen)) == [w for w in bucket_widths(32) if w >= min(seen)]
    assert encoder.stats.texts == 0  # warming is not work done for anyone
    warm = set(seen)
    seen.clear()
    for words in range(1, 20):
        encoder.encode_queries([" ".join(["bird"] * words) + " sang"])
    assert set(seen) <= warm


def test_warming_up_does_nothing_with_padding_off(monkeypatch):
    monkeypatch.setattr(query_widths, "ENABLED", False)
    assert tiny_encoder(k=1).warm_query_widths() == 0
