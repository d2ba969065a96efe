"""Pseudo-queries, the sample behind the vector correction's query mean: drawn from every text,
so that the query mean is taken over the same corpus as the documents' mean."""

from __future__ import annotations

from pipelines.correction import pseudo_queries, pseudo_query_pairs

PROSE = "Zebrafish regenerate their fins within weeks of an injury. Short one. The fins grow back whole and functional."
LOG = " ".join(f"event{i} ok" for i in range(200))  # no sentence end at all: logs, tables, code


def test_texts_with_sentences_give_their_sentences_of_six_to_forty_words():
    pairs = pseudo_query_pairs([PROSE])
    assert pairs == [(0, "Zebrafish regenerate their fins within weeks of an injury."),
                     (0, "The fins grow back whole and functional.")]  # "Short one." is too short


def test_a_text_without_such_a_sentence_gives_its_first_forty_words_and_an_empty_one_nothing():
    pairs = pseudo_query_pairs([PROSE, LOG, "tiny note", "   "])
    sources = [source for source, _ in pairs]
    assert sources == [0, 0, 1, 2]  # every non-empty text is represented
    assert pairs[2] == (1, " ".join(LOG.split()[:40])) and pairs[3] == (2, "tiny note")


def test_a_mostly_unpunctuated_corpus_is_sampled_in_proportion_not_through_its_prose_alone():
    texts = [LOG] * 300 + [PROSE] * 3
    sample = pseudo_queries(texts, n=64)
    assert len(sample) == 64
    # prose is 6 of 306 candidates: a fair sample holds a few, the old rule held only prose
    assert sum(text.startswith("event0") for text in sample) > 50
    assert sample == pseudo_queries(texts, n=64)  # a fixed seed: the same index, the same sample
