"""The part of a long passage that a reranker reads: its heading and the run of sentences that
best matches the query.

Why: the query-likelihood reranker (:mod:`htp_embed.rerank`) runs every token it reads through
all of the decoder's layers, so its cost grows with each passage's length. Reading a SciFact
abstract's first 256 tokens cost ~2.6 s for ten candidates on 2 Zen 4 cores; reading its title
and the ~64 tokens around the sentences that share the query's rarer words cost ~1 s and
reranked *better* on the development split (``benchmarks/results/quality/rerank_best64_depth10.md``
against ``rerank_start256_depth10.md``), presumably because the sentence that bears on a query
is often not among the first and the rest of a long passage dilutes the likelihood (not
measured).

Everything here is plain text work, no model: words are lower-cased ``\\w+`` runs without a
few function words, each weighted by how few of the query's candidates hold it (an IDF over
the candidates, so a word every candidate shares, such as the topic, weighs little), and a
sentence scores the summed weight of the query words it holds. The window starts at the best
sentence (the first, on a tie, and so the passage's start when no sentence holds a query
word) and grows one neighbouring sentence at a time toward the better-scoring side while it
fits the budget.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

_WORD = re.compile(r"\w+")
# Words too common to say which sentence a query is about.
STOP_WORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the to was were with "
    "this these those which who not no than".split()
)
#: A first paragraph up to this share of the budget is kept as the passage's heading (a title).
HEADING_SHARE = 0.5
HEADING_SEPARATOR = "\n\n"

CountTokens = Callable[[list[str]], list[int]]
SentenceStarts = Callable[[list[str]], list[list[int]]]


def words(text: str) -> set[str]:
    """The distinct lower-cased words of ``text`` that may tell sentences apart."""
    return {word for word in (match.lower() for match in _WORD.findall(text)) if word not in STOP_WORDS}


def word_weights(passages: Sequence[str]) -> dict[str, float]:
    """Each word's inverse document frequency over ``passages`` (BM25's form, always > 0)."""
    counts: Counter[str] = Counter()
    for passage in passages:
        counts.update(words(passage))
    n = len(passages)
    return {word: math.log(1.0 + (n - df + 0.5) / (df + 0.5)) for word, df in counts.items()}


def best_windows(
    query: str,
    passages: Sequence[str],
    budget: int,
    count_tokens: CountTokens,
    sentence_starts: SentenceStarts,
) -> list[str]:
    """Each passage as the reranker should read it within ``budget`` tokens: a passage that
    fits is returned whole; a longer one as its heading (a first paragraph of at most half the
    budget) and its best-matching run of sentences. The scorer still cuts the result to the
    budget (a single sentence may be longer). ``count_tokens`` counts the tokens of each text
    (the scorer's tokenizer), ``sentence_starts`` gives each text's sentence start offsets."""
    passages = list(passages)
    lengths = count_tokens(passages)
    long = [i for i, length in enumerate(lengths) if length > budget]
    if not long:
        return passages
    weights = word_weights(passages)
    wanted = words(query)
    # Decide each heading before segmenting, so every body is segmented once, in one batch.
    split = [_heading(passages[i]) for i in long]
    heading_sizes = iter(count_tokens([heading for heading, _ in split if heading]))
    chosen: list[tuple[int, str, str, int]] = []  # passage, heading, body, heading tokens
    for i, (heading, body) in zip(long, split, strict=True):
        size = next(heading_sizes) if heading else 0
        if size > budget * HEADING_SHARE:
            heading, body, size = "", passages[i], 0
        chosen.append((i, heading, body, size))
    out = list(passages)
    for (i, heading, body, size), offsets in zip(chosen, sentence_starts([c[2] for c in chosen]), strict=True):
        room = budget - (size + 1 if heading else 0)  # + 1: the separator
        sentences = _sentences(body, offsets)
        if not sentences:
            continue
        span = _best_run(sentences, count_tokens(sentences), [_score(s, wanted, weights) for s in sentences], room)
        out[i] = f"{heading}{HEADING_SEPARATOR}{span}" if heading else span
    return out


def _heading(passage: str) -> tuple[str, str]:
    """The first paragraph and the rest, or ("", passage) when there is no second paragraph."""
    head, separator, rest = passage.partition(HEADING_SEPARATOR)
    if not separator or not head.strip() or not rest.strip():
        return "", passage
    return head.strip(), rest


def _sentences(text: str, starts: list[int]) -> list[str]:
    bounds = [*starts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if text[a:b].strip()]


def _score(sentence: str, wanted: set[str], weights: dict[str, float]) -> float:
    return sum(weights.get(word, 0.0) for word in words(sentence) & wanted)


def _best_run(sentences: list[str], tokens: list[int], scores: list[float], room: int) -> str:
    """The contiguous sentences around the best one that fit ``room`` tokens: grown toward the
    better-scoring neighbour (the following one on a tie)."""
    best = max(range(len(sentences)), key=lambda j: (scores[j], -j))
    low = high = best
    used = tokens[best]
    while True:
        options = []
        if low > 0 and used + tokens[low - 1] <= room:
            options.append((scores[low - 1], 0, low - 1))
        if high + 1 < len(sentences) and used + tokens[high + 1] <= room:
            options.append((scores[high + 1], 1, high + 1))
        if not options:
            break
        _, side, j = max(options)
        low, high = (j, high) if side == 0 else (low, j)
        used += tokens[j]
    return "".join(sentences[low : high + 1]).strip()
