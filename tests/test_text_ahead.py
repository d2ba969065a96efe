"""Work done ahead in side processes gives exactly what this process would compute.

A cold query tokenizes and segments its text in two other interpreters while this one imports
torch and loads the model (htp_embed.text_ahead). The side processes run spaCy and the
packaged tokenizer without torch, so their answers are compared here with the real spaCy
pipeline and the real tokenizer run in the test process, and every way the side work can be
missing, different or broken must end in this process's own answer.
"""

from __future__ import annotations

import pytest
from tiny_decoder import build_tokenizer

from htp_embed import text_ahead
from htp_embed.config import EncoderConfig
from htp_embed.packaged_tokenizer import PackagedTokenizer
from htp_embed.segment import sentence_starts
from htp_embed.text_ahead import TokenCall

TEXTS = [
    "How do summary tokens let early words see later sentences?",
    "One sentence. Another one follows! And a third? Yes.",
    "As shown by Smith et al. in Fig. 3, the effect holds (p < 0.05). It was replicated twice.",
    "Ünïcödé text — with dashes… and “quotes”. 日本語の文。もう一つの文。",
    "no punctuation at all just words running on",
    "   leading spaces.  Trailing ones too.   ",
    "e.g. abbreviations i.e. mid-sentence vs. real ends. Done.",
]
# Texts the tiny word-level tokenizer knows, unknown words, a special token typed as text.
TOKEN_TEXTS = ["the cat sat on the mat .", "<bos> typed as text", "", "fish  swam\tin the sea", "w3 w150 unknownword"]
CALLS = [TokenCall(text, add, split) for text in TOKEN_TEXTS for add, split in ((False, True), (True, False))]


@pytest.fixture(autouse=True)
def _no_leftover_side_process(monkeypatch):
    monkeypatch.setattr(text_ahead, "_usable_cores", lambda: 2)  # started on one core too
    yield
    for side in text_ahead._PENDING.values():
        side.stop()
    text_ahead._PENDING.clear()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(padding_side="left", bos=True).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["senter", "sentencizer"])
def test_side_process_sentences_equal_this_process(kind):
    here = sentence_starts(TEXTS, kind)  # before any side process: spaCy in this process
    text_ahead.start(TEXTS, segmenter=kind)
    assert text_ahead.segmenting(kind)
    assert text_ahead.sentences_for(TEXTS, kind) == here
    assert not text_ahead.segmenting(kind)  # consumed once


def test_sentence_starts_takes_the_side_answer_only_for_the_same_texts(monkeypatch):
    text_ahead.start(["A first text. Two sentences."], segmenter="sentencizer")
    other = ["A different text. Also two."]
    # Other texts or another segmenter: segmented here, and the side answer stays pending.
    assert sentence_starts(other, "sentencizer") == [[0, 18]]
    assert text_ahead.sentences_for(["A first text. Two sentences."], "senter") is None
    assert text_ahead.segmenting("sentencizer")
    asked = []
    monkeypatch.setattr("htp_embed.segment.load_segmenter", lambda kind: asked.append(kind))
    assert sentence_starts(["A first text. Two sentences."], "sentencizer") == [[0, 14]]
    assert asked == []  # answered by the side process, spaCy not asked in this process


def test_a_failed_side_process_falls_back_to_this_process():
    here = sentence_starts(TEXTS, "senter")
    text_ahead.start(TEXTS, segmenter="senter")
    text_ahead._PENDING["sentences"].stop()  # killed before it could answer
    assert sentence_starts(TEXTS, "senter") == here
    assert not text_ahead.segmenting("senter")


def test_one_core_does_everything_in_this_process(monkeypatch, tokenizer_dir):
    monkeypatch.setattr(text_ahead, "_usable_cores", lambda: 1)  # a side process would only compete
    text_ahead.start(TEXTS, segmenter="sentencizer", tokenizer=tokenizer_dir, token_calls=CALLS)
    assert not text_ahead._PENDING


def _every_answer(tokenizer: PackagedTokenizer) -> list:
    """Each call of CALLS as the encoder makes it (single texts and a batch), and the special ids."""
    results = []
    for call in CALLS:
        options = {"add_special_tokens": call.add_special_tokens, "split_special_tokens": call.split_special_tokens}
        results.append(tokenizer(call.text, **options, return_offsets_mapping=True))
        results.append(tokenizer([call.text, call.text], **options))
    results.append([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id])
    return results


