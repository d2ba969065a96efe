"""Texts segmented ahead in a side process get exactly the sentences this process gives them.

A cold query segments its text in a second interpreter while this one loads the model
(htp_embed.segment_ahead); the side process runs spaCy without torch, so its answers are
compared here with the real senter pipeline run in the test process.
"""

from __future__ import annotations

import pytest

from htp_embed import segment_ahead
from htp_embed.segment import sentence_starts

TEXTS = [
    "How do summary tokens let early words see later sentences?",
    "One sentence. Another one follows! And a third? Yes.",
    "As shown by Smith et al. in Fig. 3, the effect holds (p < 0.05). It was replicated twice.",
    "Ünïcödé text — with dashes… and “quotes”. 日本語の文。もう一つの文。",
    "no punctuation at all just words running on",
    "   leading spaces.  Trailing ones too.   ",
    "e.g. abbreviations i.e. mid-sentence vs. real ends. Done.",
]


@pytest.fixture(autouse=True)
def _no_leftover_side_process(monkeypatch):
    monkeypatch.setattr(segment_ahead, "_usable_cores", lambda: 2)  # started on one core too
    yield
    for side in segment_ahead._PENDING.values():
        side.stop()
    segment_ahead._PENDING.clear()


@pytest.mark.parametrize("kind", ["senter", "sentencizer"])
def test_side_process_answers_equal_this_process(kind):
    here = sentence_starts(TEXTS, kind)  # before any side process: spaCy in this process
    segment_ahead.segment_ahead(TEXTS, kind)
    assert segment_ahead.pending(kind)
    assert segment_ahead.answers_for(TEXTS, kind) == here
    assert not segment_ahead.pending(kind)  # consumed once


def test_sentence_starts_takes_the_side_answer_only_for_the_same_texts(monkeypatch):
    segment_ahead.segment_ahead(["A first text. Two sentences."], "sentencizer")
    other = ["A different text. Also two."]
    # Other texts or another segmenter: segmented here, and the side answer stays pending.
    assert sentence_starts(other, "sentencizer") == [[0, 18]]
    assert segment_ahead.answers_for(["A first text. Two sentences."], "senter") is None
    assert segment_ahead.pending("sentencizer")
    asked = []
    monkeypatch.setattr("htp_embed.segment.load_segmenter", lambda kind: asked.append(kind))
    assert sentence_starts(["A first text. Two sentences."], "sentencizer") == [[0, 14]]
    assert asked == []  # answered by the side process, spaCy not asked in this process


def test_a_failed_side_process_falls_back_to_this_process():
    here = sentence_starts(TEXTS, "senter")
    segment_ahead.segment_ahead(TEXTS, "senter")
    segment_ahead._PENDING["senter"].stop()  # killed before it could answer
    assert sentence_starts(TEXTS, "senter") == here
    assert not segment_ahead.pending("senter")


def test_one_core_segments_in_this_process(monkeypatch):
    monkeypatch.setattr(segment_ahead, "_usable_cores", lambda: 1)  # a side process would only compete
    segment_ahead.segment_ahead(TEXTS, "sentencizer")
    assert not segment_ahead.pending("sentencizer")
