"""The window of a long passage the reranker reads: heading kept, the sentences that best match
the query chosen by words weighted over the candidates, grown within the budget."""

from __future__ import annotations

import re

import pytest
from tiny_decoder import build_model, build_tokenizer

from htp_embed.passage_window import best_windows, word_weights, words
from htp_embed.rerank import QueryLikelihoodScorer


def count_words(texts: list[str]) -> list[int]:
    return [len(text.split()) for text in texts]


def sentence_starts(texts: list[str]) -> list[list[int]]:
    """Sentences end at '. ' (enough for these texts; the scorer uses spaCy)."""
    return [[0, *(m.end() for m in re.finditer(r"\. ", text))] for text in texts]


def windows(query: str, passages: list[str], budget: int) -> list[str]:
    return best_windows(query, passages, budget, count_words, sentence_starts)


ABSTRACT = ("Tumour growth in mice.\n\n"
            "Mice were housed in standard cages. "
            "They were fed a normal diet for ten weeks. "
            "The drug reduced tumour volume by half. "
            "Body weight did not change. "
            "Cages were cleaned weekly.")
OTHERS = ["Mice in cages.\n\nMice were weighed. Cages were small.", "Diet and weight.\n\nMice ate well."]


def test_a_passage_within_the_budget_is_read_whole() -> None:
    assert windows("drug tumour", [ABSTRACT, *OTHERS], 100) == [ABSTRACT, *OTHERS]


def test_a_long_passage_keeps_its_heading_and_the_sentences_that_match_the_query() -> None:
    [window, *rest] = windows("did the drug reduce tumour volume", [ABSTRACT, *OTHERS], 18)
    assert rest == OTHERS  # short ones untouched
    heading, body = window.split("\n\n")
    assert heading == "Tumour growth in mice."
    assert "The drug reduced tumour volume by half." in body
    assert len(heading.split()) + len(body.split()) <= 18 - 1
    # Grown toward the better neighbour: the diet sentence shares no query word, the weight
    # sentence neither; on the tie the following one is taken first.
    assert body.startswith("The drug reduced") and "Body weight did not change." in body


def test_no_matching_word_reads_the_passage_from_its_start() -> None:
    [window, *_] = windows("astronomy telescope", [ABSTRACT, *OTHERS], 12)
    assert window.split("\n\n")[1].startswith("Mice were housed in standard cages.")


def test_a_word_every_candidate_holds_weighs_less_than_a_rare_one() -> None:
    weights = word_weights([ABSTRACT, *OTHERS])
    assert weights["mice"] < weights["drug"]
    # "mice" is in the first sentence, "weekly" only in the last: the rare word decides.
    [window, *_] = windows("mice cleaned weekly", [ABSTRACT, *OTHERS], 10)
    assert window.endswith("Cages were cleaned weekly.")


def test_a_long_first_paragraph_is_not_taken_for_a_heading() -> None:
    long_heading = " ".join(["word"] * 12) + "\n\n" + ABSTRACT.split("\n\n")[1]
    [window] = windows("drug tumour volume", [long_heading], 16)
    assert "\n\n" not in window and "The drug reduced tumour volume by half." in window


def test_words_drop_case_and_function_words() -> None:
    assert words("The Drug and THE tumour, of mice") == {"drug", "tumour", "mice"}


@pytest.mark.parametrize("window", ["best", "start"])
def test_the_scorer_reads_the_chosen_window_and_nothing_else(window: str) -> None:
    tokenizer = build_tokenizer(bos=True)
    model = build_model(len(tokenizer))
    long = "the cat sat on the mat . the dog ran in the park . rain fell on the city"
    scorer = QueryLikelihoodScorer(model, tokenizer, max_passage_tokens=8, window=window, segmenter="sentencizer")
    plain = QueryLikelihoodScorer(model, tokenizer, max_passage_tokens=100, window="start")
    query = "where did the dog run ?"
    read = "the dog ran in the park ." if window == "best" else "the cat sat on the mat . the"
    [scored] = scorer.score(query, [long])
    [expected] = plain.score(query, [read])
    assert scored.log_likelihood == pytest.approx(expected.log_likelihood, abs=1e-5)
    assert scored.passage_tokens == len(read.split())


def test_an_unknown_window_is_refused() -> None:
    tokenizer = build_tokenizer(bos=True)
    with pytest.raises(ValueError, match="'best' or 'start'"):
        QueryLikelihoodScorer(build_model(len(tokenizer)), tokenizer, window="middle")  # type: ignore[arg-type]