def test_side_process_tokens_equal_this_process_without_reading_the_tokenizer(tokenizer_dir):
    here = PackagedTokenizer.from_dir(tokenizer_dir)
    assert here.loaded
    text_ahead.start([], tokenizer=tokenizer_dir, token_calls=CALLS)
    ahead = PackagedTokenizer.from_dir(tokenizer_dir)
    assert not ahead.loaded
    assert _every_answer(ahead) == _every_answer(here)  # ids, masks, offsets as tuples, special ids
    assert not ahead.loaded  # every answer came from the side process
    # A call it was not asked: tokenizer.json is read here, and the answer is this process's.
    assert ahead("fish sat", add_special_tokens=True, return_offsets_mapping=True) == here(
        "fish sat", add_special_tokens=True, return_offsets_mapping=True)
    assert ahead.loaded
    assert ahead.get_vocab() == here.get_vocab() and len(ahead) == len(here)


def test_an_answer_handed_out_is_a_copy(tokenizer_dir):
    text_ahead.start([], tokenizer=tokenizer_dir, token_calls=CALLS)
    ahead = PackagedTokenizer.from_dir(tokenizer_dir)
    first = ahead(CALLS[0].text, add_special_tokens=False, split_special_tokens=True)
    first["input_ids"].append(-1)
    assert ahead(CALLS[0].text, add_special_tokens=False, split_special_tokens=True)["input_ids"][-1] != -1


def test_tokens_are_taken_only_for_the_directory_asked(tokenizer_dir, tmp_path):
    other = tmp_path / "other"
    build_tokenizer(padding_side="left", bos=True).save_pretrained(other)
    text_ahead.start([], tokenizer=tokenizer_dir, token_calls=CALLS)
    assert PackagedTokenizer.from_dir(other).loaded  # another directory: read here at once
    assert not PackagedTokenizer.from_dir(tokenizer_dir).loaded  # the one asked: answered
    assert PackagedTokenizer.from_dir(tokenizer_dir).loaded  # taken once


@pytest.mark.parametrize("failure", ["killed", "unreadable tokenizer"])
def test_a_failed_token_process_falls_back_to_this_process(tokenizer_dir, tmp_path, failure):
    here = PackagedTokenizer.from_dir(tokenizer_dir)
    if failure == "killed":
        text_ahead.start([], tokenizer=tokenizer_dir, token_calls=CALLS)
        text_ahead._PENDING["tokens"].stop()
        ahead = PackagedTokenizer.from_dir(tokenizer_dir)
        assert _every_answer(ahead) == _every_answer(here) and ahead.loaded
    else:
        # The side process fails (its directory has no tokenizer.json yet); this process,
        # reading the same directory later, gets the file and answers everything itself.
        broken = tmp_path / "late"
        broken.mkdir()
        (broken / "tokenizer_config.json").write_bytes((tokenizer_dir / "tokenizer_config.json").read_bytes())
        text_ahead.start([], tokenizer=broken, token_calls=CALLS)
        text_ahead._PENDING["tokens"].reader.join(60)
        (broken / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
        ahead = PackagedTokenizer.from_dir(broken)
        assert _every_answer(ahead) == _every_answer(here) and ahead.loaded


def test_a_query_asks_for_its_tokens_and_sentences_only_where_needed(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(text_ahead, "start", lambda texts, **asked: started.append(asked))
    monkeypatch.setenv("HTP_INDEX_CACHE", str(tmp_path))
    copy = tmp_path / "models" / "gemma3-270m-float32"
    text_ahead.prepare_query(EncoderConfig(), ["a query"])  # not converted yet: no tokens
    assert started[-1]["tokenizer"] is None and started[-1]["segmenter"] == "senter"
    copy.mkdir(parents=True)
    (copy / "tokenizer.json").write_text("{}")
    text_ahead.prepare_query(EncoderConfig(), ["a query"])
    assert started[-1]["tokenizer"] == copy
    calls = started[-1]["token_calls"]
    assert TokenCall("a query", False, True) in calls and TokenCall(EncoderConfig().query_instruction, False, True) in calls
    text_ahead.prepare_query(EncoderConfig(method="vanilla"), ["a query"])  # no sentences to lay out
    assert started[-1]["segmenter"] is None
    text_ahead.prepare_query(EncoderConfig(model=str(tmp_path)), ["a query"])  # a user's directory
    assert started[-1]["tokenizer"] is None
