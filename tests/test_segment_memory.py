"""Segmenting does not keep every new word: a service or a long ingest would grow without bound.

spaCy stores each unseen word's string and lexeme in the pipeline's vocabulary for the life of
the process. ``sentence_starts`` keeps the first ``WARM_LEXEMES`` (they warm the tokenizer's
cache) and runs every later call in a memory zone, which frees what the call added.
"""

from __future__ import annotations

import random
import string

import pytest

from htp_embed import segment


def unseen_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(6, 12)))

    return [" ".join(word() for _ in range(9)) + ". " + " ".join(word() for _ in range(6)) + "!"
            for _ in range(count)]


@pytest.mark.parametrize("kind", ["sentencizer", "senter"])
def test_new_words_are_kept_only_up_to_the_warm_up_then_freed(kind, monkeypatch):
    nlp = segment.load_segmenter(kind)
    monkeypatch.setattr(segment, "_ZONED", set())
    monkeypatch.setattr(segment, "_FIRST_LEXEMES", {id(nlp): len(nlp.vocab)})
    monkeypatch.setattr(segment, "WARM_LEXEMES", 500)
    first = len(nlp.vocab.strings)
    segment.sentence_starts(unseen_texts(10, seed=1), kind)  # ~150 new words: still warming up
    warming = len(nlp.vocab.strings)
    assert warming > first  # kept: they fill the tokenizer's cache
    segment.sentence_starts(unseen_texts(40, seed=2), kind)  # passes the warm-up's 500
    warm = len(nlp.vocab.strings)
    texts = unseen_texts(300, seed=3)  # ~4,500 words it has never seen
    starts = segment.sentence_starts(texts, kind)
    assert len(nlp.vocab.strings) == warm  # freed when the call's zone closed
    # The same offsets as a pass outside any zone: two sentences, the second after the ". "
    assert starts == [[0, text.index(". ") + 2] for text in texts]
